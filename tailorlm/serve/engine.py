"""The generation engine shared by `tailor chat` and `tailor serve`: one worker thread owns the model.

Requests go into a queue; the worker takes them one batch at a time, so two generations never run on the
model at once. Greedy, non-streaming requests are independent row by row, so queued ones run together in one
left-padded batch: each row stops on its own (end token, its stop strings, its own max_tokens) and its
result is what it would have been alone. Sampled requests (their random draws would depend on the batch) and
streamed ones (transformers' streamer handles one row) run one at a time.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from tailorlm.data.tokenize import ChatFormat
from tailorlm.errors import TailorError
from tailorlm.eval.generate import stop_token_ids


class PromptError(TailorError):
    """A request the engine cannot serve as asked (bad turn order, a prompt over the context)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or a stop string) or "length"


@dataclass
class _Job:
    prompt_ids: list[int]
    sampling: Sampling
    streamer: TextIteratorStreamer | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def batchable(self) -> bool:
        return self.sampling.greedy and self.streamer is None


class _RowStops(StoppingCriteria):
    """Per-row stopping: the end token, the row's stop strings, its own max_new_tokens, or a cancel.

    Records where each row ended (generated tokens kept), so tokens generate() pads finished rows with are
    never mistaken for output."""

    def __init__(self, jobs: list[_Job], prompt_width: int, end_ids: list[int], tokenizer):
        self.jobs, self.width, self.tokenizer = jobs, prompt_width, tokenizer
        self.end_ids = torch.tensor(end_ids)
        self.ended_at: list[int | None] = [None] * len(jobs)
        self.hit_stop: list[bool] = [False] * len(jobs)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.width
        for row, job in enumerate(self.jobs):
            if self.ended_at[row] is not None:
                continue
            last = input_ids[row, -1]
            if bool(torch.isin(last, self.end_ids.to(last.device))) or self._stop_string(input_ids[row], job, n_new):
                self.ended_at[row], self.hit_stop[row] = n_new, True
            elif n_new >= job.sampling.max_new_tokens or job.cancelled.is_set():
                self.ended_at[row] = n_new
        return torch.tensor([e is not None for e in self.ended_at], device=input_ids.device)

    def _stop_string(self, row_ids, job: _Job, n_new: int) -> bool:
        if not job.sampling.stop:
            return False
        # A stop string ends within the last few tokens (each token is at least one character).
        tail = row_ids[-min(n_new, max(map(len, job.sampling.stop)) + 4):]
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in job.sampling.stop)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop string (OpenAI leaves the stop string out), and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


class Engine:
    def __init__(self, model, tokenizer, fmt: ChatFormat, device, max_batch: int = 8):
        self.model, self.tokenizer, self.fmt, self.device = model, tokenizer, fmt, torch.device(device)
        self.max_batch = max_batch
        self.end_ids = stop_token_ids(tokenizer, model)
        self.context_length = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        self.batch_sizes: list[int] = []  # one entry per generate() call: how well batching works
        self._pending: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="tailor-model-worker", daemon=True)
        self._worker.start()

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
        vocab = self.model.get_input_embeddings().num_embeddings
        if not all(0 <= t < vocab for t in prompt_ids):
            raise PromptError(f"the prompt holds token ids outside the vocabulary (0 to {vocab - 1})")
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise PromptError(f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                              f"{self.context_length} tokens, prompt and completion together",
                              code="context_length_exceeded")
        if sampling.max_new_tokens <= room:
            return sampling
        return Sampling(room, sampling.temperature, sampling.top_p, sampling.seed, sampling.stop)

    # ---- requests -----------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], sampling: Sampling) -> Future:
        """A Future of the Completion; the worker may run it together with other greedy requests."""
        job = _Job(list(prompt_ids), self.fit(prompt_ids, sampling))
        self._enqueue(job)
        return job.future

    def complete(self, prompt_ids: list[int], sampling: Sampling) -> Completion:
        return self.submit(prompt_ids, sampling).result()

    def stream(self, prompt_ids: list[int], sampling: Sampling) -> "TextStream":
        """Text pieces as they are generated; iterate it to the end, then read .completion."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        job = _Job(list(prompt_ids), self.fit(prompt_ids, sampling), streamer)
        self._enqueue(job)
        return TextStream(job)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._worker.join(timeout=60)

    def _enqueue(self, job: _Job) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._pending.append(job)
            self._wake.notify()

    # ---- the worker ---------------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Job] | None:
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            if not self._pending:
                return None
            batch = [self._pending.popleft()]
            if batch[0].batchable:
                # Take every queued greedy request (up to max_batch); the others keep their order.
                for job in [j for j in self._pending if j.batchable][: self.max_batch - 1]:
                    self._pending.remove(job)
                    batch.append(job)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                for job, completion in zip(live, self._generate(live)):
                    job.future.set_result(completion)
            except BaseException as e:  # the worker must survive any one request
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(e)
                    if job.streamer is not None:
                        job.streamer.end()

    @torch.no_grad()
    def _generate(self, jobs: list[_Job]) -> list[Completion]:
        self.batch_sizes.append(len(jobs))
        width = max(len(j.prompt_ids) for j in jobs)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):  # left padding: every row's next token sits at the same column
            input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            attention_mask[row, width - len(job.prompt_ids):] = 1
        stops = _RowStops(jobs, width, self.end_ids, self.tokenizer)
        sampling = jobs[0].sampling  # batched jobs are all greedy; a sampled job runs alone
        if sampling.greedy:
            decoding = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            decoding = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.seed is not None:  # only this thread draws from the generator, so seeding is exact
                torch.manual_seed(sampling.seed)
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            max_new_tokens=max(j.sampling.max_new_tokens for j in jobs), eos_token_id=self.end_ids,
            pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([stops]), streamer=jobs[0].streamer,
            num_beams=1, **decoding)
        completions = []
        for row, job in enumerate(jobs):
            new_ids = out[row, width:].tolist()
            kept = stops.ended_at[row] if stops.ended_at[row] is not None else len(new_ids)
            text = self.tokenizer.decode(new_ids[:kept], skip_special_tokens=True)
            text, cut = cut_at_stop(text, job.sampling.stop)
            finished = stops.hit_stop[row] or cut
            completions.append(Completion(text, len(job.prompt_ids), kept, "stop" if finished else "length"))
        return completions


class TextStream:
    """The text of one streamed generation, piece by piece, with stop strings cut off as OpenAI does.

    Text that could be the start of a stop string is held back until it is known not to be one."""

    def __init__(self, job: _Job):
        self._job = job
        self.completion: Completion | None = None

    def __iter__(self):
        stops, held, sent = self._job.sampling.stop, "", []
        hold = max(map(len, stops), default=1) - 1
        try:
            for piece in self._job.streamer:
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
        result = self._job.future.result()  # raises what the worker raised
        self.completion = Completion("".join(sent), result.prompt_tokens, result.completion_tokens,
                                     result.finish_reason)

    def cancel(self) -> None:
        self._job.cancelled.set()
