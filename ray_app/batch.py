"""Batch inference with Ray Data: files in (CSV, Parquet, JSON Lines), one registered model version, Parquet out.

The model id is resolved to a concrete version once, in the driver, so an alias moved half-way through a job
never mixes two versions in one output. Rows are checked first (cheap Ray Data tasks, materialized: the check's
output is a few short strings per row), then a pool of actors, each loading the model once, predicts the good
rows through the same `TextClassifier.predict_frame` that evaluation and serving use. Bad rows never stop the job:
they go to one errors file with their reason.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ray_app.config import AppConfig, BatchConfig
from ray_app.errors import AppError
from ray_app.model_ids import resolve_once
from ray_app.text import has_visible_text, join_text

log = logging.getLogger("ray_app")
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PREDICTIONS_DIR = "predictions"
SOURCE = "source_file"
ERROR_COLUMNS = [SOURCE, "id", "reason", "detail", "text"]
_SNIPPET = 200


@dataclass
class BatchResult:
    """What a batch job read, predicted and rejected: printed, and the body of the results JSON."""

    model: dict[str, str]
    input: str
    files: list[str]
    format: str
    predictions: str
    errors_file: str
    rows_read: int
    rows_predicted: int
    rows_error: int
    errors_by_reason: dict[str, int]
    durations_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.errors_by_reason.items()) or "none"
        return (
            f"batch: {self.rows_read} rows read, {self.rows_predicted} predicted, {self.rows_error} errors "
            f"({reasons}) with {self.model['name']}/{self.model['version']}\n"
            f"predictions: {self.predictions}\nerrors: {self.errors_file}"
        )


# ---- inputs ---------------------------------------------------------------------------------------------------


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

    from ray_app.data import _header

    if fmt == "csv":
        return _header(path)
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


# ---- row checks -----------------------------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _parquet_schema(first: str, columns: list[str], id_column: str):
    """Only the needed columns, ids read as strings: files of one glob may store ids as int64 in one and string in
    another, which Ray would refuse to merge. Text columns keep their type, so a non-text one is caught per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if "://" in first:
        return None
    found = pq.read_schema(first)
    return pa.schema([pa.field(c, pa.string() if c == id_column else found.field(c).type) for c in columns])


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
    for column, value in zip(text_columns, texts, strict=True):
        if isinstance(value, str) and len(value) > max_chars:
            return "text_too_long", f"{column} has {len(value)} characters; the limit is {max_chars}"
    if not any(isinstance(v, str) and has_visible_text(v) for v in texts):
        return "empty_text", f"{' and '.join(text_columns)} are all empty (or only spaces, controls, zero-width marks)"
    return "", ""


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
        malformed.append("" if ok else str(line)[:_SNIPPET])
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


def read_checked(files: list[str], fmt: str, cfg: AppConfig):
    """The input as a materialized Dataset of checked rows, plus the CSV lines that could not be parsed."""
    import pyarrow as pa
    import ray
    from pyarrow import csv as pacsv

    from ray_app.data import _MalformedCounter

    data = cfg.data
    columns = [data.id_column, *data.text_columns]
    malformed: list[str] = []
    counter = None
    if fmt == "csv":  # as data.read_validated: unparseable lines are reported to a small actor, not a crash
        counter = ray.remote(num_cpus=0)(_MalformedCounter).remote()

        def skip(row: Any) -> str:
            ray.get(counter.add.remote(row.number, str(row.text)[:_SNIPPET]))  # waited for: counted before we ask
            return "skip"

        ds = ray.data.read_csv(
            files,
            include_paths=True,
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip),
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
        malformed = ray.get(counter.get.remote())
        ray.kill(counter)
    return checked, malformed


# ---- the model ------------------------------------------------------------------------------------------------


