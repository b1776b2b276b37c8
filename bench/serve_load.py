"""Load test of `tailor serve`: N concurrent clients (the official openai client) against a live server.

    python bench/serve_load.py [--model default] [--clients 4] [--requests 4] [--max-tokens 32]
    python bench/serve_load.py --mode misbehaving [--misbehaving 1] [--max-tokens-limit 2048]
    python bench/serve_load.py --mode engines [--model default] [--threads 2]

Each client sends its requests one after another (greedy chat completions, as a fine-tuned model is used);
all clients run at once.

--mode batching (the default): the same load runs twice on one server, with batching (--max-batch, queued
greedy requests generated together) and with --max-batch 1 (one request at a time), and the answers of the two
are compared. Reports p50/p95 latency, generated tokens/s, requests/s and errors, and writes the table as the
`serve` section of BENCHMARKS.md (--markdown '' to skip).

--mode misbehaving: the same well-behaved load runs alone (clean), then with misbehaving clients mixed in
(--misbehaving of each kind): leavers, which ask for the largest max_tokens the server allows and disconnect
after 0.5 to 2 s (non-streamed and streamed in turn); hogs, which ask for that many tokens and wait for all of
them; and slow readers, which stream 128 tokens through a 4 KiB receive buffer read 256 bytes at a time every
0.25 s. Reports the well-behaved clients' p50/p95 in both runs (the target: mixed p95 within 2x of clean) and
writes the `serve-misbehaving` section.

--mode engines: the same load on the PyTorch engine (batched) and on the llama.cpp engine (`tailor serve
--engine llamacpp`), each behind its own server, on the same file: for `default`, the embedded GGUF itself
(llama.cpp runs its quantized weights as they are, PyTorch dequantizes them); for a run, its GGUF export.
Reports both engines' latency and tokens/s and how many answers are identical; writes the `serve-engines`
section.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import threading
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


LONG_ASK = "Write a very long story about a sailor who travels around the world, with many chapters."


def _send(address: tuple[str, int], body: dict, receive_buffer: int | None = None) -> socket.socket:
    """POST a chat request over a plain socket (Connection: close), so the client can walk away or read slowly."""
    data = json.dumps(body).encode()
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:  # set before connecting, so the TCP window stays this small
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    connection.settimeout(0.25)  # recv() wakes up to see the stop signal
    connection.connect(address)
    connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    return connection


def _read_to_end(connection: socket.socket, stop: threading.Event, size: int = 65536, pause_s: float = 0.0) -> bool:
    """Read the reply until the server closes the connection; False when stop came first."""
    while not stop.is_set():
        try:
            if not connection.recv(size):
                return True
        except socket.timeout:
            continue
        if pause_s:
            stop.wait(pause_s)
    return False


def misbehave(kind: str, address: tuple[str, int], model: str, limit: int, stop: threading.Event,
              seed: int) -> dict:
    """One misbehaving client, request after request until stop: 'leaver', 'hog' or 'slow reader'."""
    rng, sent, finished = random.Random(seed), 0, 0
    while not stop.is_set():
        question = rng.choice(QUESTIONS)
        body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": limit}
        if kind == "leaver":
            connection = _send(address, {**body, "stream": sent % 2 == 1})
            stop.wait(rng.uniform(0.5, 2.0))
        elif kind == "hog":
            connection = _send(address, {**body, "messages": [{"role": "user", "content": LONG_ASK}]})
            finished += _read_to_end(connection, stop)
        else:
            connection = _send(address, {**body, "max_tokens": 128, "stream": True}, receive_buffer=4096)
            finished += _read_to_end(connection, stop, size=256, pause_s=0.25)
        connection.close()
        sent += 1
    return {"kind": kind, "sent": sent, "finished": finished}


def run_mixed(client, engine, address: tuple[str, int], model: str, args) -> dict:
    """The well-behaved load with misbehaving clients of every kind running meanwhile (stopped when it ends)."""
    stop, cancels = threading.Event(), len(engine.cancelled)
    kinds = [kind for kind in ("leaver", "hog", "slow reader") for _ in range(args.misbehaving)]
    with ThreadPoolExecutor(len(kinds)) as pool:
        bad = [pool.submit(misbehave, kind, address, model, args.max_tokens_limit, stop, seed)
               for seed, kind in enumerate(kinds)]
        time.sleep(2)  # every misbehaving client has a request in the server before the measured load starts
        result = run_load(client, model, args.clients, args.requests, args.max_tokens)
        stop.set()
        result["misbehaving"] = [b.result() for b in bad]
    time.sleep(1)  # the server notices the last disconnects at its next poll and cancels their generations
    result["cancelled"] = engine.cancelled[cancels:]
    return result


def misbehaving_section(args, clean: dict, mixed: dict, where: str, name: str, load_s: float) -> str:
    ratio = mixed["p95_s"] / clean["p95_s"]
    lines = ["| run | well-behaved requests | errors | p50 latency s | p95 latency s | p95 vs clean |",
             "|---|---|---|---|---|---|"]
    for label, r in (("clean", clean), ("with misbehaving clients", mixed)):
        lines.append(f"| {label} | {r['requests']} | {len(r['errors'])} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r['p95_s'] / clean['p95_s']:.2f}x |")
    counts = {}
    for b in mixed["misbehaving"]:
        counts.setdefault(b["kind"], [0, 0])
        counts[b["kind"]][0] += b["sent"]
        counts[b["kind"]][1] += b["finished"]
    cancelled = mixed["cancelled"]
    behaviour = "; ".join(f"{kind}s sent {sent} requests ({done} read to the end)" if kind != "leaver"
                          else f"leavers sent {sent} requests" for kind, (sent, done) in counts.items())
    tokens = (f" (tokens generated before the cancel: median {statistics.median(cancelled):.0f}, most "
              f"{max(cancelled)})" if cancelled else "")
    command = (f"python bench/serve_load.py --mode misbehaving --misbehaving {args.misbehaving} --clients "
               f"{args.clients} --requests {args.requests} --max-tokens {args.max_tokens} --max-tokens-limit "
               f"{args.max_tokens_limit}{f' --threads {args.threads}' if args.threads else ''}")
    verdict = "within" if ratio <= 2 else "NOT within"
    return (f"<!-- bench:serve-misbehaving -->\n### Server under misbehaving clients: `tailor serve {args.model}`\n\n"
            f"Measured {date.today().isoformat()} on {where} by `{command}` (model {name}, loaded in {load_s:.0f} s). "
            f"Well-behaved: {args.clients} clients x {args.requests} greedy chat completions of up to "
            f"{args.max_tokens} tokens, alone (clean), then with {args.misbehaving} misbehaving client(s) of each "
            f"kind: leavers (max_tokens {args.max_tokens_limit}, the server's limit; disconnect after 0.5-2 s), "
            f"hogs (max_tokens {args.max_tokens_limit}, read the whole answer), slow readers (streamed, 128 "
            f"tokens, 1 KiB/s through a 4 KiB receive buffer). During the mixed run {behaviour}; the server "
            f"cancelled {len(cancelled)} requests whose clients had gone{tokens}. Well-behaved p95 "
            f"{ratio:.2f}x the clean run: {verdict} the 2x target.\n\n" + "\n".join(lines)
            + "\n<!-- /bench:serve-misbehaving -->")


def batching_section(args, results: dict, where: str, name: str, load_s: float) -> str:
    batched, single = results.values()
    agree = sum(a == b for a, b in zip(batched["answers"], single["answers"])) / len(batched["answers"])
    lines = ["| server | requests | errors | p50 latency s | p95 latency s | generated tokens/s | requests/s | "
             "mean batch |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['requests']} | {len(r['errors'])} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['mean_batch']:.1f} |")
    return (f"<!-- bench:serve -->\n### Serving load: `tailor serve {args.model}`, {args.clients} concurrent clients x "
            f"{args.requests} requests\n\nMeasured {date.today().isoformat()} on {where} by "
            f"`python bench/serve_load.py --clients {args.clients} --requests {args.requests} "
            f"--max-tokens {args.max_tokens}"
            f"{f' --threads {args.threads}' if args.threads else ''}`: greedy chat "
            f"completions of up to {args.max_tokens} tokens through the official openai client, each client sending "
            f"its requests one after another, all clients at once (model {name}, loaded in {load_s:.0f} s). "
            f"Batched and one-at-a-time answers identical for {agree:.0%} of requests.\n\n"
            + "\n".join(lines) + "\n<!-- /bench:serve -->")


def compare_engines(args, torch_engine, name: str, torch_load_s: float) -> None:
    """The same load on the PyTorch engine and on llama.cpp over the same model file (or the run's GGUF)."""
    import torch
    from openai import OpenAI

    from tailorlm.models.loading import default_model_path
    from tailorlm.serve.llamacpp import load_llamacpp_engine
    from tailorlm.serve.server import BackgroundServer, create_app

    t0 = time.perf_counter()
    served = str(default_model_path()) if args.model == "default" else args.model
    llamacpp, _ = load_llamacpp_engine(served, args.threads or torch.get_num_threads())
    llamacpp_load_s = time.perf_counter() - t0
    results = {}
    for label, engine, load_s in ((f"PyTorch (batched, --max-batch {args.max_batch})", torch_engine, torch_load_s),
                                  ("llama.cpp (--engine llamacpp)", llamacpp, llamacpp_load_s)):
        with BackgroundServer(create_app(engine, name)) as server:
            client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0)  # warm-up
            results[label] = {**run_load(client, name, args.clients, args.requests, args.max_tokens),
                              "load_s": load_s}
        engine.close()
    (pt, lc) = results.values()
    same = sum(a == b for a, b in zip(pt["answers"], lc["answers"]))
    lines = ["| engine | load s | requests | errors | p50 latency s | p95 latency s | generated tokens/s | "
             "requests/s |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['load_s']:.0f} | {r['requests']} | {len(r['errors'])} | {r['p50_s']:.2f} | "
                     f"{r['p95_s']:.2f} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} |")
    body = (f"<!-- bench:serve-engines -->\n### Serving engines: `tailor serve {args.model}` in PyTorch and in "
            f"llama.cpp\n\nMeasured {date.today().isoformat()} on {os.cpu_count()}-core CPU, "
            f"{args.threads or torch.get_num_threads()} thread(s) for each engine, by `python bench/serve_load.py --mode engines --model "
            f"{args.model} --clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens}"
            f"{f' --threads {args.threads}' if args.threads else ''}`: greedy chat completions through the "
            f"official openai client, {args.clients} clients at once, the engines one after the other (file "
            f"{Path(served).name}). Identical answers: {same} of {len(pt['answers'])}.\n\n"
            + "\n".join(lines) + "\n<!-- /bench:serve-engines -->")
    print(body)
    if args.markdown:
        from bench.report import replace_section

        replace_section(Path(args.markdown), "serve-engines", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["batching", "misbehaving", "engines"], default="batching")
    parser.add_argument("--model", default="default", help="a run directory or a model (default: SmolLM2-135M)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--misbehaving", type=int, default=1,
                        help="misbehaving clients of each kind (mode misbehaving)")
    parser.add_argument("--max-tokens-limit", type=int, default=2048,
                        help="the server's max_tokens limit (default 2048, as tailor serve's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own); on a CPU shared with other jobs, 1 thread "
                             "avoids threads waiting on each other")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file to update ('' to skip)")
    args = parser.parse_args()

    import torch
    from openai import OpenAI

    from tailorlm.models.loading import quiet_library_logs
    from tailorlm.ops.engines import open_engine
    from tailorlm.serve.server import BackgroundServer, Limits, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    quiet_library_logs()
    opened = open_engine(args.model, device=args.device, max_batch=args.max_batch)
    load_s = time.perf_counter() - t0
    engine, name = opened.engine, opened.name
    if args.mode == "engines":
        return compare_engines(args, engine, name, load_s)
    results = {}
    with BackgroundServer(create_app(engine, name, Limits(max_tokens=args.max_tokens_limit))) as server:
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0)  # warm-up: first-call allocations are not load
        if args.mode == "misbehaving":
            results["clean"] = run_load(client, name, args.clients, args.requests, args.max_tokens)
            results["mixed"] = run_mixed(client, engine, (server.host, server.port), name, args)
        else:
            for label, max_batch in ((f"batched (--max-batch {args.max_batch})", args.max_batch),
                                     ("one at a time", 1)):
                engine.max_batch = max_batch
                calls_before = len(engine.batch_sizes)
                results[label] = run_load(client, name, args.clients, args.requests, args.max_tokens)
                sizes = engine.batch_sizes[calls_before:]
                results[label]["mean_batch"] = sum(sizes) / max(len(sizes), 1)
    engine.close()

    where = (torch.cuda.get_device_name() if engine.device.type == "cuda"
             else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch thread(s), fp32")
    if args.mode == "misbehaving":
        section, body = "serve-misbehaving", misbehaving_section(args, results["clean"], results["mixed"], where,
                                                                 name, load_s)
    else:
        section, body = "serve", batching_section(args, results, where, name, load_s)
    print(body)
    for label, r in results.items():
        for error in r["errors"][:5]:
            print(f"{label}: {error}", file=sys.stderr)
    if args.markdown:
        from bench.report import replace_section

        replace_section(Path(args.markdown), section, body)


if __name__ == "__main__":
    main()
