"""A finished run exported, and verified on request: `tailor export`, Run.export and the studio's Export page."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from tailorlm.export.build import ExportResult
    from tailorlm.export.verify import VerifyReport


@dataclass
class Exported:
    result: ExportResult  # the export's folder, format and files
    checks: VerifyReport | None  # the export loaded back and compared with the run; None unless verify=True


def export_finished_run(run_dir: str | Path, fmt: str, quant: str | None = None, output: str | Path | None = None,
                        *, verify: bool = False, trust_remote_code: bool = False,
                        on_written: Callable[[ExportResult], None] | None = None) -> Exported:
    """Write one export of the run (hf, adapter or gguf; quant for gguf; output defaults to RUN/export/<format>)
    and, with verify=True, load it back and check its logits, prompts and Modelfile against the run.

    on_written sees the export as soon as its files are written: the checks load it back and take longer than
    the writing, so the CLI lists the files and the studio shows them meanwhile."""
    from tailorlm.export.build import export_run
    from tailorlm.models.trained import load_trained

    # On the CPU in float32: exporting is memory-bound, and the checks compare against exact float32 logits.
    trained = load_trained(run_dir, "cpu", merge=fmt != "adapter", trust_remote_code=trust_remote_code)
    result = export_run(trained, fmt, quant, output)
    if on_written is not None:
        on_written(result)
    if not verify:
        return Exported(result, None)
    from tailorlm.export.verify import verify_export  # only when asked: it loads the export back (and llama.cpp)

    return Exported(result, verify_export(trained, result))