class Predictor:
    """Ray Data callable class: the registered version loads once per actor, then predicts batch after batch."""

    def __init__(self, model_uri: str, tracking_uri: str, name: str, version: str, settings: dict[str, Any]) -> None:
        import os

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per actor buries the log
        import mlflow
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        threads = settings["torch_threads"] or max(1, int(settings["num_cpus"]))
        torch.set_num_threads(threads)
        mlflow.set_tracking_uri(tracking_uri)
        from ray_app.registry import load_classifier
        from ray_app.registry_auth import use_node_credentials

        use_node_credentials()  # a Ray Data worker: the node's MLflow user

        self.classifier = load_classifier(model_uri)
        if settings["num_gpus"] > 0:
            self.classifier.model.to("cuda")
        self.id_column = settings["id_column"]
        self.text_columns = settings["text_columns"]
        self.batch_size = settings["batch_size"]
        self.name, self.version = name, version

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = self.classifier.predict_frame(batch, self.text_columns, batch_size=self.batch_size)
        out.insert(0, self.id_column, batch[self.id_column].to_numpy())
        out[SOURCE] = batch[SOURCE].to_numpy()
        out["model_name"] = self.name
        out["model_version"] = self.version
        return out.reset_index(drop=True)


# ---- the job --------------------------------------------------------------------------------------------------


