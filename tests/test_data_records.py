"""Raw files -> Alpaca records: formats, and every kind of bad input names file, record and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.records import DataError, load_records


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def test_alpaca_jsonl_and_json_array_and_missing_input(tmp_path):
    rows = [GOOD, {"instruction": "Add.", "output": "2"}]  # input missing -> ""
    a = load_records(_jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    b = load_records(tmp_path / "b.json")
    assert a.records == b.records == [GOOD, {"instruction": "Add.", "input": "", "output": "2"}]
    assert a.n_raw == 2 and a.source_index == [0, 1]


def test_dolly_mapping(tmp_path):
    p = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Who?", "context": "Ann met Bob.", "response": "Bob", "category": "qa"},
            {"instruction": "Name a fruit.", "context": "", "response": "Apple"},
        ],
    )
    r = load_records(p, "dolly").records
    assert r[0] == {"instruction": "Who?", "input": "Ann met Bob.", "output": "Bob"}
    assert r[1]["input"] == ""


def test_ultrafeedback_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "prompt": "Write a haiku.",
            "prompt_id": "x",
            "chosen": [
                {"role": "user", "content": "Write a haiku."},
                {"role": "assistant", "content": "Leaves fall / ..."},
            ],
            "rejected": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "No."}],
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    r = load_records(tmp_path / "uf.parquet", "ultrafeedback").records
    assert r == [{"instruction": "Write a haiku.", "input": "", "output": "Leaves fall / ..."}]

    bad = [dict(rows[0], chosen=[{"role": "user", "content": "hi"}])]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"record 0.*field 'chosen': has no assistant message"):
        load_records(tmp_path / "bad.parquet", "ultrafeedback")


def test_malformed_jsonl_reports_every_line(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", [GOOD, "{not json", GOOD, '{"instruction": "x", ', "", GOOD])
    with pytest.raises(DataError) as ei:
        load_records(p)
    e = ei.value
    assert [(q.index, q.line) for q in e.problems] == [(1, 2), (3, 4)]
    msg = str(e)
    assert str(p) in msg and "record 1, line 2" in msg and "malformed JSON" in msg and "line 4" in msg


def test_malformed_json_array_gives_line(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=r"m\.json, line 3: malformed JSON"):
        load_records(p)
    p.write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(DataError, match="expected a JSON array"):
        load_records(p)


def test_field_problems_are_collected_with_index_and_field(tmp_path):
    p = _jsonl(
        tmp_path / "f.jsonl",
        [
            GOOD,
            ["not", "an", "object"],
            {"input": "", "output": "x"},  # missing instruction
            {"instruction": "x", "input": ""},  # missing output
            {"instruction": 3, "input": None, "output": "x"},  # non-strings
            {"instruction": "   ", "input": "", "output": "x"},  # empty instruction
            {"instruction": "x", "input": "", "output": ["x"]},
        ],
    )
    with pytest.raises(DataError) as ei:
        load_records(p)
    got = [(q.index, q.field, q.message.split(",")[0]) for q in ei.value.problems]
    assert got == [
        (1, None, "record must be a JSON object"),
        (2, "instruction", "missing"),
        (3, "output", "missing"),
        (4, "instruction", "must be a string"),
        (4, "input", "must be a string"),
        (5, "instruction", "empty instruction"),
        (6, "output", "must be a string"),
    ]
    assert "7 problem(s)" in str(ei.value) and f"{p}, record 4, line 5, field 'input'" in str(ei.value)


def test_dolly_fields_are_named_as_in_the_file(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "context": 1, "response": ""}])
    with pytest.raises(DataError) as ei:
        load_records(p, "dolly")
    assert [(q.field) for q in ei.value.problems] == ["context"]
    with pytest.raises(DataError, match="field 'response': empty output"):
        load_records(_jsonl(tmp_path / "e.jsonl", [{"instruction": "x", "response": " "}]), "dolly")


def test_many_problems_message_is_capped(tmp_path):
    p = _jsonl(tmp_path / "many.jsonl", [{"instruction": "", "output": "x"}] * 25)
    with pytest.raises(DataError) as ei:
        load_records(p)
    assert len(ei.value.problems) == 25
    assert str(ei.value).count("empty instruction") == 10 and "and 15 more" in str(ei.value)


def test_invalid_utf8_gives_byte_offset_and_line(tmp_path):
    good = (json.dumps(GOOD) + "\n").encode()
    bad = b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n'
    p = tmp_path / "u.jsonl"
    p.write_bytes(good + bad)
    with pytest.raises(DataError) as ei:
        load_records(p)
    q = ei.value.problems[0]
    assert (q.index, q.line, q.byte_offset) == (1, 2, len(good) + bad.index(b"\xe9"))
    assert "invalid UTF-8" in str(ei.value) and "byte 0xe9" in str(ei.value)

    arr = b'[\n{"instruction": "a", "output": "b\xff"}]'
    (tmp_path / "u.json").write_bytes(arr)
    with pytest.raises(DataError) as ei:
        load_records(tmp_path / "u.json")
    assert (ei.value.problems[0].line, ei.value.problems[0].byte_offset) == (2, arr.index(b"\xff"))


@pytest.mark.parametrize("policy", ["error", "drop", "keep"])
def test_empty_output_policy(tmp_path, policy):
    p = _jsonl(
        tmp_path / "e.jsonl",
        [GOOD, {"instruction": "a", "input": "", "output": "  \n"}, GOOD, {"instruction": "b", "output": ""}],
    )
    if policy == "error":
        with pytest.raises(DataError) as ei:
            load_records(p, empty_output=policy)
        assert [(q.index, q.field) for q in ei.value.problems] == [(1, "output"), (3, "output")]
        assert "empty_output=drop" in str(ei.value)
        return
    res = load_records(p, empty_output=policy)
    if policy == "drop":
        assert len(res.records) == 2 and res.dropped_empty_output == [1, 3] and res.source_index == [0, 2]
    else:
        assert len(res.records) == 4 and res.kept_empty_output == [1, 3] and res.dropped_empty_output == []


def test_max_records_and_bom(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(dict(GOOD, output=str(i))) + "\n" for i in range(5)).encode())
    res = load_records(p, max_records=3)
    assert [r["output"] for r in res.records] == ["0", "1", "2"] and res.n_raw == 5 and res.n_considered == 3


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown file type"):
        load_records(tmp_path / "x.csv")
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
