import json

import pytest

from tailorlm.data.sources import read_table
from tailorlm.errors import DataError
from conftest import write


def test_csv_with_quoted_newlines_and_bom(tmp_path):
    path = write(tmp_path / "d.csv", b'\xef\xbb\xbftext,label\n"line one\nline two",pos\nplain,neg\n')
    table = read_table(str(path))
    assert table.columns == ["text", "label"]
    assert table.records[0].fields == {"text": "line one\nline two", "label": "pos"}
    assert [r.where for r in table.records] == ["line 2", "line 4"]


def test_tsv_jsonl_json_parquet_and_label_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert read_table(str(write(tmp_path / "d.tsv", "text\tlabel\na b\tx\n"))).records[0].fields == {"text": "a b", "label": "x"}
    assert read_table(str(write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n'))).records[1].where == "line 3"
    assert read_table(str(write(tmp_path / "d.json", json.dumps([{"text": "a", "label": "x"}])))).records[0].where == "record 1"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, 0]}), tmp_path / "d.parquet")
    assert read_table(str(tmp_path / "d.parquet")).records[1].fields == {"text": "b", "label": 0}
    table = read_table(str(write(tmp_path / "sst.txt", "1 a fine film .\n0 dull\n")), "label_text")
    assert [r.fields for r in table.records] == [{"label": "1", "text": "a fine film ."}, {"label": "0", "text": "dull"}]


@pytest.mark.parametrize("name, content, fmt, message", [
    ("bad.jsonl", '{"text": "a"}\n{"text": oops}\n', "auto", r"bad.jsonl, line 2: invalid JSON \(Expecting value at column 10\)"),
    ("bad.csv", b"text,label\nok,1\n\xff\xfe,2\n", "auto", r"bad.csv, line 3: not valid UTF-8 \(byte 0xff\)"),
    ("short.csv", "text,label\nok,1\nonly-one-field\n", "auto", r"short.csv, line 3: expected 2 fields \(text, label\), found 1"),
    ("quote.csv", 'text,label\n"unclosed,1\n', "auto", r"quote.csv, line \d+: (malformed CSV|expected 2 fields)"),
    ("empty.csv", "", "auto", r"empty.csv: no data rows \(the file is empty or holds only a header\)"),
    ("header.csv", "text,label\n", "auto", r"header.csv: no data rows"),
    ("list.jsonl", "[1, 2]\n", "auto", r"list.jsonl, line 1: expected a JSON object, found list"),
    ("data.xyz", "a", "auto", r"data.xyz: cannot tell the format from the extension '.xyz'"),
    ("one.txt", "1 good\npositive\n", "label_text", r"one.txt, line 2: expected 'LABEL text', found only one word"),
])
def test_bad_files_name_file_line_and_problem(tmp_path, name, content, fmt, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        read_table(str(path), fmt)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: file not found"):
        read_table(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match=r"builtin:bbc_nwes: no such builtin dataset \(did you mean 'bbc_news'\?\)"):
        read_table("builtin:bbc_nwes")


def test_builtin_bbc_news_reads_title_and_opening():
    table = read_table("builtin:bbc_news")
    assert len(table.records) == 2103  # 2225 articles, 122 of which repeat an earlier one's title and opening
    from tailorlm.data.quality import normalise
    assert len({normalise(r.fields["text"]) for r in table.records}) == 2103
    labels = {r.fields["label"] for r in table.records}
    assert labels == {"business", "entertainment", "politics", "sports", "tech"}
    first = table.records[0]
    assert first.fields["text"].startswith("Ad sales boost Time Warner profit. Quarterly profits")
    assert len(first.fields["text"]) < 300


def test_gzip_by_content_and_lines_split_only_at_newlines(tmp_path):
    import gzip

    # json.dumps(ensure_ascii=False) writes U+2028 raw; it is legal inside a JSON string and must not end the line
    rows = [{"text": "one\u2028two\x0cthree", "label": "x"}, {"text": "b", "label": "y"}]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    table = read_table(str(tmp_path / "d.jsonl.gz"))
    assert [r.fields for r in table.records] == rows
    assert [r.where for r in table.records] == ["line 1", "line 2"]
    with pytest.raises(DataError, match=r"d.en.gz: cannot tell the format from the extension '.en'; set data.format to "
                                        r"one of csv, tsv, jsonl, json, parquet, label_text, conll, parallel, chat"):
        read_table(str(write(tmp_path / "d.en.gz", "a")))
    assert [r.fields for r in read_table(str(write(tmp_path / "mac.txt", "1 good\r0 bad\r")), "label_text").records] == [
        {"label": "1", "text": "good"}, {"label": "0", "text": "bad"}]


def test_parquet_with_a_repeated_column_name_names_both_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["b"])],
                                        names=["text", "label", "text"]), path)
    with pytest.raises(DataError) as info:
        read_table(str(path))
    assert str(info.value) == (f"{path}: column 'text' appears twice in the Parquet schema (columns 1 and 3); "
                               f"rename one, or one column's values would be lost")


def test_the_same_key_in_different_json_objects_is_not_a_repeat(tmp_path):
    rows = [{"text": "a", "label": "x", "meta": {"text": "inner"}}, {"text": "b", "label": "y", "meta": {"text": "c"}}]
    assert [r.fields for r in read_table(str(write(tmp_path / "d.json", json.dumps(rows, indent=2)))).records] == rows
    text = "\n".join(json.dumps(r) for r in rows)
    assert [r.fields for r in read_table(str(write(tmp_path / "d.jsonl", text))).records] == rows
