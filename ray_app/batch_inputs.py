"""Batch inference's inputs: which files, do they have the columns, and which of their rows serving would refuse.

Kept apart from the job itself (batch.py) because all of it runs before a model is touched: a wrong glob or a
misnamed column fails here in the driver, and the per-row checks run as cheap Ray Data tasks whose output (a few
short strings per row) is small enough to materialize.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ray_app.config import AppConfig
from ray_app.csv_read import count_malformed, header, malformed_lines, parse_options
from ray_app.errors import AppError
from ray_app.text import join_text, text_problem

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.data import Dataset

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SOURCE = "source_file"  # the input file a row came from, carried to the predictions and the errors file
SNIPPET = 200  # characters of a bad row's text (or line) kept in the errors file


def find_inputs(pattern: str) -> tuple[list[str], str]:
    """A file, a directory (its files of known formats) or a glob -> sorted files of one format.

    The format comes from the extension, so a stray file of another kind is named instead of being parsed wrongly.
    """
    if "://" in pattern:  # a remote URI: Ray Data lists and reads it; only the format is checked here
        return [pattern], _format_of(pattern.rstrip("/"), pattern)
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise AppError(f"input directory {pattern} holds no {', '.join(FORMATS)} files")
    else:
        files = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            what = "matches no file" if glob.has_magic(str(path)) else "does not exist"
            raise AppError(f"input {pattern} {what}; pass a file, a directory or a glob such as 'data/*.csv'")
    formats = {f: _format_of(f, pattern) for f in files}
    if len(set(formats.values())) > 1:
        kinds = sorted(set(formats.values()))
        raise AppError(f"input {pattern} matches files of several formats ({', '.join(kinds)}); give one per run")
    for f in files:
        _check_readable(f)
    return [str(Path(f).resolve()) for f in files], next(iter(formats.values()))


def _format_of(path: str, pattern: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise AppError(
            f"input file {path} (from {pattern}) has extension {suffix or '(none)'!r}; "
            f"batch reads {', '.join(FORMATS)} (JSON Lines: one object per line)"
        )
    return FORMATS[suffix]


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise AppError(f"input file {path} cannot be read: {exc.strerror or exc}") from None


def check_columns(files: list[str], fmt: str, required: list[str]) -> None:
    """Every file must have the id and text columns: a misnamed column would otherwise make every row an error."""
    for path in files:
        if "://" in path:
            continue
        columns = _columns_of(path, fmt)
        missing = [c for c in required if c not in columns]
        if missing:
            raise AppError(
                f"input file {path} lacks column(s) {missing}; it has {columns}. Rename them in the file or set "
                "data.id_column / data.text_columns"
            )


def _columns_of(path: str, fmt: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "csv":
        return header(path)
    if fmt == "parquet":
        try:
            return pq.read_schema(path).names
        except (OSError, pa.ArrowException) as exc:
            raise AppError(f"input file {path} cannot be read as Parquet: {str(exc).splitlines()[0]}") from None
    keys: dict[str, None] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:  # JSON Lines: the keys of its first objects
        for _, line in zip(range(100), fh, strict=False):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                keys.update(dict.fromkeys(obj))
    return list(keys)


# The rules serving applies to a request, per field (text.text_problem, which serve/schemas.check_items uses too), not
# rows.py's rules for labelled rows, whose length limit is on the joined text and whose ids are plain strings.


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _nested(value: Any) -> bool:
    return isinstance(value, (list, dict, tuple, np.ndarray))


def _as_id(value: Any) -> str | None:
    """Ids as strings: a Parquet int column (float once pandas meets a null) reads back as '6', not '6.0'."""
    if _nested(value) or _missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def check_rows(batch: pd.DataFrame, id_column: str, text_columns: list[str], max_chars: int) -> pd.DataFrame:
    """The rules serving applies to a request, per row: an id, string texts, not all empty, none too long.

    Returns the id, the text columns (strings, nulls as ''), the joined text, and `reason`/`detail` ('' when good).
    """
    reasons, details = [], []
    for row in batch[[id_column, *text_columns]].itertuples(index=False):
        reason, detail = _row_problem(row[0], row[1:], id_column, text_columns, max_chars)
        reasons.append(reason)
        details.append(detail)
    out = pd.DataFrame(index=batch.index)
    out[SOURCE] = batch["path"].astype(str) if "path" in batch.columns else None
    out[id_column] = [_as_id(v) for v in batch[id_column]]
    for column in text_columns:
        out[column] = [v if isinstance(v, str) else "" for v in batch[column]]
    out["text"] = join_text(out, text_columns)
    out["reason"] = reasons
    out["detail"] = details
    return out


def _row_problem(row_id: Any, texts: tuple, id_column: str, text_columns: list[str], max_chars: int) -> tuple[str, str]:
    if _as_id(row_id) is None:
        return "missing_id", f"{id_column} is empty or not a single value"
    for column, value in zip(text_columns, texts, strict=True):
        if not _missing(value) and not isinstance(value, str):
            return "non_string", f"{column} is {type(value).__name__}, not text"
    problem = text_problem(dict(zip(text_columns, texts, strict=True)), max_chars)
    if problem is None:
        return "", ""
    reason, column = problem
    if reason == "text_too_long":
        value = texts[text_columns.index(column)]
        return reason, f"{column} has {len(value)} characters; the limit is {max_chars}"
    return reason, f"{' and '.join(text_columns)} are all empty (or only spaces, controls, zero-width marks)"


def parse_json_lines(batch: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """JSON Lines are parsed here, line by line, so one broken line is one error row, not a failed read (pyarrow's
    JSON reader has no handler for bad lines and fails a whole file on a type change between lines)."""
    values: dict[str, list[Any]] = {c: [] for c in columns}
    malformed = []
    for line in batch["text"]:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        ok = isinstance(obj, dict)
        malformed.append("" if ok else str(line)[:SNIPPET])
        for c in columns:
            values[c].append(obj.get(c) if ok else None)
    out = pd.DataFrame(values, index=batch.index)
    out["path"] = batch["path"]
    out["_malformed"] = malformed
    return out


def _checked(batch: pd.DataFrame, id_column: str, text_columns: list[str], max_chars: int) -> pd.DataFrame:
    out = check_rows(batch, id_column, text_columns, max_chars)
    if "_malformed" in batch.columns:  # JSON Lines that did not parse into an object
        bad = batch["_malformed"] != ""
        out.loc[bad, "reason"] = "malformed_json"
        out.loc[bad, "detail"] = "not a JSON object"
        out.loc[bad, "text"] = batch.loc[bad, "_malformed"]
    return out


def _parquet_schema(first: str, columns: list[str], id_column: str) -> pa.Schema | None:
    """Only the needed columns, ids read as strings: files of one glob may store ids as int64 in one and string in
    another, which Ray would refuse to merge. Text columns keep their type, so a non-text one is caught per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if "://" in first:
        return None
    found = pq.read_schema(first)
    return pa.schema([pa.field(c, pa.string() if c == id_column else found.field(c).type) for c in columns])


