"""`tailor export`: a finished run -> a Hugging Face folder, a PEFT adapter, or a GGUF with an Ollama Modelfile.

Everything that can be refused (format, output folder, architecture, chat template) is checked before a
byte is written, and the export is written into a temporary sibling folder renamed into place at the end:
a failed export leaves nothing behind, a finished one is complete.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tailorlm.errors import TailorError
from tailorlm.export.layout import Layout, run_layout
from tailorlm.models.trained import Trained
from tailorlm.rundir import RunDir

FORMATS = ("hf", "adapter", "gguf")
QUANTS = ("f16", "q8_0")


@dataclass
class ExportResult:
    format: str
    quant: str | None  # gguf only
    folder: Path
    layout: Layout
    gguf_file: Path | None = None
    modelfile: Path | None = None


def check_run_dir(path: Path) -> None:
    """A clear error unless `path` is a run directory whose run finished."""
    RunDir(path).require_complete("tailor export", "exporting")


def default_output(run_dir: Path, fmt: str, quant: str | None) -> Path:
    return run_dir / "export" / (f"{fmt}-{quant}" if quant else fmt)


def export_run(trained: Trained, fmt: str, quant: str | None = None, output: str | Path | None = None) -> ExportResult:
    """Write one export of a loaded run (load_trained(run, merge=fmt != "adapter"))."""
    if fmt not in FORMATS:
        raise TailorError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if quant is not None and fmt != "gguf":
        raise TailorError(f"--quant applies to --format gguf only (got --format {fmt})")
    quant = (quant or "f16") if fmt == "gguf" else None
    if quant is not None and quant not in QUANTS:
        raise TailorError(f"unknown GGUF quantization '{quant}'; choose one of: {', '.join(QUANTS)}")
    if fmt == "adapter" and not trained.is_adapter:
        raise TailorError(f"{trained.run_dir}: a {trained.method} fine-tuning run has no adapter to export; "
                          f"use --format hf or --format gguf")
    out = Path(output) if output else default_output(trained.run_dir, fmt, quant)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TailorError(f"output {out} already exists and is not empty; choose another --output or remove it")

    layout = run_layout(trained.tokenizer, trained.cfg)
    writers = {"hf": _hf, "adapter": _adapter, "gguf": _gguf}
    prepared = writers[fmt](trained, layout, quant, out)  # checks first; returns the function that writes

    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an export that was killed
    partial.mkdir(parents=True)
    try:
        result = prepared(partial)
        if out.exists():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result.folder = out
    for name in ("gguf_file", "modelfile"):
        if getattr(result, name) is not None:
            setattr(result, name, out / getattr(result, name).name)
    return result


def _hf(trained: Trained, layout: Layout, quant, out: Path):
    from tailorlm.export.merge import write_hf

    def write(folder: Path) -> ExportResult:
        write_hf(trained, layout, folder)
        return ExportResult("hf", None, folder, layout)

    return write


def _adapter(trained: Trained, layout: Layout, quant, out: Path):
    from tailorlm.export.merge import write_adapter

    def write(folder: Path) -> ExportResult:
        write_adapter(trained, layout, folder)
        return ExportResult("adapter", None, folder, layout)

    return write


def _gguf(trained: Trained, layout: Layout, quant: str, out: Path):
    from tailorlm.export.gguf_writer import gguf_architecture, write_gguf
    from tailorlm.export.modelfile import modelfile_text, ollama_layout

    gguf_architecture(trained.model, trained.base_source)  # refuse an unsupported model before writing
    ollama = ollama_layout(layout, trained.tokenizer)
    name = f"{trained.run_dir.resolve().name}-{quant}.gguf"

    def write(folder: Path) -> ExportResult:
        write_gguf(trained.model, trained.tokenizer, folder / name, quant, trained.base_source, layout)
        (folder / "Modelfile").write_text(modelfile_text(name, ollama))
        return ExportResult("gguf", quant, folder, layout, folder / name, folder / "Modelfile")

    return write
