"""The processed-dataset store: content hash, reuse, rebuild of interrupted writes, meta.json, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import store
from pipeline.data.build import build, load_dataset, main, summary
from pipeline.data.inversion import InversionError
from pipeline.data.records import DataError


def _word_tokenizer(folder: Path, vocab_word: str) -> str:
    """A real (tiny) fast tokenizer: one token per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, vocab_word: 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return _word_tokenizer(d / "a", "a"), _word_tokenizer(d / "b", "b")


@pytest.fixture()
def raw(tmp_path):
    rows = [
        {"instruction": "w " * k, "input": "ctx" if k % 3 == 0 else "", "output": "v " * (2 * k + 1)}
        for k in range(1, 41)
    ]
    rows.append({"instruction": "empty one", "input": "", "output": "  "})
    p = tmp_path / "raw.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def cfg_for(tmp_path, raw, tok, *extra):
    return load_config(
        [
            "dataset=local_jsonl",
            f"dataset.source.path={raw}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"dataset.transform.tokenizer={tok}",
            "dataset.empty_output=drop",
            *extra,
        ]
    )


TARGET = ["dataset.transform.kind=invert", "dataset.transform.target_rg=1.0", "dataset.transform.tolerance=0.05"]


def test_build_writes_records_meta_and_done(tmp_path, raw, toks):
    res = build(cfg_for(tmp_path, raw, toks[0], *TARGET))
    assert not res.reused and res.folder.parent == tmp_path / "data" / "processed"
    assert res.folder.name == f"local_jsonl-{res.meta['hash'][:12]}"
    assert sorted(p.name for p in res.folder.iterdir()) == ["DONE", "data.jsonl", "meta.json"]
    recs, meta = store.read(res.folder)
    assert recs == res.records and len(recs) == 40
    m = meta
    assert m["counts"] == {
        "raw_records": 41,
        "considered": 41,
        "dropped_empty_output": 1,
        "kept_empty_output": 0,
        "records": 40,
        "inverted": sum(r["inverted"] for r in recs),
        "duplicates": 0,
    }
    assert m["dropped_empty_output_indices"] == [40]
    assert m["raw"]["sha256"] == m["definition"]["raw_sha256"] and len(m["raw"]["sha256"]) == 64
    assert m["tokenizer"]["fingerprint"] == m["definition"]["transform"]["tokenizer"]
    assert abs(m["transform"]["rg_after"] - 1.0) <= 0.05 and m["transform"]["rg_before"] > 1.9
    assert store.content_hash(m["definition"]) == m["hash"]
    inv = [r for r in recs if r["inverted"]]
    assert inv and all(r["instruction"].startswith("Predict the prompt") for r in inv)
    assert all(set(r) == {"instruction", "input", "output", "inverted", "source_index", "tokens"} for r in recs)
    r0 = recs[0]
    assert r0["tokens"]["output"] == len(r0["output"].split())  # word tokenizer
    # the dataset's R_g (docs/study.md section 1): completion / prompt words, here the transform's value
    words = lambda *fields: sum(len(r[f].split()) for r in recs for f in fields)
    assert m["rg"] == words("output") / words("instruction", "input") == m["transform"]["rg_after"]
    assert m["rg_measure"] == {
        "prompt_tokens": words("instruction", "input"),
        "completion_tokens": words("output"),
        "tokenizer": toks[0],
        "fingerprint": m["tokenizer"]["fingerprint"],
        "error": None,
    }


def test_every_dataset_records_its_rg_and_an_old_folder_gets_it_on_its_next_load(tmp_path, raw, toks):
    res = build(cfg_for(tmp_path, raw, toks[0]))  # no transform: tokenized for R_g only
    recs, meta = store.read(res.folder)
    assert "tokens" not in recs[0] and meta["tokenizer"] is None
    words = lambda *fields: sum(len(r[f].split()) for r in recs for f in fields)
    assert meta["rg"] == words("output") / words("instruction", "input") and meta["rg"] > 1.9
    assert meta["rg_measure"]["tokenizer"] == toks[0] and res.meta["rg"] == meta["rg"]
    # a folder written before R_g was recorded: the next load measures it and adds it to meta.json only
    old = {k: v for k, v in meta.items() if k not in ("rg", "rg_measure")}
    (res.folder / "meta.json").write_text(json.dumps(old, indent=2))
    kept = {n: ((res.folder / n).read_bytes(), (res.folder / n).stat().st_mtime_ns) for n in ("data.jsonl", "DONE")}
    again = build(cfg_for(tmp_path, raw, toks[0]))
    assert again.reused and again.meta["rg"] == meta["rg"]
    assert json.loads((res.folder / "meta.json").read_text()) == {
        **old,
        "rg": meta["rg"],
        "rg_measure": meta["rg_measure"],
    }
    assert {n: ((res.folder / n).read_bytes(), (res.folder / n).stat().st_mtime_ns) for n in kept} == kept
    stamp = (res.folder / "meta.json").stat().st_mtime_ns
    assert build(cfg_for(tmp_path, raw, toks[0])).reused and (res.folder / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="definition or hash"):
        store.update_meta(res.folder, {**meta, "hash": "0" * 64})


