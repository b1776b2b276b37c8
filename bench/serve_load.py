"""Load test of `tailor serve`: N concurrent clients (the official openai client) against a live server.

    python bench/serve_load.py [--model default] [--clients 4] [--requests 4] [--max-tokens 32]

Each client sends its requests one after another (greedy chat completions, as a fine-tuned model is used);
all clients run at once. The same load runs twice on one server: with batching (--max-batch, queued greedy
requests generated together) and with --max-batch 1 (one request at a time), and the answers of the two
are compared. Reports p50/p95 latency, generated tokens/s, requests/s and errors, and writes the table as
the `serve` section of BENCHMARKS.md (--markdown '' to skip).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?", "Name three colours of the rainbow.", "Write one sentence about the sea.",
    "What do bees make?", "Give a synonym for happy.", "How many days are in a week?",
    "What is two plus three?", "Describe a cat in five words.", "Which planet is closest to the sun?",
    "What is the opposite of cold?", "Name a fruit that is yellow.", "What language is spoken in Spain?",
    "Say hello in a friendly way.", "What is water made of?", "Name a musical instrument.", "Why is the sky blue?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(client, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """Every client asks its questions in turn; all clients at once. Latency per request, tokens, errors."""
    def one_client(c: int) -> list[tuple]:
        results = []
        for r in range(requests):
            question = QUESTIONS[(c * requests + r) % len(QUESTIONS)]
            start = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                       max_tokens=max_tokens, temperature=0)
                results.append((time.perf_counter() - start, reply.usage.completion_tokens,
                                reply.choices[0].message.content, None))
            except Exception as e:  # counted, not fatal: the point is to see whether any request fails
                results.append((time.perf_counter() - start, 0, None, f"{type(e).__name__}: {e}"))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    flat = [r for rs in per_client for r in rs]
    latencies = [r[0] for r in flat if r[3] is None] or [float("nan")]
    tokens = sum(r[1] for r in flat)
    return {"wall_s": wall, "requests": len(flat), "errors": [r[3] for r in flat if r[3]],
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95),
            "tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(flat) / wall,
            "answers": [r[2] for r in flat]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a run directory or a model (default: SmolLM2-135M)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own); on a CPU shared with other jobs, 1 thread "
                             "avoids threads waiting on each other")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file to update ('' to skip)")
    args = parser.parse_args()

    import torch
    from openai import OpenAI

    from tailorlm.serve.command import load_engine, model_id
    from tailorlm.serve.server import BackgroundServer, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine, trained = load_engine(args.model, args.device, args.max_batch)
    load_s = time.perf_counter() - t0
    name = model_id(args.model, trained)
    results = {}
    with BackgroundServer(create_app(engine, name)) as server:
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0)  # warm-up: first-call allocations are not load
        for label, max_batch in ((f"batched (--max-batch {args.max_batch})", args.max_batch), ("one at a time", 1)):
            engine.max_batch = max_batch
            calls_before = len(engine.batch_sizes)
            results[label] = run_load(client, name, args.clients, args.requests, args.max_tokens)
            sizes = engine.batch_sizes[calls_before:]
            results[label]["mean_batch"] = sum(sizes) / max(len(sizes), 1)
    engine.close()

    batched, single = results.values()
    agree = sum(a == b for a, b in zip(batched["answers"], single["answers"])) / len(batched["answers"])
    where = (torch.cuda.get_device_name() if engine.device.type == "cuda"
             else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch thread(s), fp32")
    lines = ["| server | requests | errors | p50 latency s | p95 latency s | generated tokens/s | requests/s | "
             "mean batch |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['requests']} | {len(r['errors'])} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['mean_batch']:.1f} |")
    body = (f"<!-- bench:serve -->\n### Serving load: `tailor serve {args.model}`, {args.clients} concurrent clients x "
            f"{args.requests} requests\n\nMeasured {date.today().isoformat()} on {where} by `python bench/serve_load.py "
            f"--clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens}"
            f"{f' --threads {args.threads}' if args.threads else ''}`: greedy chat "
            f"completions of up to {args.max_tokens} tokens through the official openai client, each client sending "
            f"its requests one after another, all clients at once (model {name}, loaded in {load_s:.0f} s). "
            f"Batched and one-at-a-time answers identical for {agree:.0%} of requests.\n\n"
            + "\n".join(lines) + "\n<!-- /bench:serve -->")
    print(body)
    for label, r in results.items():
        for error in r["errors"][:5]:
            print(f"{label}: {error}", file=sys.stderr)
    if args.markdown:
        from bench.report import replace_section

        replace_section(Path(args.markdown), "serve", body)


if __name__ == "__main__":
    main()
