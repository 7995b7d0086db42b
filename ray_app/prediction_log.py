"""The prediction log's contract: its schema, its file names and its readers. Serving writes it
(`ray_app/serve/predlog.py`); monitoring, feedback and the canary report read it, each through this module, so
neither side imports the other.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import pandas as pd
import pyarrow as pa

from ray_app.errors import AppError
from ray_app.storage import filesystem

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),  # the caller's X-Request-Id (or Serve's): a reuse is the caller's to explain
        ("served_id", pa.string()),  # unique per request served (its shadow row shares it): the log's own key
        ("item", pa.int32()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("route", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("status", pa.int16()),
        ("error", pa.string()),
        ("text", pa.string()),
        ("text_sha256", pa.string()),
        ("text_chars", pa.int32()),
        ("text_words", pa.int32()),
        ("label", pa.string()),
        ("confidence", pa.float32()),
        ("probabilities", pa.string()),
        ("latency_ms", pa.float32()),
        ("cached", pa.bool_()),  # answered from the prediction cache (null in files from before it, and on errors)
    ]
)
PREFIX = "predictions-"


def with_served_key(frame):
    """`served_id` on every row of a log frame: the log's own key per request; rows written before it existed use
    their request id. Readers on both sides (canary report, feedback) join and count by it."""
    import pandas as pd

    key = frame["served_id"] if "served_id" in frame.columns else pd.Series(None, index=frame.index, dtype=object)
    return frame.assign(served_id=key.fillna(frame["request_id"]))


def text_fields(text: str, store_text: bool) -> dict[str, Any]:
    """Length descriptors are kept even when the text is not, so drift on length works in hashed mode too."""
    return {
        "text": text if store_text else None,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "text_chars": len(text),
        "text_words": len(text.split()),
    }


def _finished_files(uri: str):
    """(filesystem, root, finished Parquet files) of the log; a writer's temp files are skipped. None found is the
    user's error: the wrong directory, or nothing served yet."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError) as exc:
        raise AppError(f"prediction log {uri} cannot be listed: {exc}") from None
    files = [i.path for i in infos if i.base_name.startswith(PREFIX) and i.base_name.endswith(".parquet")]
    if not files:
        raise AppError(
            f"prediction log {uri} has no prediction files (missing directory, or nothing served yet); point "
            "it at serve_config.yaml's prediction_log.uri and send traffic first"
        )
    return fs, root, files


def _read_parquet_v1(path: str):
    """The log through Ray Data's V1 Parquet reader. Ray 2.60's default (V2) starts 32 FooterReader actors per read
    and kills them after listing, which the dashboard shows as failed tasks; `make run`'s log (one file, 114 rows)
    read in 0.1 s with V1 against 1.0-2.2 s with V2, measured on the running head. V1 samples a file while planning:
    its bar only on a terminal."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, saved[1] and sys.stderr.isatty()
    try:
        ds = ray.data.read_parquet(path, file_extensions=["parquet"], schema=SCHEMA)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved
    ds.context.enable_progress_bars = saved[1]  # the dataset keeps a copy of the context it was planned with
    return ds


def read_log(uri: str, where=None) -> pd.DataFrame:
    """The log read with Ray Data, in parallel across the cluster (monitoring, feedback); `where` is a Ray Data
    predicate expression, applied with Arrow while reading."""
    import ray

    _, root, _ = _finished_files(uri)
    try:
        # the log's schema, so files written before a column existed (served_id) read beside newer ones
        ds = _read_parquet_v1(uri if "://" in uri else root)
        if where is not None:  # an Expr: its truth value is not a plain bool
            ds = ds.filter(expr=where)
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        # Not ds.to_pandas(): since Ray 2.56 it gives pd.ArrowDtype columns, whose `.values` are object arrays that
        # Evidently's correlation step cannot average. Arrow's own conversion gives numpy dtypes.
        return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame()
    except (OSError, ValueError, pa.ArrowException, ray.exceptions.RayError) as exc:
        raise AppError(f"prediction log {uri} cannot be read: {str(exc).splitlines()[0]}") from None


def read_recent(uri: str, window_minutes: float | None = None) -> pd.DataFrame:
    """The log read in this process with pyarrow, no Ray needed (`ray-app canary-report` runs without a cluster);
    only the last `window_minutes` when given."""
    import time

    import pyarrow.dataset as pads

    fs, _, files = _finished_files(uri)
    try:
        frame = pads.dataset(files, filesystem=fs, format="parquet", schema=SCHEMA).to_table().to_pandas()
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise AppError(f"prediction log {uri} cannot be read: {str(exc).splitlines()[0]}") from None
    frame = with_served_key(frame)
    if window_minutes is not None:
        cutoff = pd.Timestamp(time.time() - window_minutes * 60, unit="s", tz="UTC")
        frame = frame[frame["timestamp"] >= cutoff]
    return frame