def test_without_the_tokenizer_the_build_goes_on_and_says_why_rg_is_missing(tmp_path, raw, toks, capsys):
    gone = str(tmp_path / "no_tokenizer")
    res = build(cfg_for(tmp_path, raw, gone))
    assert not res.reused and res.meta["rg"] is None
    assert gone in res.meta["rg_measure"]["error"] and "does not exist" in res.meta["rg_measure"]["error"]
    assert "R_g:    not measured (tokenizer " in summary(res)
    # the tokenizer does not define a dataset without a transform: the same folder, now measured
    again = build(cfg_for(tmp_path, raw, toks[0]))
    assert again.folder == res.folder and again.reused and again.meta["rg"] > 1.9
    assert json.loads((res.folder / "meta.json").read_text())["rg"] == again.meta["rg"]


def test_reuse_without_recompute(tmp_path, raw, toks):
    first = build(cfg_for(tmp_path, raw, toks[0], *TARGET))
    stamp = {p.name: p.stat().st_mtime_ns for p in first.folder.iterdir()}
    again = build(cfg_for(tmp_path, raw, toks[0], *TARGET))
    assert again.reused and again.folder == first.folder and again.records == first.records
    assert {p.name: p.stat().st_mtime_ns for p in again.folder.iterdir()} == stamp
    records, meta = load_dataset(cfg_for(tmp_path, raw, toks[0], *TARGET))
    assert records == first.records and meta["dir"] == str(first.folder)


def test_every_defining_setting_gives_a_new_folder(tmp_path, raw, toks, monkeypatch):
    base = build(cfg_for(tmp_path, raw, toks[0], *TARGET)).folder
    folders = {
        "tokenizer": build(cfg_for(tmp_path, raw, toks[1], *TARGET)).folder,
        "seed": build(cfg_for(tmp_path, raw, toks[0], *TARGET, "dataset.transform.seed=1")).folder,
        "target": build(cfg_for(tmp_path, raw, toks[0], *TARGET[:2], "dataset.transform.tolerance=0.1")).folder,
        "short": build(cfg_for(tmp_path, raw, toks[0], "dataset.transform.kind=invert")).folder,
        "none": build(cfg_for(tmp_path, raw, toks[0])).folder,
        "max_records": build(cfg_for(tmp_path, raw, toks[0], *TARGET, "dataset.max_records=30")).folder,
        "empty_output": build(cfg_for(tmp_path, raw, toks[0], *TARGET, "dataset.empty_output=keep")).folder,
    }
    monkeypatch.setattr("pipeline.data.inversion.TRANSFORM_VERSION", 999)
    folders["transform_version"] = build(cfg_for(tmp_path, raw, toks[0], *TARGET)).folder
    monkeypatch.undo()
    # a changed raw file (one more record) -> new sha256 -> new folder
    raw.write_text(raw.read_text() + json.dumps({"instruction": "x", "output": "y"}) + "\n")
    folders["raw"] = build(cfg_for(tmp_path, raw, toks[0], *TARGET)).folder
    all_folders = [base, *folders.values()]
    assert len(set(all_folders)) == len(all_folders), folders


def test_settings_that_cannot_change_content_share_a_folder(tmp_path, raw, toks):
    # no transform: tokenizer, seed and tolerance do not matter
    a = build(cfg_for(tmp_path, raw, toks[0])).folder
    b = build(cfg_for(tmp_path, raw, toks[1], "dataset.transform.seed=5")).folder
    # Short: seed/tolerance do not matter
    c = build(cfg_for(tmp_path, raw, toks[0], "dataset.transform.kind=invert")).folder
    d = build(
        cfg_for(
            tmp_path,
            raw,
            toks[0],
            "dataset.transform.kind=invert",
            "dataset.transform.seed=3",
            "dataset.transform.tolerance=0.2",
        )
    ).folder
    assert a == b and c == d and a != c


