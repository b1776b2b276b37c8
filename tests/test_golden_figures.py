"""Golden figures: the first steps of a seeded tiny run, pinned to 1e-5 relative.

A seeded tiny random Llama trains 5 optimizer steps through the one training loop (train.loop.train) on
12 fixed chat samples whose labels carry loss on the completion only. Each logged step's loss, gradient
norm (before clipping) and learning rate must equal the literals below, so an accidental change to the
completion-only loss, the loss mask, the accumulation normalisation, the batch order, AdamW (betas, weight
decay split), the warmup/cosine schedule or gradient clipping fails here, even when the loss still falls.

Regenerating: `.venv/bin/python tests/test_golden_figures.py` prints START and GOLDEN as literals from the
code as it is; paste them over the ones below. A change to these numbers must be deliberate and explained
in its commit message (what changed in the numerics and why); a torch/transformers/peft upgrade may move
them too (START then tells a different starting model from a different training step).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_llama

from tailorlm.config import LoraSpec, MethodSpec, TrainSpec
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.models.methods import make_strategy
from tailorlm.train.loop import train

# Token ids of the suite's tiny tokenizer (conftest.build_tiny_tokenizer, vocabulary 400) for ChatML turns
# "<|im_start|>user\nWhat is the topic? {text}<|im_end|>\n<|im_start|>assistant\n" + "{label}<|im_end|>",
# frozen here so that the figures do not depend on how the tokenizer trains. Every prompt shares its
# opening, so padded batches also take the shared-prefix path of the loss.
VOCAB, PAD = 400, 3
OPEN = [1, 88, 86, 283, 202, 323, 267, 386, 263, 399, 347, 34]
CLOSE = [2, 202, 1, 272, 86, 285, 87, 293, 87, 202]
TEXTS_AND_COMPLETIONS = [
    ([263, 277, 280, 355, 389, 373, 262, 86, 269, 346, 86, 387, 350, 327], [69, 88, 287, 265, 374, 2]),
    ([263, 262, 318, 308, 317, 298, 263, 394, 266, 318], [282, 279, 377, 319, 2]),
    ([263, 277, 284, 285, 279, 224, 70, 292, 79, 298, 278, 395, 339, 274], [83, 367, 329, 2]),
    ([263, 269, 305, 349, 283, 269, 70, 364, 71, 262, 397, 289, 366], [86, 368, 87, 2]),
    ([263, 314, 290, 299, 265, 396, 262, 268, 272, 279, 383, 351], [264, 281, 2]),
    ([290, 371, 353, 276, 337, 268, 364, 330, 306], [69, 88, 287, 265, 374, 2]),
    ([263, 311, 356, 312, 278, 310, 280, 71], [282, 279, 377, 319, 2]),
    ([263, 289, 303, 283, 360, 270, 362, 301, 388, 301, 278, 395, 339, 274, 271, 288, 224, 382], [83, 367, 329, 2]),
    ([263, 291, 325, 312, 263, 277, 267, 281], [86, 368, 87, 2]),
    ([263, 269, 273, 376, 295, 224, 380, 311, 381, 315, 343], [264, 281, 2]),
    ([262, 289, 266, 267, 277, 303, 348], [370, 275, 307, 2]),
    ([278, 310, 340, 79, 311, 356], [265, 344, 354, 2]),
]

STEPS = 5
# Every field that touches the numerics is spelled out, so a changed default elsewhere does not move them.
# warmup_ratio 0.4 of 5 steps = 2 warmup steps, then cosine to 0. Clipping: full's norms (~2) are always
# clipped at 1.0; LoRA's (0.17-0.35) cross 0.25, so its first steps pass unclipped and its later ones not.
# 4x1 and 2x2 see different samples per step (batches are length-grouped by batch_size), so their figures
# differ; that accumulation equals the big batch is tests/test_train_loop.py's concern.
CASES = {
    "full-4x1": dict(method="full", lr=1e-3, batch_size=4, grad_accum=1, clip=1.0),
    "full-2x2": dict(method="full", lr=1e-3, batch_size=2, grad_accum=2, clip=1.0),  # gradient accumulation
    "lora-4x1": dict(method="lora", lr=1e-2, batch_size=4, grad_accum=1, clip=0.25),
    "lora-2x2": dict(method="lora", lr=1e-2, batch_size=2, grad_accum=2, clip=0.25),
}


def samples() -> list[Sample]:
    out = []
    for text, completion in TEXTS_AND_COMPLETIONS:
        prompt = OPEN + text + CLOSE
        out.append(Sample(prompt + completion, [IGNORE] * len(prompt) + completion, {}))
    return out


def spec(case: dict) -> TrainSpec:
    return TrainSpec(max_steps=STEPS, batch_size=case["batch_size"], grad_accum=case["grad_accum"], lr=case["lr"],
                     weight_decay=0.01, warmup_ratio=0.4, schedule="cosine", max_grad_norm=case["clip"], seed=7,
                     eval_every=0, packing="off", compile="off", gradient_checkpointing=False)


def method(case: dict) -> MethodSpec:
    return MethodSpec(name=case["method"], lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                                                         use_dora=False, use_rslora=False))


@contextlib.contextmanager
def deterministic_cpu():
    """One thread (fp32 sums on CPU split their reductions by thread count, which moves the last digits)
    and deterministic kernels; both put back after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(strict, warn_only=warn_only)
        torch.set_num_threads(threads)


