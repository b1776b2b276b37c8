"""`tailor chat`, `tailor predict` and `tailor serve`: use a finished run (or any model) for inference.

Each verb loads the model through ops/engines.py, as the API and the studio do, so it sees the run's base
model, trained weights, template and chat format exactly as evaluation did.
"""
from __future__ import annotations

import argparse
from pathlib import Path

MODEL_HELP = "a run directory written by `tailor run`, a Hugging Face model folder, a .gguf file, or 'default'"


def register(verbs) -> None:
    chat = verbs.add_parser("chat", help="talk to a model in the terminal (answers stream as they are generated)",
                            description="Interactive chat. /reset clears the history, /system TEXT sets the system "
                                        "prompt, /exit or Ctrl-D quits.")
    chat.add_argument("model", metavar="MODEL_OR_RUN", help=MODEL_HELP)
    chat.add_argument("--system", help="system prompt (default: the run's template.system, else the template's own)")
    chat.add_argument("--max-new-tokens", type=_positive, default=256, help="longest answer in tokens (default 256)")
    chat.add_argument("--temperature", type=_temperature, default=0.0,
                      help="0 (the default) decodes greedily, as evaluation does; above 0 samples")
    chat.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    chat.set_defaults(handler=run_chat_verb)

    predict = verbs.add_parser("predict", help="predict every row of a data file with a finished run's model",
                               description="Batch inference with the run's template: one JSON line per row "
                                           "(row, where, input, generated, predicted, and expected when the "
                                           "file has labels).")
    predict.add_argument("model", metavar="RUN", help="a run directory written by `tailor run`")
    predict.add_argument("data", metavar="DATA", help="a data file, read with the run's data settings")
    predict.add_argument("--output", "-o", required=True, type=Path, help="the predictions file (.jsonl)")
    predict.add_argument("--batch-size", type=_positive,
                         help="rows generated together (default: the run's eval.batch_size)")
    predict.add_argument("--limit", type=_positive, help="only the first N rows")
    predict.add_argument("--task", help="which task of a multi-task run")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    predict.set_defaults(handler=run_predict_verb)

    serve = verbs.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    serve.add_argument("model", metavar="MODEL_OR_RUN", help=MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=_positive, default=8,
                       help="greedy requests generated together at most (default 8; 1 turns batching off)")
    serve.add_argument("--max-tokens-limit", type=_positive, default=2048,
                       help="the largest max_tokens a request may ask for; more is a 400 naming the limit "
                            "(default 2048; a request without max_tokens gets min(its default, this))")
    serve.add_argument("--queue-timeout", type=_positive_seconds, default=60.0,
                       help="seconds a request may wait for the model before a 503 with Retry-After (default 60)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (the torch engine)")
    serve.add_argument("--engine", choices=["torch", "llamacpp"], default="torch",
                       help="torch (default): the model in PyTorch, batched; llamacpp: the run's exported GGUF "
                            "(or a .gguf file) in llama.cpp on the CPU, one request at a time "
                            "(needs llama-cpp-python; export first with `tailor export RUN --format gguf`)")
    serve.add_argument("--threads", type=_positive, help="CPU threads for --engine llamacpp (default: all)")
    serve.set_defaults(handler=run_serve_verb)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {text}")
    return value


def load_engine(path: str, device_name: str, max_batch: int = 8, trust_remote_code: bool = False):
    """The PyTorch engine for a run or model (ops.engines.OpenedEngine), loaded under a status line."""
    from tailorlm.models.loading import quiet_library_logs
    from tailorlm.ops.engines import open_engine
    from tailorlm.ui import console

    quiet_library_logs()
    with console.status(f"Loading {path} ..."):
        return open_engine(path, device=device_name, max_batch=max_batch, trust_remote_code=trust_remote_code)


def run_chat_verb(args) -> int:
    import sys

    from tailorlm.serve.chat import ChatSession, run_chat
    from tailorlm.serve.engine import Sampling

    engine = load_engine(args.model, args.device, trust_remote_code=args.trust_remote_code).engine
    try:
        return run_chat(ChatSession(engine, Sampling(args.max_new_tokens, args.temperature), args.system),
                        sys.stdin, sys.stdout)
    finally:
        engine.close()


def run_predict_verb(args) -> int:
    from tailorlm.errors import TailorError
    from tailorlm.eval.report import TITLES, format_metric
    from tailorlm.models.loading import quiet_library_logs
    from tailorlm.models.trained import is_run_dir
    from tailorlm.ops.engines import load_for_inference
    from tailorlm.serve.predict import predict
    from tailorlm.ui import console

    if not is_run_dir(args.model):  # before loading any weights: the template comes from the run
        raise TailorError(f"{args.model}: not a run directory (config.yaml and run.json); `tailor predict` renders "
                          f"rows with a run's template, so give it a directory written by `tailor run` "
                          f"(for a plain model use `tailor chat` or `tailor serve`)")
    quiet_library_logs()
    with console.status(f"Loading {args.model} ..."):
        trained, device = load_for_inference(args.model, args.device, args.trust_remote_code)
    summary = predict(trained, args.data, args.output, args.batch_size, args.limit, args.task, device)
    console.print(f"Wrote {summary['rows']} predictions to {args.output}")
    for reason, count in summary["skipped"].items():
        console.print(f"[yellow]skipped {count} row(s): {reason}[/]")
    if summary["too_long"]:
        console.print(f"[yellow]{summary['too_long']} row(s) longer than template.max_length: no prediction[/]")
    if summary["metrics"]:
        console.print(", ".join(f"{TITLES.get(c, c)} {format_metric(c, summary['metrics'].get(c))}"
                                for c in summary["columns"]))
    return 0


def run_serve_verb(args) -> int:
    from tailorlm.serve.server import Limits, serve
    from tailorlm.ui import console

    if args.engine == "llamacpp":
        from tailorlm.ops.engines import open_engine

        with console.status(f"Loading {args.model} in llama.cpp ..."):
            opened = open_engine(args.model, backend="llamacpp", threads=args.threads)
    else:
        opened = load_engine(args.model, args.device, args.max_batch, trust_remote_code=args.trust_remote_code)
    engine, name = opened.engine, opened.name
    console.print(f"Serving '{name}' at http://{args.host}:{args.port}/v1 (OpenAI API; Ctrl-C stops)")
    serve(engine, name, args.host, args.port, Limits(args.max_tokens_limit, args.queue_timeout))
    return 0