def test_interrupted_write_is_redone(tmp_path, raw, toks):
    first = build(cfg_for(tmp_path, raw, toks[0], *TARGET))
    good = (first.folder / "data.jsonl").read_bytes()
    # killed after data.jsonl was half written: no DONE
    (first.folder / "DONE").unlink()
    (first.folder / "data.jsonl").write_bytes(good[: len(good) // 2])
    assert not store.is_done(first.folder)
    again = build(cfg_for(tmp_path, raw, toks[0], *TARGET))
    assert not again.reused and (again.folder / "data.jsonl").read_bytes() == good and store.is_done(again.folder)
    # a data.jsonl changed after DONE is detected too
    (again.folder / "data.jsonl").write_bytes(good[:-10])
    assert not build(cfg_for(tmp_path, raw, toks[0], *TARGET)).reused


def test_errors_leave_no_folder(tmp_path, toks):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": ""}\n{"instruction": "y"}\n')
    with pytest.raises(DataError, match="2 problem"):
        build(load_config(["dataset=local_jsonl", f"dataset.source.path={bad}", f"paths.data_dir={tmp_path}"]))
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"instruction": "x", "output": "y y y"}\n')
    with pytest.raises(InversionError, match="not reachable"):
        build(cfg_for(tmp_path, ok, toks[0], "dataset.transform.kind=invert", "dataset.transform.target_rg=10"))
    assert not (tmp_path / "processed").exists() and not list((tmp_path / "data" / "processed").glob("*"))


def test_build_cli_prints_folder_and_summary(tmp_path, raw, toks, capsys):
    args = [
        "dataset=local_jsonl",
        f"dataset.source.path={raw}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"dataset.transform.tokenizer={toks[0]}",
        "dataset.empty_output=drop",
        "dataset.transform.kind=invert",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(built)" in out and str(tmp_path / "data" / "processed" / "local_jsonl-") in out
    assert "dropped (empty output) 1" in out and "R_g > 1" in out
    assert "R_g:    0." in out and "completion / " in out and f"tokenizer {toks[0]})" in out
    assert main(args) == 0 and "(reused)" in capsys.readouterr().out
    from pipeline.data.cli import main as plw_data  # the `plw-data` console script

    assert plw_data(["build", *args]) == 0 and "(reused)" in capsys.readouterr().out
    assert plw_data([]) == 2
    assert main(args[:-2]) == 1 and "empty output" in capsys.readouterr().err  # policy error by default


def test_an_empty_data_file_is_an_error_naming_it(tmp_path, toks, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["dataset=local_jsonl", f"dataset.source.path={empty}", f"paths.data_dir={tmp_path / 'data'}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "no records" in err
    assert not list((tmp_path / "data" / "processed").glob("*"))
    # every record dropped by the empty-output policy leaves nothing to train on either
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"instruction": "x", "output": " "}\n')
    with pytest.raises(DataError, match="no records left"):
        build(cfg_for(tmp_path, blank, toks[0]))


def test_duplicate_records_are_counted_and_reported_not_dropped(tmp_path, raw, toks, capsys):
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[0], rows[5], rows[0]]))
    plain = build(cfg_for(tmp_path, raw, toks[0]))
    res = build(cfg_for(tmp_path, dup, toks[0]))
    assert res.meta["counts"]["duplicates"] == 3 and res.meta["duplicate_indices"] == [41, 42, 43]
    assert res.meta["counts"]["records"] == plain.meta["counts"]["records"] + 3  # kept, as the file has them

    def text(r):
        return r["instruction"], r["input"], r["output"]

    assert res.records[:40] == plain.records
    assert [text(r) for r in res.records[40:]] == [text(plain.records[i]) for i in (0, 5, 0)]
    assert [r["source_index"] for r in res.records[40:]] == [41, 42, 43]
    assert "duplicates 3" in summary(res)
    # the count is not part of the definition: a file without duplicates keeps its dataset hash
    assert "duplicates" not in json.dumps(plain.meta["definition"])
    assert plain.meta["counts"]["duplicates"] == 0 and "duplicates 0" in summary(plain)


def test_identical_files_share_a_folder_and_each_build_names_its_own_file(tmp_path, raw, toks, caplog):
    twin = tmp_path / "elsewhere" / "twin.jsonl"
    twin.parent.mkdir()
    twin.write_bytes(raw.read_bytes())
    first = build(cfg_for(tmp_path, raw, toks[0]))
    with caplog.at_level("INFO", logger="pipeline.data.build"):
        second = build(cfg_for(tmp_path, twin, toks[0]))
    assert second.reused and second.folder == first.folder  # same bytes, same definition
    assert second.meta["raw"]["path"] == str(twin) and second.meta["source"]["path"] == str(twin)
    assert second.meta["raw"]["built_from"] == str(raw)
    assert "same bytes" in caplog.text and str(twin) in caplog.text
    # meta.json stays as built; reading again with the first file names it, without built_from
    assert store.read(first.folder)[1]["raw"]["path"] == str(raw)
    again = build(cfg_for(tmp_path, raw, toks[0]))
    assert again.meta["raw"]["path"] == str(raw) and "built_from" not in again.meta["raw"]
    assert first.meta["raw"]["sha256"] == second.meta["raw"]["sha256"] == again.meta["raw"]["sha256"]


@pytest.mark.shared
def test_shared_dataset_builds_offline(tmp_path, instructions_dir, llama_tokenizer_dir):
    records, meta = load_dataset(load_config(["dataset=shared_alpaca52k_short", f"paths.data_dir={tmp_path}"]))
    assert len(records) == 100 and meta["counts"]["inverted"] == 64
    assert meta["raw"]["sha256"] == "7fb3db07c93a31154807a1266b62847f55ec52c9be7c2ac642b1ceeac7adff5d"
    assert records[0]["output"] == "Give three tips for staying healthy." and records[0]["inverted"]
