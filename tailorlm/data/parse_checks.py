"""What the csv and json modules let through silently or report vaguely.

A repeated column name or JSON key makes a dict keep one value and drop the other without a word, and the csv
module reports an unclosed quote where it gave up (the end of the file) rather than where the quote opened.
The readers in sources.py use these checks to name the file, the line and both positions instead.
"""
from __future__ import annotations

import json
import json.decoder
import json.scanner
import re

LINE_END = re.compile(r"\r\n|\r|\n")  # line ends as the csv reader counts them (io.StringIO with newline="")


def first_repeat(names: list[str]) -> tuple[str, int, int] | None:
    """(name, first position, second position), counted from 1, of the first name that occurs twice."""
    seen: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if name in seen:
            return name, seen[name], position
        seen[name] = position
    return None


def repeated_column_problem(names: list[str], place: str) -> str | None:
    """The message for a column name used twice in `place` ('header', 'Parquet schema'), or None."""
    repeat = first_repeat(names)
    if repeat is None:
        return None
    name, first, second = repeat
    if not name:
        return (f"columns {first} and {second} both have an empty name in the {place}; name or remove them, "
                f"or one column's values would be lost")
    return (f"column '{name}' appears twice in the {place} (columns {first} and {second}); rename one, "
            f"or one column's values would be lost")


class RepeatedKey(Exception):
    """A JSON object with a key twice; `line` is where that object opens, once known."""

    def __init__(self, key: str, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second
        self.line: int | None = None

    @property
    def problem(self) -> str:
        return (f"key '{self.key}' appears twice in the object opening on this line (keys {self.first} and "
                f"{self.second}); JSON readers keep only the last value, so rename or remove one")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):  # called for every object read: the names are compared only when one is lost
        raise RepeatedKey(*first_repeat([key for key, _ in pairs]))
    return obj


def loads_unique(text: str):
    """json.loads, except that an object with a repeated key raises RepeatedKey (with its line) instead of
    silently keeping the last value. Raises json.JSONDecodeError as json.loads does."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RepeatedKey as e:
        e.line = _repeated_key_line(text)
        raise


def _repeated_key_line(text: str) -> int | None:
    """The line where the object with the repeated key opens. The fast C parser does not say where it is, so
    this second parse uses the pure-Python scanner, whose object parser can be wrapped to see each object's
    offset; it runs only once a repeated key is known to be there."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)

    def parse_object(string_and_end, *args):
        try:
            return json.decoder.JSONObject(string_and_end, *args)
        except RepeatedKey as e:
            if e.line is None:  # the innermost object, the one holding the repeat, sets it first
                string, end = string_and_end
                e.line = string.count("\n", 0, end) + 1
            raise

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        decoder.decode(text)
    except RepeatedKey as e:
        return e.line
    return None


def failed_quote_line(text: str, first_line: int, delimiter: str) -> int | None:
    """The line where the quoted field that stopped the csv reader opened, reading the record that starts on
    first_line by the csv module's rules: a quote opens a field only as its first character, and inside one
    '""' is a quote and a lone '"' closes it. That field either never closes (the reader hit the end of the
    file) or is followed by text after its closing quote. None when no quoted field is at fault."""
    pos = _line_start(text, first_line)
    line, field_start = first_line, pos
    stop = re.compile(f'"|{re.escape(delimiter)}|' + LINE_END.pattern)
    while (match := stop.search(text, pos)) is not None:
        token, pos = match.group(), match.end()
        if token == '"' and match.start() == field_start:
            opened = line
            while True:  # inside the quotes, skipping to each quote and counting the line breaks on the way
                close = text.find('"', pos)
                if close < 0:
                    return opened
                line += len(LINE_END.findall(text, pos, close))
                pos = close + 1
                if not text.startswith('"', pos):
                    break
                pos += 1  # '""': a quote that is part of the text
            if pos < len(text) and text[pos] not in (delimiter, "\r", "\n"):
                return opened
        elif token == delimiter:
            field_start = pos
        elif token != '"':  # a line end; a quote inside an unquoted field is an ordinary character
            line, field_start = line + 1, pos
    return None


def _line_start(text: str, line: int) -> int:
    offset = 0
    for _, match in zip(range(line - 1), LINE_END.finditer(text)):
        offset = match.end()
    return offset
