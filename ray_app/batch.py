"""Batch inference with Ray Data: files in (CSV, Parquet, JSON Lines), one registered model version, Parquet out.

The model id is resolved to a concrete version once, in the driver, so an alias moved half-way through a job
never mixes two versions in one output. Rows are checked first (batch_inputs.py: cheap Ray Data tasks,
materialized), then a pool of actors, each loading the model once, predicts the good rows through the same
`TextClassifier.predict_frame` that evaluation and serving use. Bad rows never stop the job: they go to one errors
file with their reason.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ray_app.batch_inputs import SNIPPET, SOURCE, check_columns, find_inputs, read_checked
from ray_app.config import AppConfig, BatchConfig
from ray_app.errors import AppError
from ray_app.model_ids import resolve_once

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger("ray_app")
PREDICTIONS_DIR = "predictions"
ERROR_COLUMNS = [SOURCE, "id", "reason", "detail", "text"]


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


def predict(ds: Dataset, cfg: AppConfig, name: str, version: str, tracking_uri: str) -> Dataset:
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
    rows["text"] = rows["text"].astype(str).str.slice(0, SNIPPET)
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
