"""Raw files -> validated Alpaca records ``{instruction, input, output}``.

File formats: ``.json`` (a JSON array of objects), ``.jsonl`` (one object per line; blank lines are
skipped) and ``.parquet``. Field mappings (``dataset.source.format``):

- ``alpaca``: ``instruction``, ``input`` (optional, missing -> ``""``), ``output``;
- ``dolly``: ``instruction``, ``context`` -> input (optional), ``response`` -> output;
- ``ultrafeedback``: ``prompt`` -> instruction, input ``""``, output = the content of the (last)
  ``assistant`` message of ``chosen`` (a list of ``{role, content}``).

Every problem is reported as a :class:`Problem` naming the file, the record index (0-based, in file
order), the line (JSON Lines and JSON arrays where known) and the field; several problems are
collected and raised together as one :class:`DataError` (the first ``MAX_SHOWN`` are printed).

Records with an empty or whitespace-only output follow ``empty_output``: ``error`` (a problem),
``drop`` (removed, their indices returned so that the caller reports them), or ``keep``.
All functions here are deterministic; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pipeline import chat

# Bump when parsing, field mapping or validation changes what records come out of a raw file
# (it is part of the processed-dataset hash, see store.py).
RECORDS_VERSION = 1

FORMATS = ("alpaca", "dolly", "ultrafeedback", "messages")
EMPTY_OUTPUT_POLICIES = ("error", "drop", "keep")
FIELDS = ("instruction", "input", "output")
MAX_SHOWN = 10

Record = Dict[str, Any]


@dataclass(frozen=True)
class Problem:
    file: str
    index: Optional[int]  # record index (0-based); None when the file cannot be split into records
    field: Optional[str]  # source field name (e.g. `response` for dolly); None for whole-record problems
    message: str
    line: Optional[int] = None  # 1-based line number, where known
    byte_offset: Optional[int] = None  # for invalid UTF-8

    def __str__(self) -> str:
        where = [self.file]
        if self.index is not None:
            where.append(f"record {self.index}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.byte_offset is not None:
            where.append(f"byte {self.byte_offset}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}"


class DataError(ValueError):
    """One or more problems in a data file; ``.problems`` lists them all (the message shows 10)."""

    def __init__(self, problems: Sequence[Problem], header: str = "invalid data"):
        self.problems: List[Problem] = list(problems)
        shown = "\n  ".join(str(p) for p in self.problems[:MAX_SHOWN])
        more = len(self.problems) - MAX_SHOWN
        tail = f"\n  ... and {more} more problem(s)" if more > 0 else ""
        super().__init__(f"{header}: {len(self.problems)} problem(s)\n  {shown}{tail}")

    @classmethod
    def single(cls, file: str, message: str, **kw) -> "DataError":
        return cls(
            [Problem(file=file, index=kw.pop("index", None), field=kw.pop("field", None), message=message, **kw)]
        )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Reading raw files into (index, line, object) triples
# ------------------------------------------------------------------------------------------------
@dataclass
class RawItem:
    index: int
    line: Optional[int]
    obj: Any


def _decode_error(file: str, data: bytes, err: UnicodeDecodeError, base: int = 0) -> Problem:
    offset = base + err.start
    line = data[: err.start].count(b"\n") + 1 if base == 0 else None
    return Problem(
        file=file,
        index=None,
        field=None,
        line=line,
        byte_offset=offset,
        message=f"invalid UTF-8 ({err.reason}, byte 0x{data[err.start]:02x})",
    )


def _strip_bom(text: str) -> str:
    return text[1:] if text.startswith("\ufeff") else text


def read_json_array(path: Path) -> List[RawItem]:
    file = str(path)
    data = path.read_bytes()
    try:
        text = _strip_bom(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError([_decode_error(file, data, e)], "cannot read JSON") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError.single(file, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno) from None
    if not isinstance(obj, list):
        raise DataError.single(
            file, f"expected a JSON array of records, got {type(obj).__name__} (use .jsonl for one object per line)"
        )
    # Line numbers of the array's elements are not kept by json; index identifies the record.
    return [RawItem(i, None, o) for i, o in enumerate(obj)]


def read_jsonl(path: Path) -> List[RawItem]:
    """One JSON object per line. Every malformed line is reported (with its line number)."""
    file = str(path)
    data = path.read_bytes()
    items: List[RawItem] = []
    problems: List[Problem] = []
    offset = 0
    index = 0
    for lineno, raw_line in enumerate(data.split(b"\n"), start=1):
        line_start = offset
        offset += len(raw_line) + 1
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                Problem(
                    file=file,
                    index=index,
                    field=None,
                    line=lineno,
                    byte_offset=line_start + e.start,
                    message=f"invalid UTF-8 ({e.reason}, byte 0x{raw_line[e.start]:02x})",
                )
            )
            index += 1
            continue
        if lineno == 1:
            text = _strip_bom(text)
        if not text.strip():
            continue  # blank lines (e.g. the final newline) are not records
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(
                Problem(
                    file=file,
                    index=index,
                    field=None,
                    line=lineno,
                    message=f"malformed JSON: {e.msg} (column {e.colno})",
                )
            )
        else:
            items.append(RawItem(index, lineno, obj))
        index += 1
    if problems:
        raise DataError(problems, "cannot read JSON Lines")
    return items


def read_parquet(path: Path) -> List[RawItem]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError.single(str(path), f"cannot read parquet: {e}") from None
    return [RawItem(i, None, row) for i, row in enumerate(table.to_pylist())]


def read_raw(path: Path) -> List[RawItem]:
    """Objects of a raw file, chosen by suffix (.json array, .jsonl, .parquet)."""
    path = Path(path)
    if not path.is_file():
        raise DataError.single(str(path), "file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return read_json_array(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise DataError.single(str(path), f"unknown file type '{suffix}' (expected .json, .jsonl or .parquet)")


# ------------------------------------------------------------------------------------------------
# Field mapping and validation
# ------------------------------------------------------------------------------------------------
# format -> (instruction field, input field or None, output field, optional input?)
_SIMPLE = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
}


def _string(file: str, item: RawItem, obj: dict, key: str, optional: bool, problems: List[Problem]) -> Optional[str]:
    if key not in obj:
        if optional:
            return ""
        problems.append(Problem(file, item.index, key, "missing", line=item.line))
        return None
    v = obj[key]
    if not isinstance(v, str):
        problems.append(
            Problem(file, item.index, key, f"must be a string, got {type(v).__name__} ({_short(v)})", line=item.line)
        )
        return None
    return v


def _short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _ultrafeedback_output(file: str, item: RawItem, obj: dict, problems: List[Problem]) -> Optional[str]:
    if "chosen" not in obj:
        problems.append(Problem(file, item.index, "chosen", "missing", line=item.line))
        return None
    msgs = obj["chosen"]
    if not isinstance(msgs, list):
        problems.append(
            Problem(
                file,
                item.index,
                "chosen",
                f"must be a list of {{role, content}} messages, got {type(msgs).__name__}",
                line=item.line,
            )
        )
        return None
    answers = [m for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
    if not answers:
        problems.append(Problem(file, item.index, "chosen", "has no assistant message", line=item.line))
        return None
    content = answers[-1].get("content")
    if not isinstance(content, str):
        problems.append(
            Problem(
                file,
                item.index,
                "chosen",
                f"assistant content must be a string, got {type(content).__name__}",
                line=item.line,
            )
        )
        return None
    return content


def _chat_record(file: str, item: RawItem, obj: dict, problems: List[Problem]) -> Optional[Record]:
    """A chat record: ``messages`` checked (pipeline/chat.py; each problem names the message index
    and field); ``instruction``/``output`` repeat the first user and the last assistant content for
    display and de-duplication only (tokenization renders the messages)."""
    msgs = obj.get("messages")
    found = chat.check_messages(msgs) if "messages" in obj else ["missing"]
    for why in found:
        problems.append(Problem(file, item.index, "messages", why, line=item.line))
    if found:
        return None
    messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
    user = next(m["content"] for m in messages if m["role"] == "user")
    last = [m["content"] for m in messages if m["role"] == "assistant"][-1]
    return {"instruction": user, "input": "", "output": last, "messages": messages}


def map_record(file: str, item: RawItem, fmt: str, problems: List[Problem]) -> Optional[Record]:
    """One raw object -> an Alpaca record, or None (problems appended)."""
    obj = item.obj
    if not isinstance(obj, dict):
        problems.append(
            Problem(file, item.index, None, f"record must be a JSON object, got {type(obj).__name__}", line=item.line)
        )
        return None
    n0 = len(problems)
    if fmt in _SIMPLE:
        k_ins, k_inp, k_out = _SIMPLE[fmt]
        ins = _string(file, item, obj, k_ins, False, problems)
        inp = _string(file, item, obj, k_inp, True, problems)
        out = _string(file, item, obj, k_out, False, problems)
    elif fmt == "messages":
        return _chat_record(file, item, obj, problems)
    elif fmt == "ultrafeedback":
        k_ins, k_out = "prompt", "chosen"
        ins = _string(file, item, obj, "prompt", False, problems)
        inp = ""
        out = _ultrafeedback_output(file, item, obj, problems)
    else:
        raise ValueError(f"unknown format {fmt!r} (expected one of {FORMATS})")
    if ins is not None and not ins.strip():
        problems.append(Problem(file, item.index, k_ins, "empty instruction", line=item.line))
    if len(problems) > n0:
        return None
    return {"instruction": ins, "input": inp, "output": out}


@dataclass
class LoadResult:
    """Validated records plus what happened to the others (for meta.json and the statistics)."""

    records: List[Record]
    source_index: List[int]  # record index in the raw file of each kept record
    n_raw: int  # records in the raw file
    n_considered: int  # after max_records
    dropped_empty_output: List[int] = field(default_factory=list)  # raw indices
    kept_empty_output: List[int] = field(default_factory=list)  # raw indices (policy keep)
    # raw indices of kept records whose instruction, input and output equal an earlier kept record's
    # (counted and reported, not removed: the records are trained on as the file has them)
    duplicates: List[int] = field(default_factory=list)


def records_from_items(
    items: Sequence[RawItem], fmt: str, file: str, empty_output: str = "error", max_records: Optional[int] = None
) -> LoadResult:
    """Map and validate raw objects; raise DataError listing every problem found.

    ``max_records`` keeps the first N records of the file (before the empty-output policy).
    """
    if empty_output not in EMPTY_OUTPUT_POLICIES:
        raise ValueError(f"empty_output must be one of {EMPTY_OUTPUT_POLICIES}, got {empty_output!r}")
    n_raw = len(items)
    if n_raw == 0:
        raise DataError.single(file, "no records (the file is empty)")
    considered = items if max_records is None else items[:max_records]
    problems: List[Problem] = []
    res = LoadResult([], [], n_raw=n_raw, n_considered=len(considered))
    out_key = {"alpaca": "output", "dolly": "response", "ultrafeedback": "chosen", "messages": "messages"}[fmt]
    seen: set = set()
    for item in considered:
        rec = map_record(file, item, fmt, problems)
        if rec is None:
            continue
        if not rec["output"].strip():
            if empty_output == "error":
                problems.append(
                    Problem(
                        file,
                        item.index,
                        out_key,
                        "empty output (set dataset.empty_output=drop or keep to accept)",
                        line=item.line,
                    )
                )
                continue
            if empty_output == "drop":
                res.dropped_empty_output.append(item.index)
                continue
            res.kept_empty_output.append(item.index)
        key = (rec["instruction"], rec["input"], rec["output"], json.dumps(rec.get("messages"), ensure_ascii=False))
        if key in seen:
            res.duplicates.append(item.index)
        seen.add(key)
        res.records.append(rec)
        res.source_index.append(item.index)
    if problems:
        raise DataError(problems, f"invalid records in {file}")
    if not res.records:
        raise DataError.single(
            file, f"no records left: all {len(considered)} have an empty output (dataset.empty_output={empty_output})"
        )
    return res


def load_records(
    path: Path, fmt: str = "alpaca", empty_output: str = "error", max_records: Optional[int] = None
) -> LoadResult:
    """Read, map and validate a raw file (see module docstring)."""
    path = Path(path)
    return records_from_items(read_raw(path), fmt, str(path), empty_output, max_records)
