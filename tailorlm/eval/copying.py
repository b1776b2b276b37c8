"""Constrained decoding for answers made of the input's own words:
    InlineCopy  NER's inline format, the sentence copied with typed marks: '[John Smith | person] flew to Paris'
    SpanCopy    extractive QA: one run of consecutive words of the context

Neither language is a short list: there is one answer per way of marking the sentence, or per span of the
context. A token trie of whole answers (item_lists.py) would hold them all, so this walks two structures
together instead: a character automaton of the language, from the text generated so far, and a character
trie of the tokenizer's vocabulary. A token is allowed when its whole text stays inside the language; the walk
visits only the vocabulary's branches that do, so a step costs a few dozen node visits, not a pass over the
vocabulary.

Token texts come from decoding each token after a fixed anchor token (so SentencePiece's word-start marker
and byte-level BPE's leading space both come out as the space they mean); tokens that decode to a partial
character are never offered. The vocabulary's trie is built once per tokenizer.
"""
from __future__ import annotations

from tailorlm.tasks.base import CopyAnswer

_PIECES: dict[int, tuple[object, list[str], dict]] = {}  # id(tokenizer) -> (tokenizer, piece texts, char trie)
_END = ""  # the trie key under which a node lists the token ids whose text ends there


def token_pieces(tokenizer) -> tuple[list[str], dict]:
    """Every token id's text (as it reads after other text) and a character trie of them; cached."""
    cached = _PIECES.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1], cached[2]
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    base = tokenizer.decode([anchor], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(size)], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    pieces, trie = [], {}
    for token_id, text in enumerate(texts):
        piece = text[len(base):] if text.startswith(base) else ""
        if "\ufffd" in piece:  # part of a multi-byte character: its text alone is not a string of the answer
            piece = ""
        pieces.append(piece)
        if piece:
            node = trie
            for ch in piece:
                node = node.setdefault(ch, {})
            node.setdefault(_END, []).append(token_id)
    _PIECES[id(tokenizer)] = (tokenizer, pieces, trie)
    return pieces, trie


class _WordLanguage:
    """A language over the input's words, as pieces of text between states, with the interface of the other
    constraints: allowed(tokens generated so far, stop tokens). A configuration is (the state reached once the
    current piece of text is written, that text, characters of it written). Subclasses give the start state,
    the pieces that may follow each state, and the states where the answer may end."""

    start: object = None

    def __init__(self, tokenizer, words: list[str], opening: str = ""):
        self.pieces, self.trie = token_pieces(tokenizer)
        self.words, self.opening = words, opening
        # (the tokens consumed, the state after them): each decoding step adds one token to the last prefix,
        # so only that token's characters are walked, not the whole answer again
        self._last: tuple[tuple[int, ...], tuple[set, bool]] | None = None

    def _units(self, state) -> list[tuple[str, object]]:
        raise NotImplementedError

    def _final(self, state) -> bool:
        raise NotImplementedError

    def _closure(self, configs: set) -> tuple[set, bool]:
        """Configurations mid-text, with every finished piece expanded into the pieces that may follow; and
        whether the answer may end here."""
        out, final, todo, seen = set(), False, list(configs), set()
        while todo:
            config = todo.pop()
            target, text, written = config
            if written < len(text):
                out.add(config)
                continue
            if target in seen:
                continue
            seen.add(target)
            final |= self._final(target)
            todo += [(nxt, unit, 0) for unit, nxt in self._units(target)]
        return out, final

    def _step(self, configs: set, ch: str) -> tuple[set, bool]:
        return self._closure({(target, text, written + 1) for target, text, written in configs
                              if text[written] == ch})

    def _state(self, prefix: list[int]) -> tuple[set, bool] | None:
        """The configurations after the tokens generated so far, and whether the answer may end there; None
        once a token that is not text (a stop token) has ended it."""
        done, state = self._last if self._last is not None else ((), None)
        if state is None or tuple(prefix[:len(done)]) != done:
            done, state = (), self._closure({(self.start, self.opening, 0)})
        configs, final = state
        for token_id in prefix[len(done):]:
            piece = self.pieces[token_id] if token_id < len(self.pieces) else ""
            if not piece:
                return None
            for ch in piece:
                configs, final = self._step(configs, ch)
        self._last = (tuple(prefix), (configs, final))
        return configs, final

    def allowed(self, prefix: list[int], fallback: list[int]) -> list[int]:
        state = self._state(prefix)
        if state is None or not (state[0] or state[1]):  # over, or (never under this constraint) off the language
            return list(fallback)
        configs, final = state
        allowed: list[int] = []
        stack = [(self.trie, configs)]
        while stack:
            node, current = stack.pop()
            for ch, child in node.items():
                if ch == _END:
                    continue
                following, done = self._step(current, ch)
                if _END in child and (following or done):  # a token whose text ends inside the language
                    allowed += child[_END]
                if following:
                    stack.append((child, following))
        if final:
            allowed += fallback
        return sorted(set(allowed)) or list(fallback)


class InlineCopy(_WordLanguage):
    """'<opening><the words in order, some runs marked [words | type]>'. A state is (words copied, inside a
    mark)."""

    start = (0, False)

    def __init__(self, tokenizer, words: list[str], types: list[str], marks: CopyAnswer = CopyAnswer(),
                 opening: str = ""):
        super().__init__(tokenizer, words, opening)
        self.types, self.marks = types, marks

    def _final(self, state: tuple[int, bool]) -> bool:
        return state == (len(self.words), False)

    def _units(self, state: tuple[int, bool]) -> list[tuple[str, tuple[int, bool]]]:
        done, inside = state
        words, marks = self.words, self.marks
        space = " " if done else ""
        if inside:
            units = [(marks.between + kind + marks.close, (done, False)) for kind in self.types]
            return units + ([(" " + words[done], (done + 1, True))] if done < len(words) else [])
        if done == len(words):
            return []
        return [(space + words[done], (done + 1, False)), (space + marks.open + words[done], (done + 1, True))]


class SpanCopy(_WordLanguage):
    """'<opening><one run of up to max_words consecutive words>'. A state is (the next word's index, words
    written), or 'start' before the first."""

    start = "start"

    def __init__(self, tokenizer, words: list[str], max_words: int, opening: str = ""):
        super().__init__(tokenizer, words, opening)
        self.max_words = max_words

    def _final(self, state) -> bool:
        return state != "start"

    def _units(self, state) -> list[tuple[str, object]]:
        if state == "start":
            return [(word, (i + 1, 1)) for i, word in enumerate(self.words)]
        following, written = state
        if following < len(self.words) and written < self.max_words:
            return [(" " + self.words[following], (following + 1, written + 1))]
        return []