def start_fingerprint(model) -> list[float]:
    """Sums of the trainable parameters and of their squares: tells a changed starting model (conftest's
    tiny_llama, library initialisation) from a changed training step when the figures move."""
    params = [p.detach().double() for p in model.parameters() if p.requires_grad]
    return [sum(p.numel() for p in params), float(sum(p.sum() for p in params)),
            float(sum((p * p).sum() for p in params))]


def run_case(case: dict):
    with deterministic_cpu():
        model = tiny_llama(VOCAB, seed=0)
        torch.manual_seed(0)  # LoRA's A matrices draw from the global generator
        strategy = make_strategy(method(case))
        model = strategy.prepare(model)
        start = start_fingerprint(model)
        result = train(model, strategy, samples(), spec(case), case["lr"], PAD, torch.device("cpu"))
    return start, result


# Figures of the code as of this commit (CPU, fp32, one thread); regenerate as the module docstring says.
# START: [trainable parameters, sum, sum of squares]. GOLDEN: per step (step, epoch, loss, grad_norm, lr), tokens.
START = {
    'full-4x1': [31392, 163.76672170310889, 172.4236607018571],
    'full-2x2': [31392, 163.76672170310889, 172.4236607018571],
    'lora-4x1': [4096, 2.8181860326440074, 18.82608624612823],
    'lora-2x2': [4096, 2.8181860326440074, 18.82608624612823],
}
GOLDEN = {
    'full-4x1': {"tokens": 727, "steps": [
        (1, 0.333, 6.039997948540582, 2.3678646087646484, 0.0006666666666666666),
        (2, 0.667, 6.013626547420726, 2.095874309539795, 0.001),
        (3, 1.0, 5.976066589355469, 2.506462335586548, 0.00075),
        (4, 1.333, 5.907150717342601, 2.1317203044891357, 0.0002500000000000001),
        (5, 1.667, 5.852782305549173, 2.411054849624634, 0.0),
    ]},
    'full-2x2': {"tokens": 740, "steps": [
        (1, 0.333, 6.024254294002757, 2.111490488052368, 0.0006666666666666666),
        (2, 0.667, 6.01461470754523, 2.019422769546509, 0.001),
        (3, 1.0, 5.990255117416382, 2.2157251834869385, 0.00075),
        (4, 1.333, 5.89753502293637, 2.0574240684509277, 0.0002500000000000001),
        (5, 1.667, 5.852542428409352, 2.1252737045288086, 0.0),
    ]},
    'lora-4x1': {"tokens": 727, "steps": [
        (1, 0.333, 6.039997948540582, 0.1737951934337616, 0.006666666666666666),
        (2, 0.667, 6.018253550809972, 0.1834588199853897, 0.01),
        (3, 1.0, 5.992735918830423, 0.3061724901199341, 0.0075),
        (4, 1.333, 5.95096633013557, 0.332217276096344, 0.0025000000000000014),
        (5, 1.667, 5.890436060288373, 0.34907597303390503, 0.0),
    ]},
    'lora-2x2': {"tokens": 740, "steps": [
        (1, 0.333, 6.024254294002757, 0.202398881316185, 0.006666666666666666),
        (2, 0.667, 6.025180615876851, 0.17985813319683075, 0.01),
        (3, 1.0, 6.0026938915252686, 0.27228185534477234, 0.0075),
        (4, 1.333, 5.9508309615285775, 0.30478161573410034, 0.0025000000000000014),
        (5, 1.667, 5.898905361399931, 0.3281632661819458, 0.0),
    ]},
}