def read_checked(files: list[str], fmt: str, cfg: AppConfig) -> tuple[Dataset, list[str]]:
    """The input as a materialized Dataset of checked rows, plus the CSV lines that could not be parsed."""
    import pyarrow as pa
    import ray
    from pyarrow import csv as pacsv

    data = cfg.data
    columns = [data.id_column, *data.text_columns]
    malformed: list[str] = []
    counter = None
    if fmt == "csv":  # as data.read_validated: unparseable lines are reported to a small actor, not a crash
        counter, skip = count_malformed(SNIPPET)
        ds = ray.data.read_csv(
            files,
            include_paths=True,
            parse_options=parse_options(skip),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns}, include_columns=columns, include_missing_columns=True
            ),
        )
    elif fmt == "parquet":
        ds = ray.data.read_parquet(files, schema=_parquet_schema(files[0], columns, data.id_column), include_paths=True)
    else:
        ds = ray.data.read_text(files, include_paths=True).map_batches(
            parse_json_lines, fn_kwargs={"columns": columns}, batch_format="pandas"
        )
    kwargs = {"id_column": data.id_column, "text_columns": data.text_columns, "max_chars": cfg.batch.max_text_chars}
    checked = ds.map_batches(_checked, fn_kwargs=kwargs, batch_format="pandas", udf_modifying_row_count=False)
    checked = checked.materialize()
    if counter is not None:
        malformed = malformed_lines(counter)
    return checked, malformed
