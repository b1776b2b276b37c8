"""`tailor chat`, `tailor predict` and `tailor serve`: use a finished run (or any model) for inference.

Each verb loads the model through models/trained.py, so it sees the run's base model, trained weights,
template and chat format exactly as evaluation did. A LoRA adapter is merged into the base weights on load:
the same function, one matmul per layer instead of two.
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


def model_id(path: str, trained) -> str:
    """The name clients use: the run directory's name, or the model file or folder name."""
    if trained.run_dir is not None:
        return Path(path).resolve().name
    return Path(trained.base_source).name


def load_engine(path: str, device_name: str, max_batch: int = 8, trust_remote_code: bool = False):
    from tailorlm.models.loading import quiet_library_logs, resolve_device
    from tailorlm.models.trained import load_trained
    from tailorlm.serve.engine import Engine
    from tailorlm.ui import console

    quiet_library_logs()
    device = resolve_device(device_name)
    with console.status(f"Loading {path} ..."):
        trained = load_trained(path, device, merge=True, trust_remote_code=trust_remote_code)
    return Engine(trained.model, trained.tokenizer, trained.chat_format(), device, max_batch), trained


def run_chat_verb(args) -> int:
    import sys

    from tailorlm.serve.chat import ChatSession, run_chat
    from tailorlm.serve.engine import Sampling

    engine, _ = load_engine(args.model, args.device, trust_remote_code=args.trust_remote_code)
    try:
        return run_chat(ChatSession(engine, Sampling(args.max_new_tokens, args.temperature), args.system),
                        sys.stdin, sys.stdout)
    finally:
        engine.close()


def run_predict_verb(args) -> int:
    from tailorlm.errors import TailorError
    from tailorlm.eval.report import TITLES, format_metric
    from tailorlm.models.loading import quiet_library_logs, resolve_device
    from tailorlm.models.trained import is_run_dir, load_trained
    from tailorlm.serve.predict import predict
    from tailorlm.ui import console

    if not is_run_dir(args.model):  # before loading any weights: the template comes from the run
        raise TailorError(f"{args.model}: not a run directory (config.yaml and run.json); `tailor predict` renders "
                          f"rows with a run's template, so give it a directory written by `tailor run` "
                          f"(for a plain model use `tailor chat` or `tailor serve`)")
    quiet_library_logs()
    device = resolve_device(args.device)
    with console.status(f"Loading {args.model} ..."):
        trained = load_trained(args.model, device, merge=True, trust_remote_code=args.trust_remote_code)
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
        from tailorlm.serve.llamacpp import load_llamacpp_engine

        with console.status(f"Loading {args.model} in llama.cpp ..."):
            engine, name = load_llamacpp_engine(args.model, args.threads)
    else:
        engine, trained = load_engine(args.model, args.device, args.max_batch,
                                      trust_remote_code=args.trust_remote_code)
        name = model_id(args.model, trained)
    console.print(f"Serving '{name}' at http://{args.host}:{args.port}/v1 (OpenAI API; Ctrl-C stops)")
    serve(engine, name, args.host, args.port, Limits(args.max_tokens_limit, args.queue_timeout))
    return 0
