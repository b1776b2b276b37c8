"""`tailor <verb>`: the command line. Each verb is a thin layer over the library."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from tailorlm.errors import DiskFullError, TailorError, disk_full_errno, no_space

EPILOG = """examples:
  tailor run                                   the embedded default job (BBC News topics, SmolLM2-135M)
  tailor run examples/sst2.yaml                a config file
  tailor run train.lr=1e-4 method.name=full    overrides, as dotted key=value
  tailor run --print-config                    show the resolved config and exit
  tailor run --resume runs/bbc-news-20260101-120000   continue an interrupted run exactly
  tailor preflight examples/wnut17.yaml        check the data (duplicates, leakage, lengths, time) only
  tailor pairs runs/sst2-20260101-120000       preference pairs from the run's wrong answers, and a
                                               dpo.yaml to continue that run with DPO
  tailor auto examples/trec.yaml --budget 30m  the best model and recipe within 30 minutes, chosen on
                                               validation, proven on test
  tailor studio                                the local web app: a table to a fine-tuned model, no YAML
  tailor run examples/sst2.yaml --nproc 4      the same run on 4 processes (torchrun, DDP; FSDP2 with
                                               train.distributed.strategy=fsdp)
"""

# Verbs beyond run/preflight/pairs live in commands/ when their work is an operation (ops/: export, chat,
# predict, serve, runs, compare), and beside the code they drive otherwise (sweep, studio). Each module has
# register(verbs), which adds its subparser with set_defaults(handler=fn), and fn(args) -> exit code. Heavy
# imports stay inside fn.
VERB_MODULES = ["tailorlm.commands.export", "tailorlm.commands.serve", "tailorlm.commands.track",
                "tailorlm.commands.auto", "tailorlm.sweep.command", "tailorlm.studio.command"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailor", description="Fine-tune a language model on your task data.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    from tailorlm import __version__

    parser.add_argument("--version", action="version", version=f"tailorlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="prepare data, run prompting baselines, fine-tune, evaluate, report",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    check = verbs.add_parser("preflight", help="check the data (duplicates, leakage, lengths, time) without training")
    for verb in (run, check):
        verb.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                          help="a run spec (the embedded default when absent) and dotted overrides")
        verb.add_argument("--skip-bad-rows", action="store_true",
                          help="skip rows with bad values and report the count per reason (default: stop at the first)")
        verb.add_argument("--allow-code", action="store_true",
                          help="let the Python the config names run (a GRPO reward function: objective.grpo.reward); "
                               "a config asking for it is refused without this flag")
    run.add_argument("--output", "-o", help="run directory (default: runs/<name>-<timestamp>)")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its latest complete checkpoint (its own config.yaml)")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train on N processes of this machine (GPUs, or CPU processes without one): shorthand "
                          "for torchrun --standalone --nproc-per-node N -m tailorlm run ...")
    check.add_argument("--output", "-o", help="also save each task's preflight.json, data_report.json and token_lengths.png "
                       "under DIR/tasks/<name>/, as a run lays them out")
    pairs = verbs.add_parser("pairs", help="preference pairs from your labeled data: the model's wrong answers as "
                                           "rejected, the gold answers as chosen (SFT, then DPO on the same table)",
                             description="The run's model (or a config's base model) answers the training and "
                                         "validation rows; each wrong answer becomes a pair. Writes pairs.jsonl, "
                                         "validation.jsonl, test.jsonl and dpo.yaml (tailor run it next).")
    pairs.add_argument("source", metavar="RUN_OR_CONFIG", help="a run directory written by `tailor run`, or a config")
    pairs.add_argument("--output", "-o", help="the folder to write (default: RUN/pairs, or CONFIG-pairs)")
    pairs.add_argument("--limit", type=int, metavar="N", help="answer only the first N training rows")
    pairs.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    pairs.set_defaults(handler=_pairs)
    import importlib

    for name in VERB_MODULES:
        importlib.import_module(name).register(verbs)
    for name in MODEL_VERBS:  # every verb that loads a model: remote code runs only when its command says so
        verbs.choices[name].add_argument(
            "--trust-remote-code", action="store_true",
            help="let the model folder's own Python code run (needed for architectures transformers lacks); "
                 "a config.yaml asking for it is refused without this flag")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (any verb)")
    return parser


MODEL_VERBS = ("run", "preflight", "pairs", "export", "chat", "predict", "serve", "sweep", "auto")


def _pairs(args) -> int:
    from tailorlm.pipeline.pairs import make_pairs

    if args.limit is not None and args.limit < 1:
        raise TailorError("--limit must be a positive number of rows")
    make_pairs(args.source, args.output, args.limit, args.device, args.trust_remote_code)
    return 0


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    config = [a for a in args if "=" not in a]
    if len(config) > 1:
        raise TailorError(f"expected at most one config file, got {', '.join(config)} "
                          f"(overrides are written key=value)")
    return (config[0] if config else None), [a for a in args if "=" in a]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (`tailor run cfg.yaml -o out train.lr=1e-4`); argparse leaves those over.
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the verb
    argv = [a for a in argv if a != "--debug"]
    args, extra = parser.parse_known_args(argv)
    overridable = args.verb in ("run", "preflight")  # only these take key=value overrides
    unknown = [a for a in extra if "=" not in a or a.startswith("-") or not overridable]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overridable:
        args.args += extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # the libraries' tqdm bars (GGUF conversion, shard writing) would fill a log
        os.environ.setdefault("TQDM_DISABLE", "1")  # file with carriage returns; read when tqdm is first imported
    warnings.filterwarnings("ignore")  # library deprecation chatter would bury the run's own output
    from tailorlm.ui import console

    try:
        from pathlib import Path

        from tailorlm.config import load_config

        if getattr(args, "handler", None) is not None:
            return args.handler(args)

        config_path, overrides = _split_args(args.args)
        resume = getattr(args, "resume", None)
        if resume:
            if config_path:
                raise TailorError(f"--resume {resume} uses the run's own config.yaml; drop {config_path}")
            from tailorlm.ops.resume import resume_config

            config_path = str(resume_config(resume, "--resume"))
        cfg = load_config(config_path, overrides + (["data.skip_bad_rows=true"] if args.skip_bad_rows else []),
                          trust_remote_code=args.trust_remote_code, allow_code=args.allow_code)
        if args.verb == "run" and args.print_config:
            sys.stdout.write(cfg.to_yaml())
            return 0
        if args.verb == "run" and args.nproc and args.nproc > 1:
            return _torchrun(argv, args.nproc)
        if args.verb == "run":
            import tailorlm

            if resume and args.output and Path(args.output) != Path(resume):
                raise TailorError("--resume continues the run in its own directory; drop --output")
            tailorlm.run(cfg, output=resume or args.output, resume=bool(resume), quiet=True)
            return 0
        from tailorlm.data.preflight import enforce
        from tailorlm.pipeline import prepare, save_data_report
        from tailorlm.rundir import RunDir

        prepared = prepare(cfg)
        for name, task in prepared.tasks.items():
            if args.output:  # the same layout as a run's data reports
                save_data_report(RunDir(args.output).task_folder(name), task)
        for task in prepared.tasks.values():
            enforce(task.preflight)
        return 0
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        return 130
    except Exception as e:
        if debug:
            raise
        code = _report(e)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # One failed process of a torchrun job leaves at once, so the launcher stops the others. Returning
            # would free the traceback, hence the DDP reducer and its gloo process group, whose destructor joins
            # a worker thread that can be waiting for the GIL this thread holds: a hang, seen in the tests.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def _report(e: Exception) -> int:
    """One clear line for a failure: a TailorError's own message (exit 2); a file the system refused, named
    (exit 2); anything else is a defect of tailorlm's, said as one line with the way to see the traceback (1)."""
    from pathlib import Path

    from rich.markup import escape

    from tailorlm.ui import console

    if isinstance(e, TailorError):
        message, code = str(e), 2
    elif (space := disk_full_errno(e)) is not None:  # a write outside the ones a run reports itself
        filename = getattr(e, "filename", None)
        message = (str(DiskFullError(filename, Path(filename).parent, e)) if filename else
                   f"{no_space(space)}: a write failed; free some space, then run the command again")
        code = 2
    elif isinstance(e, OSError) and e.filename:  # permission denied, read-only folder, ...
        message, code = f"{e.filename}: {e.strerror or e}", 2
    elif isinstance(e, MemoryError):
        message, code = "out of memory; try a smaller train.batch_size or template.max_length", 2
    else:
        text = str(e).splitlines()[0] if str(e) else ""
        message, code = (f"unexpected {type(e).__name__}{': ' + text if text else ''} (a tailorlm bug: run the "
                         f"same command with --debug for the traceback, and report it)"), 1
    rank = torchrun_rank()
    console.quiet = False  # other ranks print nothing else under torchrun, but their errors must show
    console.print(f"[bold red]error{f' (rank {rank})' if rank else ''}:[/] {escape(message)}", soft_wrap=True)
    return code


def torchrun_rank() -> str | None:
    """This process's RANK when torchrun started several, else None (read from the environment, so the CLI
    need not import torch; train/distributed.py joins the process group)."""
    return os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def _torchrun(argv: list[str], nproc: int) -> int:
    """Start this same command on nproc processes under torchrun (single node, a free port found by torchrun)."""
    import subprocess

    if torchrun_rank() is not None:
        raise TailorError("--nproc starts torchrun itself; under torchrun, leave it out")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tailorlm", *rest]
    return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