# Repeated runs here agree bit for bit (one thread, fp32, deterministic kernels). The same run on 2 threads
# differs by at most 2e-7 relative; another CPU's kernels may differ a little more. 1e-5 leaves room for
# that and still catches small changes: clipping LoRA at 0.25 instead of not at all moves its step-4 loss
# by 4e-5 and its step-5 grad norm by 4e-3.
REL = 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_first_steps_match_the_golden_figures(name):
    start, result = run_case(CASES[name])
    n, total, squares = START[name]
    assert start[0] == n and start[1:] == pytest.approx([total, squares], rel=1e-6), (
        f"{name}: the starting model changed (conftest.tiny_llama or the library's initialisation), not the "
        "training step; regenerate the figures if that is intended")
    golden = GOLDEN[name]
    got = [(r["step"], r["epoch"], r["loss"], r["grad_norm"], r["lr"]) for r in result.train_loss]
    assert [g[0] for g in got] == [g[0] for g in golden["steps"]] == list(range(1, STEPS + 1))
    assert [g[1] for g in got] == [g[1] for g in golden["steps"]], "epoch positions (the batch plan) changed"
    assert [g[4] for g in got] == [g[4] for g in golden["steps"]], "the learning-rate schedule changed"
    assert [g[2] for g in got] == pytest.approx([g[2] for g in golden["steps"]], rel=REL), "train loss changed"
    assert [g[3] for g in got] == pytest.approx([g[3] for g in golden["steps"]], rel=REL), "grad norm changed"
    assert result.tokens == golden["tokens"], "real tokens seen changed (batching or padding)"
    assert result.completed == STEPS


def test_two_runs_agree_bit_for_bit():
    """The precondition of pinning: the same seed gives the same figures, exactly."""
    a = run_case(CASES["lora-2x2"])[1].train_loss
    b = run_case(CASES["lora-2x2"])[1].train_loss
    assert a == b


if __name__ == "__main__":  # regenerate: print the literals for START and GOLDEN
    import io
    import sys
    from contextlib import redirect_stdout

    starts, goldens = {}, {}
    for name, case in CASES.items():
        with redirect_stdout(io.StringIO()):
            start, result = run_case(case)
        starts[name] = start
        goldens[name] = {"steps": [(r["step"], r["epoch"], r["loss"], r["grad_norm"], r["lr"])
                                   for r in result.train_loss], "tokens": result.tokens}
    out = sys.stdout
    out.write("START = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in starts.items()) + "}\n")
    out.write("GOLDEN = {\n")
    for name, g in goldens.items():
        out.write(f"    {name!r}: {{\"tokens\": {g['tokens']}, \"steps\": [\n")
        out.write("".join(f"        {s!r},\n" for s in g["steps"]))
        out.write("    ]},\n")
    out.write("}\n")
