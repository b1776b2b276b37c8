"""Constrained decoding for answers that list items from a closed set: NER's 'type: span; type: span' or 'none',
or its JSON form '[{"type": ..., "text": ...}, ...]' or '[]'.

A classification answer is one of a few strings, so a token trie of them constrains it (generate.LabelTrie).
An entity list is open-ended in length but closed in content: each item is an entity type and a span of the
example's own words, items are joined by a separator, and an empty list is one fixed word. ItemListTrie keeps
greedy decoding inside that language, so a prompted base model's answer always parses and names only real
spans of its input, and no item twice. It is the extraction counterpart of constrained label decoding: a
baseline that cannot lose points to format alone.

The tokens forced are the ones training teaches: an item that opens the answer is tokenized after the
answer's own opening text (a space in the plain layout), a later item together with the separator before
it, which is how byte-level BPE splits the training target too (it splits before ';' and before a space).
"""
from __future__ import annotations

EMPTY = -1  # the item id of the empty answer ('none'): nothing may follow it but a stop token
CLOSE = -2  # the id of the closing text (a JSON list's ']'): nothing may follow it but a stop token


class _Node:
    __slots__ = ("next", "end", "items")

    def __init__(self):
        self.next: dict[int, _Node] = {}
        self.end: int | None = None  # the item whose tokens end here
        self.items: set[int] = set()  # every item whose tokens pass through here, to skip spent branches


def _trie(sequences: list[tuple[int, list[int]]]) -> _Node:
    root = _Node()
    for item, ids in sequences:
        node = root
        for token in ids:
            node.items.add(item)
            node = node.next.setdefault(token, _Node())
        node.items.add(item)
        node.end = item
    return root


class ItemListTrie:
    """Allowed next tokens for an answer 'item (separator item)*' of distinct items, or the empty answer.

    first[j]: item j's tokens when it opens the answer; following[j]: its tokens after another item, the
    separator included; closing: the tokens that must end a non-empty answer, if any. Same interface as
    LabelTrie: allowed(tokens generated so far, stop tokens)."""

    def __init__(self, first: list[list[int]], following: list[list[int]], empty: list[int] | None = None,
                 closing: list[int] | None = None):
        if len(first) != len(following):
            raise ValueError(f"internal: {len(first)} opening items but {len(following)} following ones")
        self.first = _trie([*enumerate(first), *([(EMPTY, empty)] if empty else [])])
        self.following = _trie([*enumerate(following), *([(CLOSE, closing)] if closing else [])])
        self.closes = bool(closing)

    def _walk(self, tokens: list[int]) -> tuple[_Node | None, set[int], int]:
        """(the node the tokens lead to, or None once they pass the answer's end (a stop token); the items
        already finished; how many tokens those finished items take)."""
        node, emitted, finished = self.first, set(), 0
        for i, token in enumerate(tokens):
            child = node.next.get(token)
            if child is None and node.end not in (None, EMPTY, CLOSE):  # an item ended: the next one opens here
                emitted.add(node.end)
                finished = i
                child = self.following.next.get(token)
            if child is None:
                return None, emitted, finished
            node = child
        return node, emitted, finished

    def allowed(self, prefix: list[int], fallback: list[int]) -> list[int]:
        node, emitted, _ = self._walk(prefix)
        if node is None or node.end in (EMPTY, CLOSE):  # past the answer, 'none', or closed: nothing more is scored
            return list(fallback)
        allowed = [t for t, child in node.next.items() if _unspent(child, emitted)]
        if node.end is not None and node.end not in emitted:  # a complete, new item: list another, or end
            spent = emitted | {node.end}
            allowed += [t for t, child in self.following.next.items() if _unspent(child, spent)]
            if not self.closes:  # an answer with a closing text ends through it (in following)
                allowed += fallback
        return sorted(set(allowed)) or list(fallback)

    def cut_unfinished(self, tokens: list[int]) -> list[int]:
        """An answer that ran out of new tokens, up to the end of its last finished item: the one being written
        may be a word short of the span the model meant ('person: John' of 'person: John Smith')."""
        node, _, finished = self._walk(tokens)
        return list(tokens) if node is None else tokens[:finished]  # None: it did end (a stop token)

def _unspent(node: _Node, emitted: set[int]) -> bool:
    """Whether an item not yet listed is still reachable below node (emitted is small: count its members)."""
    return len(node.items) > sum(1 for item in emitted if item in node.items)


def item_list_trie(tokenizer, items: list[str], separator: str, empty: str | None, opening: str = "",
                   lead: str = "", closing: str = "") -> ItemListTrie:
    """The trie of one example's answer: items as text, the separator between them, the empty answer, the text
    the answer opens with (the part of the training completion before the answer's first character), the text
    before the first item (a JSON list's '[', which the empty answer '[]' holds itself) and after the last."""
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731  (one batched call)
    first = encode([opening + lead + item for item in items]) if items else []
    following = encode([separator + item for item in items]) if items else []
    return ItemListTrie(first, following, encode([opening + empty])[0] if empty else None,
                        encode([closing])[0] if closing else None)
