"""The studio's two model-using actions: chat with a run beside its base model, and export with verification.

Both load models through models/trained.py, as `tailor chat` and `tailor export` do, so the studio's chat lays
out prompts exactly as training and evaluation did, and its exports are the CLI's exports.
"""
from __future__ import annotations

import threading
import traceback
from pathlib import Path

from tailorlm.errors import TailorError

EXPORT_FORMATS = ("hf", "adapter", "gguf")


class SideBySide:
    """A fine-tuned run and its base model, answering the same conversation under the run's chat format."""

    def __init__(self, run_dir: Path, device: str = "auto"):
        from tailorlm.data.tokenize import ChatFormat
        from tailorlm.models.loading import resolve_device
        from tailorlm.models.trained import load_trained
        from tailorlm.serve.engine import Engine

        where = resolve_device(device)
        tuned = load_trained(run_dir, where, merge=True)
        base = load_trained(tuned.base_source, where)
        self.engines = {
            "fine_tuned": Engine(tuned.model, tuned.tokenizer, tuned.chat_format(), where),
            # the base model sees the run's own template and system prompt, so only the weights differ
            "base": Engine(base.model, base.tokenizer, ChatFormat(base.tokenizer, tuned.cfg.template), where),
        }

    def answer(self, messages: list[dict], max_new_tokens: int = 128) -> dict[str, str]:
        from tailorlm.serve.jobs import Sampling

        sampling = Sampling(max_new_tokens)
        return {name: engine.complete(engine.chat_prompt(list(messages)), sampling).text
                for name, engine in self.engines.items()}

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TailorError("chat: messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise TailorError(f"chat: message {i + 1} must be {{role: system|user|assistant, content: text}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def start_export(exports: dict[str, dict], run_dir: Path, fmt: str, quant: str | None) -> dict:
    """Export in a background thread; `exports[run name]` holds its state for the page to poll."""
    if fmt not in EXPORT_FORMATS:
        raise TailorError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    current = exports.get(run_dir.name)
    if current and current["state"] == "running":
        return current
    state = {"state": "running", "format": fmt, "quant": quant, "folder": None, "checks": [], "error": None}
    exports[run_dir.name] = state

    def work() -> None:
        from tailorlm.export.build import export_run
        from tailorlm.export.verify import verify_export
        from tailorlm.models.trained import load_trained

        try:
            # On the CPU in float32, as tailor export: the checks compare against exact float32 logits.
            trained = load_trained(run_dir, "cpu", merge=fmt != "adapter")
            result = export_run(trained, fmt, quant)
            state["folder"] = str(result.folder)
            report = verify_export(trained, result)
            state["checks"] = [{"name": c.name, "result": c.result, "limit": c.limit, "ok": c.ok} for c in report.checks]
            state["state"] = "verified" if report.ok else "differs"
        except TailorError as e:
            state.update(state="failed", error=str(e))
        except Exception as e:  # a defect: say it on the page rather than lose it in a thread
            state.update(state="failed", error=f"{type(e).__name__}: {e}")
            traceback.print_exc()

    threading.Thread(target=work, name=f"export-{run_dir.name}", daemon=True).start()
    return state
