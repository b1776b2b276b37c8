"""Log-probabilities of generated tokens (OpenAI's `logprobs`), and the text and bytes each token id writes.

The log-probabilities are the model's own: log_softmax over the raw logits of each step, before temperature and
top_p reshape them for sampling and before a response_format mask removes tokens, as OpenAI reports them. So
they do not depend on the sampling settings, and a greedy answer's every token is the first of its alternatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the printable character a byte-level BPE vocabulary writes for
    each byte, mapped to that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenTable:
    """What each token id writes into an answer: its text (leading spaces included, as it reads after other text)
    and its bytes (exact for byte-level vocabularies, where one token can hold part of a character)."""

    def __init__(self, tokenizer, size: int):
        known = min(size, len(tokenizer))  # a model's embedding can have rows past the tokenizer's last id
        # Decoded after an anchor token, so a tokenizer that drops a leading space at the start of a text (a
        # SentencePiece one) still shows it.
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
        before = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
        pairs = tokenizer.batch_decode([anchor + [i] for i in range(known)], clean_up_tokenization_spaces=False)
        self.texts = [p[len(before):] if p.startswith(before) else tokenizer.decode([i]) for i, p in enumerate(pairs)]
        self.texts += [""] * (size - known)
        self.special = set(tokenizer.all_special_ids)
        self.bytes = [text.encode() for text in self.texts]
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if type(decoder).__name__ == "ByteLevel":  # each character of a token names one byte: read them back
            byte_of = _byte_of_char()
            for token, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(known)))):
                if token not in self.special and piece and all(c in byte_of for c in piece):
                    self.bytes[token] = bytes(byte_of[c] for c in piece)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: bytes
    logprob: float
    offset: int  # where the token's text starts in the answer
    top: tuple  # (token, bytes, logprob) of the most likely tokens at that step, most likely first


class LogprobTrace:
    """The log-probabilities of one answer's tokens, recorded step by step as the answer is generated.

    A step's logits are seen before its token is drawn, so each step keeps its distribution until the next step
    (or the answer's end) says which token was taken."""

    def __init__(self, top: int, table: TokenTable):
        self.top, self.table = top, table
        self.steps: list[tuple[int, float, list[int], list[float]]] = []  # token, logprob, top ids, top logprobs
        self._pending: tuple[torch.Tensor, list[int], list[float]] | None = None

    def observe(self, previous_token: int, logits: torch.Tensor) -> None:
        """Record a step's raw logits; previous_token is the token the step before chose."""
        self.settle(previous_token)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(self.top) if self.top else (logprobs[:0], logprobs[:0].long())
        self._pending = (logprobs, ids.tolist(), values.tolist())

    def settle(self, token: int) -> None:
        """The token drawn from the last recorded step (at the next step, or when the answer ends)."""
        if self._pending is not None:
            logprobs, ids, values = self._pending
            self.steps.append((token, float(logprobs[token]), ids, values))
            self._pending = None

    def report(self, cut_at: int | None = None) -> list[TokenLogprob]:
        """One entry per token the answer shows: special tokens (an end token) write nothing, and when a stop
        string cut the answer at cut_at characters, the tokens from there on are left out too."""
        entries, offset = [], 0
        for token, logprob, ids, values in self.steps:
            if token in self.table.special:
                continue
            if cut_at is not None and offset >= cut_at:
                break
            top = tuple((self.table.texts[i], self.table.bytes[i], v) for i, v in zip(ids, values))
            entries.append(TokenLogprob(self.table.texts[token], self.table.bytes[token], logprob, offset, top))
            offset += len(self.table.texts[token])
        return entries


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """choices[].logprobs of a chat completion, as OpenAI writes it."""
    if entries is None:
        return None

    def one(token: str, raw: bytes, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e.token, e.bytes, e.logprob), "top_logprobs": [one(*t) for t in e.top]}
                        for e in entries], "refusal": None}


def text_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """choices[].logprobs of a legacy completion: parallel lists, each step's alternatives holding the chosen
    token too (OpenAI returns up to logprobs + 1 of them)."""
    if entries is None:
        return None
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**{t: v for t, _, v in e.top}, e.token: e.logprob} for e in entries],
            "text_offset": [e.offset for e in entries]}
