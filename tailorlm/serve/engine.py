"""The generation engine shared by `tailor chat` and `tailor serve`: one worker thread owns the model.

Requests go into a queue; the worker takes them one run at a time, so two generations never run on the model
at once. Greedy, non-streaming requests are independent row by row, so queued ones run together in one
left-padded batch: each row stops on its own (end token, its stop strings, its own max_tokens), its answer is
handed over as soon as it ends, and it is what it would have been alone. Sampled requests (their random draws
would depend on the batch) and streamed ones (transformers' streamer handles one row) run one at a time.

Requests that have not started go first. A run that has generated `slice_tokens` in a turn while others wait
pauses, keeping its KV cache, and resumes behind them (jobs.py): a long generation cannot hold the model for
its whole length. While new requests keep coming, the oldest paused run still gets every RESUME_EVERY-th turn,
so long generations slow down under load but never stall. A cancelled request (its client left) ends at the
next decode step, or never starts; a paused run whose clients all left ends when the worker next looks.

Requests may ask for log-probabilities (logprobs.py) and for JSON answers (json_constraint.py); both are kept row
by row in the logits of each step, so such greedy requests still batch with others.

Only close() stops the worker. Anything that goes wrong in a turn fails that run's requests (each client gets
the error) and is logged to the "tailorlm.serve" logger; the worker goes on with the next run.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace
from functools import cached_property

import torch

from tailorlm.data.tokenize import ChatFormat
from tailorlm.errors import TailorError
from tailorlm.eval.generate import stop_token_ids
from tailorlm.serve.jobs import Completion, Job, RowStreamer, Run, Sampling, TextStream
from tailorlm.serve.json_constraint import JsonConstraint, JsonVocabulary
from tailorlm.serve.logprobs import LogprobTrace, TokenTable

RESUME_EVERY = 5  # with runs paused, at least one turn in this many goes to the oldest of them
WORKER_RETRY_S = 0.1  # the worker's pause after an unexpected fault of its own, so a repeating one cannot spin

log = logging.getLogger("tailorlm.serve")  # `tailor serve` prints it beside uvicorn's own log


class PromptError(TailorError):
    """A request the engine cannot serve as asked (bad turn order, a prompt over the context)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class Engine:
    """The PyTorch engine. Another runtime (serve/llamacpp.py) subclasses it, giving its own model facts
    (vocabulary, context, end tokens) and its own runs; the queue, prompts and fairness stay here."""

    # Request parameters this engine cannot honour, each with the message of the 400 that refuses it.
    unsupported: dict[str, str] = {}

    def __init__(self, model, tokenizer, fmt: ChatFormat, device, max_batch: int = 8, slice_tokens: int = 32):
        self.model, self.tokenizer, self.fmt, self.device = model, tokenizer, fmt, torch.device(device)
        self.max_batch = max_batch
        self.slice_tokens = slice_tokens  # a run generates at least this many tokens per turn before it pauses
        self.end_ids = stop_token_ids(tokenizer, model)
        self.context_length = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self._start()

    def _start(self) -> None:
        self.batch_sizes: list[int] = []  # one entry per generate() call: how well batching works
        self.cancelled: list[int] = []  # tokens each cancelled request had generated when it stopped (0: never ran)
        self._queued: deque[Job] = deque()  # requests the model has not taken yet, in arrival order
        self._paused: deque[Run] = deque()  # runs that gave the model to queued requests, in the order they paused
        self._new_runs_in_a_row = 0  # runs of new requests started while a paused run waited
        self._wake = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="tailor-model-worker", daemon=True)
        self._worker.start()

    def _new_run(self, jobs: list[Job]) -> Run:
        for job in jobs:
            if job.sampling.logprobs is not None and job.trace is None:
                job.trace = LogprobTrace(job.sampling.logprobs, self.token_table)
            if job.sampling.json_format is not None and job.constraint is None:
                job.constraint = JsonConstraint(job.sampling.json_format, self.json_vocabulary)
        return Run(jobs, self.tokenizer, self.end_ids, self.device, self.cancelled.append)

    # Built on the first request that needs them, in the worker thread (a large vocabulary takes a second or so).
    @cached_property
    def token_table(self) -> TokenTable:
        return TokenTable(self.tokenizer, self.vocab_size)

    @cached_property
    def json_vocabulary(self) -> JsonVocabulary:
        return JsonVocabulary(self.token_table.texts, self.token_table.special, self.end_ids)

    # ---- prompts ------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation under the run's chat format, ready for the assistant's answer.

        With no system message the run's own system prompt is used, exactly as ChatFormat does in training,
        so one user message holding a training prompt gives the training prompt's ids."""
        if not messages or messages[-1]["role"] != "user":
            last = messages[-1]["role"] if messages else "none"
            raise PromptError(f"the last message must come from the user (role 'user'); it is '{last}'")
        if self.fmt.uses_chat:
            if self.fmt.system and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.fmt.system}, *messages]
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # the model's own Jinja template rejected the conversation
                raise PromptError(f"the model's chat template rejected the messages: {e}") from None
            return self.fmt.encode_prompt(text)
        # No chat template: a client's system text opens the prompt (the plain training layout has none) and
        # earlier exchanges become 'Answer:' demonstrations, as in few-shot prompting; a single user message is
        # exactly the training layout.
        system = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        if any(t["role"] != ("user", "assistant")[i % 2] for i, t in enumerate(turns)):
            raise PromptError("without a chat template, messages must alternate user, assistant, ..., user")
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
        return self.fmt.encode_prompt(system + self.fmt.prompt_text(turns[-1]["content"], pairs))

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def fit(self, prompt_ids: list[int], sampling: Sampling) -> Sampling:
        """The sampling settings with max_new_tokens clamped to the context; a prompt that fills it is an error."""
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        vocab = self.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            raise PromptError(f"the prompt holds token ids outside the vocabulary (0 to {vocab - 1})")
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise PromptError(f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                              f"{self.context_length} tokens, prompt and completion together",
                              code="context_length_exceeded")
        return sampling if sampling.max_new_tokens <= room else replace(sampling, max_new_tokens=room)

    # ---- requests -----------------------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], sampling: Sampling, streamed: bool = False) -> Job:
        """Queue a request. job.started is done when the model takes it, job.future holds its Completion, and a
        streamed job's text comes through TextStream(job)."""
        streamer = RowStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if streamed else None
        job = Job(list(prompt_ids), self.fit(prompt_ids, sampling), streamer)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queued.append(job)
            self._wake.notify()
        return job

    def submit(self, prompt_ids: list[int], sampling: Sampling) -> Future:
        """A Future of the Completion; the worker may run it together with other greedy requests."""
        return self.add(prompt_ids, sampling).future

    def complete(self, prompt_ids: list[int], sampling: Sampling) -> Completion:
        return self.submit(prompt_ids, sampling).result()

    def stream(self, prompt_ids: list[int], sampling: Sampling) -> TextStream:
        """Text pieces as they are generated; iterate it to the end, then read .completion."""
        return TextStream(self.add(prompt_ids, sampling, streamed=True))

    @property
    def queued(self) -> int:
        """Requests waiting for the model to take them (paused runs not counted)."""
        return len(self._queued)

    def withdraw(self, job: Job) -> bool:
        """Take a job the model has not started out of the queue (it will never run); False once it has started."""
        with self._wake:
            if job not in self._queued:
                return False
            self._queued.remove(job)
        job.future.cancel()
        job.end_stream()
        return True

    def cancel(self, job: Job) -> bool:
        """Stop a job whose client has gone: out of the queue now (True), or at the next decode step of its run."""
        if self.withdraw(job):
            self.cancelled.append(0)
            return True
        job.cancel()
        return False

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._worker.join(timeout=60)

    # ---- the worker ---------------------------------------------------------------------------------------

    def _others_waiting(self) -> bool:
        return bool(self._queued or self._paused)  # read between decode steps; a stale answer costs one step

    def _next_run(self) -> Run | None:
        """The next run to give the model: new requests first, a paused run when one is due or nothing else waits.
        None only once the engine is closed and nothing is left to do: the worker stops on None."""
        with self._wake:
            while True:
                while not self._queued and not self._paused and not self._closed:
                    self._wake.wait()
                # Paused runs whose clients have all left end here, and their KV caches go with them. That can
                # empty the queue and the paused runs both: then the loop waits again (returning None here
                # stopped the worker for good while the server went on queueing requests it would never take).
                self._paused = deque(run for run in self._paused if self._still_wanted(run))
                paused_run_due = bool(self._paused) and self._new_runs_in_a_row >= RESUME_EVERY - 1
                if self._queued and not paused_run_due:
                    first = self._queued.popleft()
                    jobs = [first]
                    if first.batchable:
                        # Take every queued greedy request (up to max_batch); the others keep their order.
                        for job in [j for j in self._queued if j.batchable][: self.max_batch - 1]:
                            self._queued.remove(job)
                            jobs.append(job)
                    if (live := [job for job in jobs if self._take(job)]) and (run := self._start_run(live)):
                        self._new_runs_in_a_row = self._new_runs_in_a_row + 1 if self._paused else 0
                        return run
                elif self._paused:
                    self._new_runs_in_a_row = 0
                    return self._paused.popleft()
                elif self._closed:
                    return None

    def _still_wanted(self, run: Run) -> bool:
        """Whether a paused run still has a row whose client waits; one that fails to end is failed and dropped."""
        try:
            return run.end_cancelled()
        except Exception as e:
            log.exception("ending a paused run whose clients left failed")
            _fail(run.jobs, e)
            return False

    def _start_run(self, jobs: list[Job]) -> Run | None:
        """A run of jobs the model has taken; None when it cannot be built (its jobs fail with the error)."""
        try:
            return self._new_run(jobs)
        except Exception as e:
            log.exception("starting a run of %d request(s) failed", len(jobs))
            _fail(jobs, e)
            return None

    def _take(self, job: Job) -> bool:
        """Mark a job started; False for one cancelled while it waited (it never runs, its stream ends)."""
        if job.cancelled.is_set() and job.future.cancel():
            self.cancelled.append(0)
        if not job.future.set_running_or_notify_cancel():
            job.end_stream()
            return False
        with contextlib.suppress(InvalidStateError):  # cancelled by a waiter that gave up: the job runs anyway
            job.started.set_result(None)
        return True

    @torch.no_grad()
    def _work(self) -> None:
        """The worker thread's loop. Nothing may end it but close(): a worker that died would leave every later
        request queued until its queue timeout, so whatever escapes a turn is logged, its requests fail with it,
        and the loop goes on."""
        while True:
            try:
                if (run := self._next_run()) is None:
                    return
            except Exception:  # a fault in the queue's own bookkeeping: no request to fail, but never silent
                log.exception("the model worker could not pick its next run; it carries on")
                time.sleep(WORKER_RETRY_S)
                continue
            self._turn(run)

    def _turn(self, run: Run) -> None:
        try:
            if run.end_cancelled():
                self.batch_sizes.append(len(run.jobs))
                run.turn(self.model, self.slice_tokens, self._others_waiting)
        except BaseException as e:  # the worker must survive any one request
            log.error("a generation of %d request(s) failed: %s: %s", len(run.jobs), type(e).__name__, e)
            try:
                run.fail(e)
            except Exception:
                log.exception("failing the run's requests failed")
                _fail(run.jobs, e)
            run.paused = False
        if run.paused:
            with self._wake:
                self._paused.append(run)


def _fail(jobs: list[Job], error: BaseException) -> None:
    """Hand the error to every job not yet answered, so no client waits on a run that will never go on."""
    for job in jobs:
        with contextlib.suppress(InvalidStateError):  # done meanwhile: its answer or cancel stands
            if not job.started.done():
                job.started.set_result(None)  # a client still waiting for the model gets the error, not a 503
            if not job.future.done():
                job.future.set_exception(error)
        job.end_stream()
