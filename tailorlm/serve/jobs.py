"""A request's life in the engine: a Job (one request), a Run (one generate() over one or more jobs), a TextStream.

A run gives the model to waiting requests between decode steps: once it has generated `slice_tokens` tokens in a
turn and another request waits, it stops, keeps its KV cache and goes back to the queue behind them. Resumed, it
continues from that cache (and, when sampling, from its saved random state), so its tokens are the ones a single
uninterrupted generate() gives. A long generation delays a short request by one slice, not by its whole length.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                          TextIteratorStreamer)

from tailorlm.serve.json_constraint import JsonConstraint, Node
from tailorlm.serve.logprobs import LogprobTrace, TokenLogprob


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # log-probabilities of the answer's tokens, with this many alternatives each
    json_format: Node | None = None  # response_format: decoding constrained to JSON matching this schema

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token, a stop string, or the JSON document closed) or "length"
    logprobs: list[TokenLogprob] | None = None  # one per token of the text, when asked for


class RowStreamer(TextIteratorStreamer):
    """The text of one streamed job, across every turn of its run.

    generate() ends its streamer whenever a call returns, but a paused run continues the same text later: here
    that end only notes that the next call starts by putting its input ids (skipped as prompt); finish() ends it."""

    def end(self) -> None:
        self.next_tokens_are_prompt = True

    def finish(self) -> None:
        super().end()


@dataclass(eq=False)  # compared by identity: the queue removes this job, not an equal one
class Job:
    """One request: what to generate, and what its client waits on (started, future) or sets (cancelled)."""

    prompt_ids: list[int]
    sampling: Sampling
    streamer: RowStreamer | None = None
    future: Future = field(default_factory=Future)  # the Completion
    started: Future = field(default_factory=Future)  # done once the model takes the job: its queue wait is over
    cancelled: threading.Event = field(default_factory=threading.Event)
    trace: LogprobTrace | None = None  # set by the engine when the job's run starts, if it asked for logprobs
    constraint: JsonConstraint | None = None  # likewise, for a response_format

    @property
    def batchable(self) -> bool:
        # Log-probabilities and JSON masks are kept row by row (_RowLogits), so they do not stop batching.
        return self.sampling.greedy and self.streamer is None

    def cancel(self) -> None:
        """A queued job is skipped; a running or paused one ends at its next decode step (or before resuming)."""
        self.cancelled.set()

    def end_stream(self) -> None:
        if self.streamer is not None:
            self.streamer.finish()


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop string (OpenAI leaves the stop string out), and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def stop_in_tail(tokenizer, generated, stops: tuple[str, ...]) -> bool:
    """Whether the generated tokens have just written a stop string (one ends within the last few tokens, each
    token being at least one character)."""
    if not stops:
        return False
    text = tokenizer.decode(generated[-(max(map(len, stops)) + 4):], skip_special_tokens=True)
    return any(s in text for s in stops)


class _RowStops(StoppingCriteria):
    """Per-row stopping (the end token, the row's stop strings, its own max_new_tokens, a cancel) and pausing.

    A row's Completion is handed over the moment the row ends, so a short request batched with a long one does
    not wait for it. The tokens generate() pads ended rows with are never mistaken for output."""

    def __init__(self, jobs: list[Job], prompt_width: int, end_ids: list[int], tokenizer,
                 on_cancel: Callable[[int], None]):
        self.jobs, self.width, self.tokenizer, self.on_cancel = jobs, prompt_width, tokenizer, on_cancel
        self.end_ids = torch.tensor(end_ids)
        self.ended_at: list[int | None] = [None] * len(jobs)
        self.turn_start, self.slice_tokens, self.pausing = 0, 0, False
        self.others_waiting: Callable[[], bool] = lambda: False

    @property
    def alive(self) -> list[int]:
        return [row for row, end in enumerate(self.ended_at) if end is None]

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.width
        for row in self.alive:
            job, last = self.jobs[row], input_ids[row, -1]
            if job.constraint is not None:
                job.constraint.catch_up(input_ids[row, self.width:])
            if (bool(torch.isin(last, self.end_ids.to(last.device)))
                    or stop_in_tail(self.tokenizer, input_ids[row, self.width:], job.sampling.stop)
                    or (job.constraint is not None and job.constraint.complete)):
                self.end(row, input_ids[row], hit_stop=True)
            elif n_new >= job.sampling.max_new_tokens or job.cancelled.is_set():
                self.end(row, input_ids[row])
        self.pausing = (bool(self.alive) and n_new - self.turn_start >= self.slice_tokens
                        and self.others_waiting())
        return torch.tensor([self.pausing or end is not None for end in self.ended_at], device=input_ids.device)

    def end(self, row: int, row_ids, hit_stop: bool = False) -> None:
        job, n_new = self.jobs[row], len(row_ids) - self.width
        self.ended_at[row] = n_new
        text = self.tokenizer.decode(row_ids[self.width:].tolist(), skip_special_tokens=True)
        text, cut = cut_at_stop(text, job.sampling.stop)
        if job.cancelled.is_set() and not hit_stop:
            self.on_cancel(n_new)
        logprobs = None
        if job.trace is not None:
            if n_new:
                job.trace.settle(int(row_ids[-1]))
            logprobs = job.trace.report(len(text) if cut else None)
        if not job.future.done():
            job.future.set_result(Completion(text, len(job.prompt_ids), n_new, "stop" if hit_stop or cut else "length",
                                             logprobs))

    def keep(self, rows: list[int]) -> None:
        self.jobs, self.ended_at = [self.jobs[r] for r in rows], [self.ended_at[r] for r in rows]


class _RowLogits(LogitsProcessor):
    """Each step's logits, row by row, for the rows that asked: their log-probabilities recorded (before anything
    reshapes the logits: transformers applies temperature and top_p after the processors given to generate),
    then their response_format's mask."""

    def __init__(self, stops: _RowStops):
        self.stops = stops

    def __call__(self, input_ids, scores):
        for row in self.stops.alive:
            job = self.stops.jobs[row]
            if job.trace is not None:
                job.trace.observe(int(input_ids[row, -1]), scores[row])
            if job.constraint is not None:
                job.constraint.catch_up(input_ids[row, self.stops.width:])
                scores[row] = job.constraint.mask(scores[row])
        return scores


