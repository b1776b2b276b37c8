"""`tailor export RUN_DIR --format hf|adapter|gguf [--quant f16|q8_0] [--output DIR] [--verify]`."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  tailor export runs/bbc-news-20250101-120000 --format gguf --verify     GGUF (f16) + Ollama Modelfile, checked
  tailor export RUN --format gguf --quant q8_0                           8-bit GGUF
  tailor export RUN --format hf                                          merged transformers folder
  tailor export RUN --format adapter                                     the PEFT adapter alone (LoRA runs)
"""


def register(verbs) -> None:
    export = verbs.add_parser(
        "export", help="export a finished run: merged HF folder, PEFT adapter, or GGUF + Ollama Modelfile",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `tailor run`")
    export.add_argument("--format", "-f", required=True, choices=["hf", "adapter", "gguf"],
                        help="hf: LoRA merged into the base, safetensors; adapter: the PEFT adapter alone; "
                             "gguf: merged weights for llama.cpp / Ollama, with a Modelfile")
    export.add_argument("--quant", choices=["f16", "q8_0"], help="GGUF weight type (default f16)")
    export.add_argument("--output", "-o", help="output folder (default: RUN_DIR/export/<format>[-<quant>])")
    export.add_argument("--verify", action="store_true",
                        help="load the export back and check logits, chat template and Modelfile against the run")
    export.set_defaults(handler=run_export)


def run_export(args) -> int:
    # Lazy on purpose: cli.py imports this module to build its parser on every `tailor` call; the verb's own
    # imports (torch, transformers, optuna, rich) load only when it runs.
    from pathlib import Path

    from tailorlm.export.build import check_run_dir
    from tailorlm.models.loading import quiet_library_logs
    from tailorlm.ops.export import export_finished_run
    from tailorlm.ui import console, stage

    run_dir = Path(args.run_dir)
    check_run_dir(run_dir)
    quiet_library_logs()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars would bury the export's own output
    stage(f"Export: {args.format}" + (f" ({args.quant or 'f16'})" if args.format == "gguf" else ""))

    def list_files(result) -> None:  # said before the checks, which take longer than the writing
        console.print(f"Wrote {result.folder}/: " + ", ".join(sorted(p.name for p in result.folder.iterdir())))

    exported = export_finished_run(run_dir, args.format, args.quant, args.output, verify=args.verify,
                                   trust_remote_code=args.trust_remote_code, on_written=list_files)
    if exported.checks is None:
        return 0
    exported.checks.show()
    return 0 if exported.checks.ok else 1
