"""`tailor serve --engine llamacpp`: a run's exported GGUF (or any .gguf file) served through llama.cpp,
behind the same OpenAI-compatible API as the PyTorch engine.

Everything around generation is the PyTorch engine's (engine.py): the queue, prompts rendered with the run's
tokenizer and chat format, limits, cancellation, streaming. Only the run differs. llama-cpp-python runs one
sequence at a time in one context, so each request runs alone (no batching). A greedy run still gives the
model to waiting requests after `slice_tokens`; resumed, it continues from its prompt and the tokens so far,
and llama.cpp reuses whatever prefix of them its KV cache still holds (what it recomputes can round apart on a
near tie). Sampled runs do not pause: llama.cpp's sampler keeps its random state only within one call; it
applies top_p before the temperature (transformers after), so sampled answers follow another distribution
than the PyTorch engine's at the same settings. A run ends on any token llama.cpp counts as ending generation
(end of text, end of turn) and on the tokenizer's end token, as the PyTorch engine ends on its own set.

Prompts are token ids from the run's own tokenizer; the GGUF carries the same vocabulary (export/gguf_writer.py
writes it from that tokenizer), so both engines see the same ids and greedy answers are the same text where the
file computes what the PyTorch model does (`tailor export --verify` checks that).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable

import torch

from tailorlm.config import ModelSpec, RunConfig
from tailorlm.data.tokenize import ChatFormat
from tailorlm.errors import TailorError
from tailorlm.rundir import RunDir
from tailorlm.serve.engine import Engine
from tailorlm.serve.jobs import Completion, Job, cut_at_stop, stop_in_tail

MAX_CONTEXT = 8192  # the KV cache is sized for the whole context up front; a 128k model would take gigabytes


class LlamaCppRun:
    """One request's generation in llama.cpp, with the interface of jobs.Run that the engine's worker drives."""

    def __init__(self, job: Job, tokenizer, ends: Callable[[int], bool], on_cancel: Callable[[int], None]):
        self.jobs, self.job, self.tokenizer = [job], job, tokenizer
        self.ends, self.on_cancel = ends, on_cancel
        self.generated: list[int] = []
        self.paused = False
        if job.streamer is not None:
            job.streamer.put(torch.tensor([job.prompt_ids]))  # the streamer skips the first ids as the prompt

    def end_cancelled(self) -> bool:
        """End the request if its client left while it waited; False when it has ended."""
        if self.job.cancelled.is_set():
            self._end(hit_stop=False)
            return False
        return True

    def turn(self, llm, slice_tokens: int, others_waiting: Callable[[], bool]) -> None:
        sampling = self.job.sampling
        if sampling.greedy:
            decoding = dict(temp=0.0)
        else:
            llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
            decoding = dict(temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0)
        started, self.paused = len(self.generated), False
        for token in llm.generate(self.job.prompt_ids + self.generated, reset=True, repeat_penalty=1.0, **decoding):
            self.generated.append(token)
            if self.job.streamer is not None:
                self.job.streamer.put(torch.tensor([token]))
            if self.ends(token) or stop_in_tail(self.tokenizer, self.generated, self.job.sampling.stop):
                return self._end(hit_stop=True)
            if len(self.generated) >= sampling.max_new_tokens or self.job.cancelled.is_set():
                return self._end(hit_stop=False)
            if sampling.greedy and len(self.generated) - started >= slice_tokens and others_waiting():
                self.paused = True
                return
        self._end(hit_stop=False)  # the context is full

    def fail(self, error: BaseException) -> None:
        self.paused = False
        if not self.job.future.done():
            self.job.future.set_exception(error)
        self.job.end_stream()

    def _end(self, hit_stop: bool) -> None:
        job, n_new = self.job, len(self.generated)
        text, cut = cut_at_stop(self.tokenizer.decode(self.generated, skip_special_tokens=True), job.sampling.stop)
        if job.cancelled.is_set() and not hit_stop:
            self.on_cancel(n_new)
        if not job.future.done():
            job.future.set_result(Completion(text, len(job.prompt_ids), n_new, "stop" if hit_stop or cut else "length"))
        self.paused = False
        job.end_stream()


class LlamaCppEngine(Engine):
    """The serving engine over a GGUF file in llama.cpp (CPU), one request at a time."""

    unsupported = {param: f"{param} is not supported by the llama.cpp engine (--engine llamacpp); serve the run "
                          f"with the PyTorch engine (--engine torch) for it"
                   for param in ("logprobs", "response_format")}

    def __init__(self, gguf_path: str | Path, tokenizer, fmt: ChatFormat, threads: int | None = None,
                 slice_tokens: int = 32):
        try:
            import llama_cpp
        except ImportError as e:
            raise TailorError(f"--engine llamacpp needs llama-cpp-python (pip install llama-cpp-python): {e}") from None
        try:
            self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=min(_trained_context(gguf_path), MAX_CONTEXT),
                                       n_threads=threads or os.cpu_count(), n_gpu_layers=0, verbose=False)
        except (ValueError, RuntimeError) as e:  # llama.cpp could not load the file
            raise TailorError(f"{gguf_path}: llama.cpp cannot load this file: {e}") from None
        self.model, self.tokenizer, self.fmt, self.device = self.llm, tokenizer, fmt, torch.device("cpu")
        self.max_batch, self.slice_tokens = 1, slice_tokens
        self.end_ids = sorted({i for i in (tokenizer.eos_token_id, self.llm.token_eos()) if i is not None and i >= 0})
        vocab = self.llm._model.vocab
        self._ends = lambda token: token in self.end_ids or bool(llama_cpp.llama_vocab_is_eog(vocab, token))
        self.context_length, self.vocab_size = self.llm.n_ctx(), self.llm.n_vocab()
        self._start()

    def _new_run(self, jobs: list[Job]) -> LlamaCppRun:
        return LlamaCppRun(jobs[0], self.tokenizer, self._ends, self.cancelled.append)

    def close(self) -> None:
        super().close()
        if not self._worker.is_alive():  # a worker still inside llama.cpp keeps its context (freed at exit)
            self.llm.close()


def _trained_context(gguf_path: str | Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    arch = reader.fields.get("general.architecture")
    name = bytes(arch.parts[-1]).decode() if arch else ""
    field = reader.fields.get(f"{name}.context_length")
    return int(field.parts[-1][0]) if field else 2048


def load_llamacpp_engine(path: str, threads: int | None = None) -> tuple[LlamaCppEngine, str]:
    """(engine, model id) for a .gguf file ('default': the embedded model's), or a run directory holding a GGUF
    export (f16 preferred)."""
    from tailorlm.models.loading import default_model_path, load_tokenizer

    path = str(default_model_path()) if path == "default" else path
    run = RunDir(path)
    if run.is_run():
        run.require_complete("tailor serve --engine llamacpp", "serving")
        exports = sorted((run.path / "export").glob("gguf*/*.gguf"), key=lambda p: (not p.name.endswith("-f16.gguf"), str(p)))
        if not exports:
            raise TailorError(f"{path}: no GGUF export in this run; write one first: tailor export {path} --format gguf")
        cfg = run.config()
        weights = run.weights()
        spec = cfg.model.model_copy(update={"path": str(weights)}) if weights.name == "model" else cfg.model
        tokenizer = load_tokenizer(spec, weights_follow=False)  # llama.cpp reads the weights
        return LlamaCppEngine(exports[0], tokenizer, ChatFormat(tokenizer, cfg.template), threads), run.path.resolve().name
    if not str(path).endswith(".gguf") or not Path(path).is_file():
        raise TailorError(f"{path}: --engine llamacpp serves a .gguf file or a run directory with a GGUF export")
    spec = ModelSpec(path=str(path))
    tokenizer = load_tokenizer(spec, weights_follow=False)  # llama.cpp reads the weights
    return LlamaCppEngine(path, tokenizer, ChatFormat(tokenizer, RunConfig(model=spec).template), threads), Path(path).name