class Run:
    """The rows of one generate() call (left-padded: each row's next token sits in the same column), kept
    between turns with their KV cache while paused."""

    def __init__(self, jobs: list[Job], tokenizer, end_ids: list[int], device: torch.device,
                 on_cancel: Callable[[int], None]):
        self.jobs, self.end_ids, self.pad_id, self.device = jobs, end_ids, tokenizer.pad_token_id, device
        width = max(len(j.prompt_ids) for j in jobs)
        self.ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            self.ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            self.mask[row, width - len(job.prompt_ids):] = 1
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        self.stops = _RowStops(jobs, width, end_ids, tokenizer, on_cancel)
        self.cache = None  # the KV cache of every token but the last, from the previous turn
        self.random_state = None  # a sampled run's generator state when it paused
        self.paused = False

    def end_cancelled(self) -> bool:
        """End the rows whose clients left while the run waited; False when no row is left to generate for."""
        for row in self.stops.alive:
            if self.stops.jobs[row].cancelled.is_set():
                self.stops.end(row, self.ids[row])
        if self.stops.alive:
            return True
        self._finish()
        return False

    def turn(self, model, slice_tokens: int, others_waiting: Callable[[], bool]) -> None:
        """Generate until every row has ended, or pause once slice_tokens are generated and others_waiting()."""
        sampling = self.jobs[0].sampling  # batched jobs are all greedy; a sampled job runs alone
        if sampling.greedy:
            decoding = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            decoding = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if self.random_state is not None:  # other runs sampled meanwhile: continue this run's own draws
                _set_random_state(self.device, self.random_state)
            elif sampling.seed is not None:  # only the worker thread draws from the generator, so seeding is exact
                torch.manual_seed(sampling.seed)
        generated = self.ids.shape[1] - self.stops.width
        self.stops.turn_start, self.stops.slice_tokens = generated, slice_tokens
        self.stops.others_waiting = others_waiting
        options = {} if self.cache is None else {"cache": self.cache}
        if any(job.trace is not None or job.constraint is not None for job in self.jobs):
            options["logits_processor"] = LogitsProcessorList([_RowLogits(self.stops)])
        out = model.generate(
            input_ids=self.ids, attention_mask=self.mask, return_dict_in_generate=True, **options,
            max_new_tokens=max(self.jobs[r].sampling.max_new_tokens for r in self.stops.alive) - generated,
            eos_token_id=self.end_ids, pad_token_id=self.pad_id, stopping_criteria=StoppingCriteriaList([self.stops]),
            streamer=self.jobs[0].streamer, num_beams=1, **decoding)
        grown = out.sequences.shape[1] - self.ids.shape[1]
        self.ids, self.cache = out.sequences, out.cache
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.jobs), grown))], dim=1)
        self.paused = self.stops.pausing and bool(self.stops.alive)
        if not self.paused:
            return self._finish()
        if not sampling.greedy:
            self.random_state = _random_state(self.device)
        self._drop_ended_rows()

    def fail(self, error: BaseException) -> None:
        self.paused, self.cache = False, None
        for job in self.jobs:
            if not job.future.done():
                job.future.set_exception(error)
            job.end_stream()

    def _finish(self) -> None:
        for row in self.stops.alive:  # generate() stopped without a row's own stop: cut where it ended
            self.stops.end(row, self.ids[row])
        self.paused, self.cache = False, None
        for job in self.jobs:
            job.end_stream()

    def _drop_ended_rows(self) -> None:
        """Rows already answered leave the batch, so the resumed turns compute only the live ones."""
        alive = self.stops.alive
        if len(alive) == len(self.jobs):
            return
        index = torch.tensor(alive, device=self.ids.device)
        try:
            self.cache.batch_select_indices(index)
        except (AttributeError, NotImplementedError):  # a cache type without row selection keeps every row
            return
        self.ids, self.mask, self.jobs = self.ids[index], self.mask[index], [self.jobs[r] for r in alive]
        self.stops.keep(alive)


def _random_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.mps.get_rng_state() if device.type == "mps" else torch.get_rng_state()


def _set_random_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class TextStream:
    """The text of one streamed generation, piece by piece, with stop strings cut off as OpenAI does.

    Text that could be the start of a stop string is held back until it is known not to be one."""

    def __init__(self, job: Job):
        self.job = job
        self.completion: Completion | None = None

    def __iter__(self):
        stops, held, sent = self.job.sampling.stop, "", []
        hold = max(map(len, stops), default=1) - 1
        try:
            for piece in self.job.streamer:
                held += piece
                before, cut = cut_at_stop(held, stops)
                if cut:
                    held = before
                    break
                if len(held) > hold:
                    ready, held = (held[:-hold], held[-hold:]) if hold else (held, "")
                    sent.append(ready)
                    yield ready
        finally:
            self.cancel()  # a client gone mid-stream (or a stop string) frees the model now
        if held:
            sent.append(held)
            yield held
        result = self.job.future.result()  # raises what the worker raised
        self.completion = Completion("".join(sent), result.prompt_tokens, result.completion_tokens,
                                     result.finish_reason)

    def cancel(self) -> None:
        self.job.cancel()
