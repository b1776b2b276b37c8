"""A corpus of bad data files: each must fail with one exact message naming the file, the line or row, and the
problem (or, for a byte-order mark, be read cleanly)."""
import pytest

from tailorlm.config import DataSpec
from tailorlm.data.dataset import load_splits
from tailorlm.data.sources import read_table
from tailorlm.errors import DataError
from conftest import write

BIG = "a" * 1_000_000  # with anything around it, a line over the 1,000,000-character limit
TOO_LONG = "the line is {n:,} characters long; the limit is 1,000,000 (a binary file, or no line breaks?)"
UNCLOSED = ("the quote opened on this line never closes, so every later line was read into one field; close it, "
            "or double a quote that is part of the text (\"\")")
LOST = "rename one, or one column's values would be lost"
REPEATED_KEY = ("key '{key}' appears twice in the object opening on this line (keys {first} and {second}); "
                "JSON readers keep only the last value, so rename or remove one")

# id, files to write, the source to read ({d}: the folder), format, columns (None: read_table only, else also
# load_splits with data.columns), and the exact message (None: must read cleanly).
CASES = [
    ("malformed-jsonl", {"d.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": }\n'}, "d.jsonl", "auto", None,
     "{d}/d.jsonl, line 2: invalid JSON (Expecting value at column 24)"),
    ("jsonl-not-an-object", {"d.jsonl": '{"text": "a", "label": "x"}\n"just text"\n'}, "d.jsonl", "auto", None,
     "{d}/d.jsonl, line 2: expected a JSON object, found str"),
    ("non-utf8", {"d.csv": b"text,label\nok,x\ncaf\xe9,y\n"}, "d.csv", "auto", None,
     "{d}/d.csv, line 3: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8, or set data.encoding (e.g. latin-1)"),
    ("non-utf8-after-bom", {"d.csv": b"\xef\xbb\xbftext,label\nok,x\n\xff,y\n"}, "d.csv", "auto", None,
     "{d}/d.csv, line 3: not valid UTF-8 (byte 0xff); re-save the file as UTF-8, or set data.encoding (e.g. latin-1)"),
    ("bom-is-dropped", {"d.csv": b"\xef\xbb\xbftext,label\nok,x\n"}, "d.csv", "auto", None, None),
    ("bom-is-dropped-jsonl", {"d.jsonl": b'\xef\xbb\xbf{"text": "ok", "label": "x"}\n'}, "d.jsonl", "auto", None, None),
    ("misspelled-column", {"d.csv": "txt,label\nok,x\n"}, "d.csv", "auto", {},
     "{d}/d.csv: no column 'text' (did you mean 'txt'?); the columns are: txt, label"),
    ("misspelled-mapped-column", {"d.csv": "review,label\nok,x\n"}, "d.csv", "auto", {"text": "reviw"},
     ("{d}/d.csv: no column 'reviw' (mapped from template field 'text') (did you mean 'review'?); "
      "the columns are: review, label")),
    ("missing-column", {"d.csv": "review,label\nok,x\n"}, "d.csv", "auto", {"text": "body"},
     "{d}/d.csv: no column 'body' (mapped from template field 'text'); the columns are: review, label"),
    ("object-where-text-expected", {"d.jsonl": '{"text": "a", "label": "x"}\n{"text": {"en": "b"}, "label": "y"}\n'},
     "d.jsonl", "auto", {}, "{d}/d.jsonl, line 2: column 'text' holds a dict, expected text or a number"),
    ("list-label", {"d.json": '[{"text": "a", "label": ["x", "y"]}]'}, "d.json", "auto", {},
     "{d}/d.json, record 1: column 'label' holds a list, expected text or a number"),
    ("nan-is-empty", {"d.jsonl": '{"text": "a", "label": "x"}\n{"text": NaN, "label": "y"}\n'}, "d.jsonl", "auto", {},
     "{d}/d.jsonl, line 2: empty value in column 'text'"),
    ("empty-value", {"d.csv": "text,label\nok,x\n  ,y\n"}, "d.csv", "auto", {},
     "{d}/d.csv, line 3: empty value in column 'text'"),
    ("empty-file", {"d.csv": ""}, "d.csv", "auto", None,
     "{d}/d.csv: no data rows (the file is empty or holds only a header)"),
    ("empty-jsonl", {"d.jsonl": "\n\n"}, "d.jsonl", "auto", None,
     "{d}/d.jsonl: no data rows (the file is empty or holds only a header)"),
    ("header-only", {"d.csv": "text,label\n"}, "d.csv", "auto", None,
     "{d}/d.csv: no data rows (the file is empty or holds only a header)"),
    ("header-only-tsv", {"d.tsv": "text\tlabel\n\n"}, "d.tsv", "auto", None,
     "{d}/d.tsv: no data rows (the file is empty or holds only a header)"),
    ("gigantic-csv-line", {"d.csv": f"text,label\nok,x\n{BIG},y\n"}, "d.csv", "auto", None,
     "{d}/d.csv, line 3: " + TOO_LONG.format(n=1_000_002)),
    ("gigantic-tsv-line", {"d.tsv": f"text\tlabel\n{BIG}\ty\n"}, "d.tsv", "auto", None,
     "{d}/d.tsv, line 2: " + TOO_LONG.format(n=1_000_002)),
    ("gigantic-jsonl-line", {"d.jsonl": f'{{"text": "{BIG}", "label": "x"}}\n'}, "d.jsonl", "auto", None,
     "{d}/d.jsonl, line 1: " + TOO_LONG.format(n=1_000_026)),
    ("gigantic-label-text-line", {"d.txt": f"1 fine\n0 {BIG}\n"}, "d.txt", "label_text", None,
     "{d}/d.txt, line 2: " + TOO_LONG.format(n=1_000_002)),
    ("gigantic-conll-line", {"d.conll": f"a\tO\n{BIG}\tO\n"}, "d.conll", "auto", None,
     "{d}/d.conll, line 2: " + TOO_LONG.format(n=1_000_002)),
    ("gigantic-quoted-csv-field", {"d.csv": 'text,label\nok,x\n"' + "a\n" * 500_001 + '",y\n'}, "d.csv", "auto", None,
     ("{d}/d.csv, line 3: malformed CSV: a field starting on this line is over 1,000,000 characters long, "
      "the limit; an unclosed quote may have swallowed the rest of the file")),
    ("csv-unclosed-quote", {"d.csv": 'text,label\nok,x\n"unclosed,y\n'}, "d.csv", "auto", None,
     "{d}/d.csv, line 3: malformed CSV: " + UNCLOSED),
    # The reader stops at the end of the file; the line to fix is the one where the quote opened.
    ("csv-unclosed-quote-lines-after", {"d.csv": 'text,label\nok,x\n"unclosed,y\nmore,z\nlast,w\n'}, "d.csv", "auto",
     None, "{d}/d.csv, line 3: malformed CSV: " + UNCLOSED),
    ("csv-unclosed-quote-in-second-field", {"d.csv": 'text,label\nok,"x\nmore,z\n'}, "d.csv", "auto", None,
     "{d}/d.csv, line 2: malformed CSV: " + UNCLOSED),
    ("csv-unclosed-quote-after-quoted-lines", {"d.csv": 'text,label\n"two\nlines",x\n"say ""hi""",y\n"open,z\nmore,w\n'},
     "d.csv", "auto", None, "{d}/d.csv, line 5: malformed CSV: " + UNCLOSED),
    ("tsv-unclosed-quote", {"d.tsv": 'text\tlabel\nok\tx\n"unclosed\ty\nmore\tz\n'}, "d.tsv", "auto", None,
     "{d}/d.tsv, line 3: malformed TSV: " + UNCLOSED),
    ("csv-quote-closed-lines-later", {"d.csv": 'text,label\nok,x\n"unclosed,y\nmore,"z"\n'}, "d.csv", "auto", None,
     ("{d}/d.csv, line 3: malformed CSV: the quote opened on this line only closes on line 4, where text follows it "
      "(',' expected after '\"'); is a closing quote missing on this line?")),
    ("csv-text-after-quote", {"d.csv": 'text,label\nok,x\n"quoted"tail,y\n'}, "d.csv", "auto", None,
     "{d}/d.csv, line 3: malformed CSV: ',' expected after '\"'"),
    ("csv-unquoted-comma", {"d.csv": "text,label\nok,x\nhello, world,y\n"}, "d.csv", "auto", None,
     "{d}/d.csv, line 3: expected 2 fields (text, label), found 3; check the quoting and delimiter"),
    ("csv-repeated-column", {"d.csv": "text,label,text\na,x,b\n"}, "d.csv", "auto", None,
     "{d}/d.csv, line 1: column 'text' appears twice in the header (columns 1 and 3); " + LOST),
    ("csv-repeated-column-after-spaces", {"d.csv": "text, label,label \na,x,y\n"}, "d.csv", "auto", None,
     "{d}/d.csv, line 1: column 'label' appears twice in the header (columns 2 and 3); " + LOST),
    ("tsv-repeated-column", {"d.tsv": "label\ttext\ttext\nx\ta\tb\n"}, "d.tsv", "auto", None,
     "{d}/d.tsv, line 1: column 'text' appears twice in the header (columns 2 and 3); " + LOST),
    ("csv-two-unnamed-columns", {"d.csv": "text,label,,\na,x,1,2\n"}, "d.csv", "auto", None,
     "{d}/d.csv, line 1: columns 3 and 4 both have an empty name in the header; name or remove them, or one "
     "column's values would be lost"),
    ("jsonl-repeated-key", {"d.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": "y", "text": "c"}\n'},
     "d.jsonl", "auto", None, "{d}/d.jsonl, line 2: " + REPEATED_KEY.format(key="text", first=1, second=3)),
    ("jsonl-repeated-nested-key", {"d.jsonl": '{"messages": [{"role": "user", "role": "assistant", "content": "hi"}]}\n'},
     "d.jsonl", "auto", None, "{d}/d.jsonl, line 1: " + REPEATED_KEY.format(key="role", first=1, second=2)),
    ("json-repeated-key", {"d.json": '[\n  {"text": "a", "label": "x"},\n  {"text": "b",\n   "label": "y", "label": "z"}\n]\n'},
     "d.json", "auto", None, "{d}/d.json, line 3: " + REPEATED_KEY.format(key="label", first=2, second=3)),
    ("mixed-label-types", {"d.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n'}, "d.jsonl", "auto",
     {}, "{d}/d.jsonl, line 2: mixed label types: int (first at line 1) and str; use one type for every label"),
    ("conll-missing-tag", {"d.conll": "John\tB-person\nlives\tO\n\nin\n"}, "d.conll", "auto", None,
     "{d}/d.conll, line 4: token 'in' has no tag; expected 'TOKEN<TAB>TAG' (the tag is the last column)"),
    ("conll-bad-tag", {"d.bio": "John\tPERSON\n"}, "d.bio", "auto", None,
     "{d}/d.bio, line 1: tag 'PERSON' of token 'John' is not O, B-TYPE or I-TYPE (only BIO/IOB2 tags are read)"),
    ("parallel-unaligned", {"t.en": "a\nb\nc\n", "t.de": "x\ny\n"}, "t.en|{d}/t.de", "auto", None,
     "{d}/t.en|{d}/t.de: unaligned: {d}/t.en has 3 lines, {d}/t.de has 2"),
    ("parallel-empty-line", {"t.en": "a\n\nc\n", "t.de": "x\ny\nz\n"}, "t.en|{d}/t.de", "parallel", None,
     "{d}/t.en, line 2: empty line; its pair in {d}/t.de is 'y'"),
    ("chat-unknown-role", {"c.jsonl": '{"messages": [{"role": "human", "content": "Hi"}]}\n'}, "c.jsonl", "auto", None,
     "{d}/c.jsonl, line 1: messages turn 1: unknown role 'human'; expected one of system, user, assistant, tool"),
    ("bad-gzip", {"d.jsonl.gz": b"\x1f\x8b not really gzip"}, "d.jsonl.gz", "auto", None,
     "{d}/d.jsonl.gz: not a readable gzip file (Unknown compression method)"),
]


@pytest.mark.parametrize("files, source, fmt, columns, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named_exactly(tmp_path, files, source, fmt, columns, message):
    for name, content in files.items():
        write(tmp_path / name, content)
    source = str(tmp_path / source.format(d=tmp_path))
    if message is None:
        table = read_table(source, fmt)
        assert table.columns[0] == "text"  # not '\ufefftext'
        return
    with pytest.raises(DataError) as info:
        if columns is None:
            read_table(source, fmt)
        else:
            load_splits(DataSpec(train=source, format=fmt, columns=columns), {"text", "label"})
    assert str(info.value) == message.format(d=tmp_path)
