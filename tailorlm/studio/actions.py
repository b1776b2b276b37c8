"""The studio's two model-using actions: chat with a run beside its base model, and export with verification.

Both are operations of ops/ (engines.py, export.py), the ones `tailor chat` and `tailor export` run, so the
studio's chat lays out prompts exactly as training and evaluation did, and its exports are the CLI's exports.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import traceback
from pathlib import Path
from typing import Iterator

from tailorlm.errors import TailorError

EXPORT_FORMATS = ("hf", "adapter", "gguf")


SIDES = ("fine_tuned", "base")


def chat_setup(run_dir: Path) -> dict:
    """How the chat page talks to a run, read from its config without loading a model.

    A run trained on single prompts (a classifier, NER, QA...) is asked the way it was trained: the page asks for
    the template's input fields (a classifier's text, a QA pair's context and question) and the prompt is the
    training prompt, so typing only the text gets a label. A run trained on conversations (or on several tasks)
    chats with whole messages under its chat format."""
    from tailorlm.data.templates import PromptTemplate
    from tailorlm.rundir import RunDir

    cfg = RunDir(run_dir).config()
    specs = cfg.task_set()
    template = PromptTemplate(specs[0].template)
    # The page fills one task's prompt; a run of several tasks has no one prompt to fill, so it chats.
    if len(specs) > 1 or template.task.conversational:
        return {"mode": "chat", "preset": cfg.template.preset, "fields": [], "labels": []}
    labels = next(iter(RunDir(run_dir).manifest(cfg).tasks.values())).labels
    return {"mode": "task", "preset": cfg.template.preset, "fields": sorted(template.input_fields), "labels": labels,
            "closed": bool(labels) and template.label_field is not None}


class SideBySide:
    """A fine-tuned run and its base model, answering the same input: the run's task prompt, or a conversation
    under the run's chat format. The base model is given the run's own template and system prompt, so only the
    weights differ."""

    def __init__(self, run_dir: Path, device: str = "auto"):
        from tailorlm.ops.engines import load_run_beside_base

        loaded = load_run_beside_base(run_dir, device)
        self.device, self.trained, self.engines = loaded.device, loaded.trained, loaded.engines

    def answer_task(self, fields: dict[str, str], constrained: bool) -> Iterator[dict]:
        """Each side's answer to one row made of `fields`, laid out and decoded as `tailor predict` does it
        (constrained: decoding kept to the label set or the input's own spans, as the run's evaluation can)."""
        from tailorlm.data.records import Record, Table
        from tailorlm.serve.predict import predict_rows

        cfg = self.trained["fine_tuned"].cfg
        # Keyed by the run's own column names: the row goes through the same column mapping as its training rows.
        row = Table("the studio's chat", [Record({cfg.data.columns.get(f, f): v for f, v in fields.items()}, "input")])
        decoding = cfg.eval.model_copy(update={"decoding": "constrained" if constrained else "free"})
        for side in SIDES:
            trained = self.trained[side]
            trained = dataclasses.replace(trained, cfg=trained.cfg.model_copy(update={"eval": decoding}))
            lines, _ = predict_rows(trained, row, batch_size=1, device=self.device,
                                    decoding="constrained" if constrained else "free")
            line = lines[0]
            if line.get("error"):
                raise TailorError(f"the input is {line['error']}")
            yield {"side": side, "done": True, "text": line["generated"], "label": line["predicted"]}

    def stream_chat(self, messages: list[dict], sampling) -> Iterator[dict]:
        """Both sides' answers to the conversation, piece by piece as they are generated, side by side: one
        {'side', 'piece'} event per piece, then {'side', 'done', 'text', 'finish_reason'} for each."""
        from tailorlm.serve.engine import PromptError

        events: queue.Queue = queue.Queue()
        streams = {}
        for side in SIDES:
            engine = self.engines[side]
            try:
                streams[side] = engine.stream(engine.chat_prompt(list(messages)), sampling)
            except PromptError as e:
                raise TailorError(f"chat: {e}") from None

        def pump(side: str, stream) -> None:  # one thread per side: both models generate at once
            try:
                for piece in stream:
                    events.put({"side": side, "piece": piece})
                done = stream.completion
                events.put({"side": side, "done": True, "text": done.text, "finish_reason": done.finish_reason})
            except Exception as e:  # said on the page, for that side
                events.put({"side": side, "done": True, "error": f"{type(e).__name__}: {e}"})

        threads = [threading.Thread(target=pump, args=item, daemon=True) for item in streams.items()]
        for thread in threads:
            thread.start()
        finished = 0
        try:
            while finished < len(threads):
                event = events.get()
                finished += bool(event.get("done"))
                yield event
        finally:  # the page left (or a new message replaced this one): both models stop at their next step
            for stream in streams.values():
                stream.cancel()

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def check_fields(fields: dict[str, str] | None, names: list[str]) -> dict[str, str]:
    """The task's input fields: {field: text} for exactly the template's inputs, none of them blank."""
    fields = fields or {}
    missing = [n for n in names if not fields.get(n, "").strip()]
    if missing:
        raise TailorError(f"chat: write the {', '.join(missing)} to ask the model about")
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise TailorError(f"chat: {', '.join(unknown)} is not an input of this run's template ({', '.join(names)})")
    return {n: fields[n] for n in names}


def export_file(folder: Path, name: str) -> Path:
    """A file of an export folder by its relative name; nothing outside it, and no link out of it."""
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents or not path.is_file():
        raise TailorError(f"{name}: not a file of the export {folder.name}")
    return path


def zip_folder(folder: Path) -> Path:
    """The folder as a .zip in a temporary file (stored, not compressed: weights do not compress)."""
    import tempfile
    import zipfile

    handle, name = tempfile.mkstemp(suffix=".zip", prefix="tailor-export-")
    archive = Path(name)
    try:
        with open(handle, "wb") as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zipped:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    zipped.write(path, f"{folder.name}/{path.relative_to(folder)}")
    except BaseException:
        archive.unlink(missing_ok=True)
        raise
    return archive


def start_export(exports: dict[str, dict], name: str, run_dir: Path, fmt: str, quant: str | None) -> dict:
    """Export in a background thread; `exports[name]` (the run's name in the studio) holds its state for the
    page to poll."""
    if fmt not in EXPORT_FORMATS:
        raise TailorError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    current = exports.get(name)
    if current and current["state"] == "running":
        return current
    state = {"state": "running", "format": fmt, "quant": quant, "folder": None, "files": [], "checks": [],
             "error": None}
    exports[name] = state

    def work() -> None:
        from tailorlm.ops.export import export_finished_run

        def written(result) -> None:  # the page lists the files while the checks run
            state["folder"] = str(result.folder)
            state["files"] = [{"name": str(f.relative_to(result.folder)), "bytes": f.stat().st_size}
                              for f in sorted(result.folder.rglob("*")) if f.is_file()]

        try:
            report = export_finished_run(run_dir, fmt, quant, verify=True, on_written=written).checks
            state["checks"] = [{"name": c.name, "result": c.result, "limit": c.limit, "ok": c.ok} for c in report.checks]
            state["state"] = "verified" if report.ok else "differs"
        except TailorError as e:
            state.update(state="failed", error=str(e))
        except Exception as e:  # a defect: say it on the page rather than lose it in a thread
            state.update(state="failed", error=f"{type(e).__name__}: {e}")
            traceback.print_exc()

    threading.Thread(target=work, name=f"export-{name}", daemon=True).start()
    return state