def _prepare_output(output: str, errors_name: str, overwrite: bool) -> tuple[str, str]:
    """Refuse to mix a new job's files with an old one's, unless told to replace them."""
    if "://" in output:  # remote: Ray's write refuses an existing directory unless overwriting (SaveMode)
        return f"{output.rstrip('/')}/{PREDICTIONS_DIR}", f"{output.rstrip('/')}/{errors_name}"
    out = Path(output).expanduser().resolve()
    predictions, errors = out / PREDICTIONS_DIR, out / errors_name
    if (predictions.exists() and any(predictions.iterdir())) or errors.exists():
        if not overwrite:
            raise AppError(f"output {out} already holds results; choose another --output or pass --overwrite")
        errors.unlink(missing_ok=True)
    shutil.rmtree(predictions, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return str(predictions), str(errors)


def _write_errors(frame: pd.DataFrame, path: str, fmt: str) -> None:
    """One file, local or remote (pyarrow's filesystems), whatever the number of input files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path) if "://" in path else (fs.LocalFileSystem(), path)
    with filesystem.open_output_stream(inner) as stream:
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), stream)
        else:
            stream.write(frame.to_json(orient="records", lines=True, force_ascii=False).encode())


def _count_rows(directory: str) -> int:
    """Rows actually written, read from the Parquet footers (no data read)."""
    import pyarrow.dataset as pads

    try:
        return pads.dataset(directory, format="parquet").count_rows()
    except (FileNotFoundError, OSError):  # no good rows: Ray wrote no file
        return 0


def _cause(exc: BaseException) -> BaseException:
    """The error under Ray's wrappers (RayTaskError, UserCodeException): the one that names the problem."""
    seen = {id(exc)}
    while (inner := getattr(exc, "cause", None) or exc.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """A failure inside Ray Data (an unreadable file, a model that will not load) as one line, not a remote
    traceback; bad rows never get here, they are data."""
    try:
        yield
    except AppError:
        raise
    except Exception as exc:  # re-raised as the user's error, with the cause's own message
        cause = _cause(exc)
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        log.debug("%s failed", what, exc_info=True)
        raise AppError(f"{what} failed: {type(cause).__name__}: {first}") from None


def run_batch(
    cfg: AppConfig, model_id: str, input_pattern: str, output: str, tracking_uri: str, overwrite: bool = False
) -> BatchResult:
    """Check, predict, write. Needs Ray connected and MLflow pointed at `tracking_uri` (runtime.py does both)."""
    from ray.data import SaveMode

    bcfg: BatchConfig = cfg.batch
    started = time.perf_counter()
    files, fmt = find_inputs(input_pattern)
    id_column = cfg.data.id_column
    check_columns(files, fmt, [id_column, *cfg.data.text_columns])
    name, version = resolve_once(model_id, cfg.registry.model_name)
    pred_dir, errors_path = _prepare_output(output, f"errors.{bcfg.errors_format}", overwrite)
    with _stage(f"reading {fmt} input {input_pattern}"):
        checked, malformed = read_checked(files, fmt, cfg)
    timings = {"read_and_check": time.perf_counter() - started}

    mark = time.perf_counter()
    # Local output was checked (and cleared with --overwrite) above; a remote one is left to Ray's save modes.
    mode = SaveMode.APPEND if "://" not in pred_dir else SaveMode.OVERWRITE if overwrite else SaveMode.ERROR
    with _stage(f"batch inference with models:/{name}/{version}"):
        # The filter and the write reserve no CPU: Ray Data fuses neither into the actors' stage, and with actors
        # holding every CPU they would wait forever (seen: a 2-CPU actor on 2 CPUs hung before its first batch).
        good = checked.filter(expr="reason == ''", num_cpus=0)
        predicted_ds = predict(good, cfg, name, version, tracking_uri)
        predicted_ds.write_parquet(pred_dir, mode=mode, ray_remote_args={"num_cpus": 0})
    timings["predict_and_write"] = time.perf_counter() - mark

    bad = checked.filter(expr="reason != ''").to_pandas()
    errors = _errors_frame(bad, malformed, id_column)
    _write_errors(errors, errors_path, bcfg.errors_format)
    good = checked.count() - len(bad)
    predicted = _count_rows(pred_dir) if "://" not in pred_dir else good
    timings["total"] = time.perf_counter() - started
    return BatchResult(
        model={"requested": model_id, "name": name, "version": version, "uri": f"models:/{name}/{version}"},
        input=input_pattern,
        files=files,
        format=fmt,
        predictions=pred_dir,
        errors_file=errors_path,
        rows_read=good + len(errors),
        rows_predicted=predicted,
        rows_error=len(errors),
        errors_by_reason=dict(sorted(Counter(errors["reason"]).items())),
        durations_s={k: round(v, 2) for k, v in timings.items()},
    )


def predict(ds, cfg: AppConfig, name: str, version: str, tracking_uri: str):
    """`ds` (checked rows) -> a Dataset of predictions, by a pool of `batch.concurrency` model actors."""
    import ray
    from ray.data import ActorPoolStrategy

    b = cfg.batch
    total = ray.cluster_resources().get("GPU" if b.num_gpus else "CPU", 0)
    need = b.concurrency * (b.num_gpus or b.num_cpus)
    if need > total:  # an autoscaling cluster may still grow; a fixed one would wait forever
        kind = "GPUs" if b.num_gpus else "CPUs"
        log.warning("batch: %d actors need %s %s; the cluster has %s now", b.concurrency, need, kind, total)
    settings = {
        "torch_threads": b.torch_threads,
        "num_cpus": b.num_cpus,
        "num_gpus": b.num_gpus,
        "batch_size": b.batch_size,
        "id_column": cfg.data.id_column,
        "text_columns": cfg.data.text_columns,
    }
    return ds.map_batches(
        Predictor,
        fn_constructor_args=(f"models:/{name}/{version}", tracking_uri, name, version, settings),
        batch_size=b.batch_size,
        batch_format="pandas",
        udf_modifying_row_count=False,
        compute=ActorPoolStrategy(size=b.concurrency),
        num_cpus=b.num_cpus,
        num_gpus=b.num_gpus or None,
    )


def _errors_frame(bad: pd.DataFrame, malformed: list[str], id_column: str) -> pd.DataFrame:
    """Bad rows and unparseable lines as one table (an empty Dataset converts to a frame without columns)."""
    rows = bad.reindex(columns=[SOURCE, id_column, "reason", "detail", "text"]).rename(columns={id_column: "id"})
    rows["text"] = rows["text"].astype(str).str.slice(0, _SNIPPET)
    lines = pd.DataFrame(
        {
            SOURCE: [None] * len(malformed),
            "id": [None] * len(malformed),
            "reason": ["malformed_csv"] * len(malformed),
            "detail": ["the line does not split into the header's columns"] * len(malformed),
            "text": malformed,
        }
    )
    frames = [f for f in (rows, lines) if len(f)]
    frame = pd.concat(frames, ignore_index=True) if frames else rows.reset_index(drop=True)
    return frame[ERROR_COLUMNS].astype(object)
