"""Ray Data preprocessing: read the CSV, validate every row, split stably, tokenize.

Row checks run in parallel in Ray Data; the steps that need a global view (duplicates, the stratified split,
leakage across splits) run on the validated table in the driver, which stays small because it is one row per
labelled example with a few short strings.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pyarrow import csv as pacsv

from ray_app.buckets import bucket
from ray_app.config import DataConfig
from ray_app.csv_read import count_malformed, header, malformed_lines, parse_options
from ray_app.errors import AppError
from ray_app.html_report import page
from ray_app.rows import normalize, validate_batch

log = logging.getLogger("ray_app")
SPLITS = ("train", "val", "test")


@dataclass
class DataReport:
    """What preprocessing kept and dropped, and why: logged to MLflow and the results JSON."""

    path: str
    rows_read: int
    rows_valid: int
    bad_rows: dict[str, int]
    bad_fraction: float
    split_sizes: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    digest: str
    bad_examples: list[dict[str, Any]] = field(default_factory=list)
    feedback_rows: int = 0  # rows from the feedback store added to the training split
    feedback_bad: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Splits:
    """Train/val/test frames with columns id, text columns, label, text."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    report: DataReport

    def frame(self, name: str) -> pd.DataFrame:
        return getattr(self, name)


def _check_file(path: str) -> None:
    if "://" in path:
        return
    p = Path(path)
    if not p.is_file():
        raise AppError(
            f"data file {path} does not exist; set data.path to a CSV with columns id, title, description, tag"
        )
    try:
        with p.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise AppError(f"data file {path} cannot be read: {exc}") from None


def read_validated(cfg: DataConfig) -> tuple[pd.DataFrame, list[str]]:
    """Read with Ray Data and run the row checks in parallel; returns rows with a `reason` and malformed lines."""
    import ray

    _check_file(cfg.path)
    required = [cfg.id_column, *cfg.text_columns, cfg.label_column]
    columns = header(cfg.path)
    missing = [c for c in required if c not in columns]
    if missing:
        raise AppError(
            f"data file {cfg.path} lacks required column(s) {missing}; it has {columns}. "
            "Fix the file or set data.id_column / data.text_columns / data.label_column"
        )
    counter, skip_malformed = count_malformed()
    ds = ray.data.read_csv(
        cfg.path,
        parse_options=parse_options(skip_malformed),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in required}),
        num_cpus=cfg.cpus_per_task,
    )
    validated = ds.map_batches(
        validate_batch, fn_kwargs={"cfg": cfg}, batch_format="pandas", num_cpus=cfg.cpus_per_task
    ).to_pandas()
    return validated, malformed_lines(counter)


def split_rank(row_id: str, salt: str) -> float:
    """A row's fixed place in [0, 1) for the split: the same id lands in the same split in every version."""
    return bucket(f"{salt}:{row_id}")


def mark_duplicates(frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Exact duplicates keep their first row; the same text under different labels drops every copy."""
    frame = frame.copy()
    good = frame["reason"] == ""
    key = frame["text"].map(normalize)
    dup_id = good & frame.duplicated(subset=[cfg.id_column], keep="first")
    frame.loc[dup_id, "reason"] = "duplicate_id"
    good = frame["reason"] == ""
    labels_per_text = frame[good].groupby(key[good])["label"].nunique()
    conflicting = good & key.map(labels_per_text).fillna(0).gt(1)
    frame.loc[conflicting, "reason"] = "conflicting_labels"
    good = frame["reason"] == ""
    frame.loc[good & key.where(good).duplicated(keep="first"), "reason"] = "duplicate"
    return frame


def assign_splits(frame: pd.DataFrame, cfg: DataConfig) -> pd.Series:
    """Stratified split, stable across runs: within each label, rows are ranked by a salted hash of their id."""
    split = pd.Series("train", index=frame.index, dtype=object)
    ranks = frame[cfg.id_column].map(lambda i: split_rank(str(i), cfg.split.salt))
    for _, group in frame.groupby("label"):
        order = ranks[group.index].sort_values(kind="stable").index
        n_test = round(len(order) * cfg.split.test_fraction)
        n_val = round(len(order) * cfg.split.val_fraction)
        split[order[:n_test]] = "test"
        split[order[n_test : n_test + n_val]] = "val"
    return split


def mark_leakage(frame: pd.DataFrame, split: pd.Series, title_column: str) -> pd.Series:
    """A val/test row whose title (the first text column) also appears in another split would leak: drop it."""
    reasons = pd.Series("", index=frame.index, dtype=object)
    title_key = frame[title_column].fillna("").map(normalize)
    for name in ("val", "test"):
        mine = split == name
        others = set(title_key[~mine])
        reasons[mine & title_key.isin(others)] = "leakage"
    return reasons


def digest_of(frame: pd.DataFrame, id_column: str) -> str:
    rows = frame.sort_values(id_column)[[id_column, "text", "label"]].astype(str)
    return hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).values.tobytes()).hexdigest()[:16]


def prepare(cfg: DataConfig) -> Splits:
    """Read, validate, deduplicate and split; fails only when the bad fraction passes `max_bad_fraction`."""
    raw, malformed = read_validated(cfg)
    frame = mark_duplicates(raw.reset_index(drop=True), cfg)
    good = frame[frame["reason"] == ""]
    if cfg.max_rows is not None:  # a stable subset for smoke runs: the rows with the lowest hash
        ranks = good[cfg.id_column].map(lambda i: split_rank(str(i), cfg.split.salt))
        good = good.loc[ranks.sort_values(kind="stable").index[: cfg.max_rows]]
    split = assign_splits(good, cfg)
    leak = mark_leakage(good, split, cfg.text_columns[0])
    frame.loc[leak[leak != ""].index, "reason"] = "leakage"
    valid = good[leak == ""]
    rows_read = len(frame) + len(malformed)
    bad = Counter(frame.loc[frame["reason"] != "", "reason"])
    if malformed:
        bad["malformed_csv"] = len(malformed)
    bad_fraction = sum(bad.values()) / max(rows_read, 1)
    columns = [cfg.id_column, *cfg.text_columns, "label", "text"]
    parts = {name: valid.loc[split[valid.index] == name, columns].reset_index(drop=True) for name in SPLITS}
    feedback, feedback_bad = _feedback(cfg, parts)
    parts["train"] = pd.concat([parts["train"], feedback], ignore_index=True) if len(feedback) else parts["train"]
    report = DataReport(
        path=cfg.path,
        rows_read=rows_read,
        rows_valid=len(valid),
        bad_rows=dict(sorted(bad.items())),
        bad_fraction=round(bad_fraction, 4),
        split_sizes={name: len(p) for name, p in parts.items()},
        class_counts={name: p["label"].value_counts().to_dict() for name, p in parts.items()},
        digest=digest_of(pd.concat([valid[columns], feedback]) if len(feedback) else valid, cfg.id_column),
        bad_examples=_bad_examples(frame, malformed, cfg),
        feedback_rows=len(feedback),
        feedback_bad=feedback_bad,
    )
    log.info("data: %d rows read, %d valid, bad rows by reason: %s", rows_read, report.rows_valid, report.bad_rows)
    if cfg.feedback_uri:
        log.info("data: %d feedback rows added to training, dropped: %s", len(feedback), feedback_bad)
    if bad_fraction > cfg.max_bad_fraction:
        raise AppError(
            f"{bad_fraction:.1%} of the rows in {cfg.path} are bad ({report.bad_rows}), more than "
            f"data.max_bad_fraction={cfg.max_bad_fraction}; fix the file or raise the limit"
        )
    for name, part in parts.items():
        if part.empty:
            raise AppError(f"the {name} split is empty ({report.split_sizes}); add rows or change data.split")
    return Splits(**parts, labels=list(cfg.labels), report=report)


def labelled_rows(cfg: DataConfig, path: Path) -> pd.DataFrame:
    """Every good row of another labelled CSV (`ray-app evaluate --data`), checked by the training data's rules."""
    other = prepare(cfg.model_copy(update={"path": str(path), "max_rows": None, "feedback_uri": None}))
    return pd.concat([other.train, other.val, other.test], ignore_index=True)


def _feedback(cfg: DataConfig, parts: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of the feedback store for the training split (none without data.feedback_uri)."""
    if not cfg.feedback_uri:
        return pd.DataFrame(), {}
    from ray_app.feedback import training_rows

    return training_rows(cfg, parts)


def _bad_examples(frame: pd.DataFrame, malformed: list[str], cfg: DataConfig, per_reason: int = 5) -> list[dict]:
    bad = frame[frame["reason"] != ""]
    examples = [
        {"reason": r, "id": row[cfg.id_column], "text": str(row["text"])[:200]}
        for r, group in bad.groupby("reason")
        for _, row in group.head(per_reason).iterrows()
    ]
    examples += [{"reason": "malformed_csv", "id": None, "text": line} for line in malformed[:per_reason]]
    return examples


class Tokenize:
    """Ray Data callable class: the fast tokenizer is loaded once per actor, not per batch."""

    def __init__(self, tokenizer_path: str, labels: list[str], max_length: int) -> None:
        from ray_app.model import load_tokenizer  # here, so read and validate tasks never import torch

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.label_ids = {label: i for i, label in enumerate(labels)}
        self.max_length = max_length

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        enc = self.tokenizer(
            list(batch["text"]), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {
            "input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": enc["attention_mask"].astype(np.int8),
            "labels": batch["label"].map(self.label_ids).to_numpy(dtype=np.int64),
            "split": batch["split"].to_numpy(dtype=object),
        }


def tokenize(
    splits: Splits,
    tokenizer_path: str,
    max_length: int,
    names: tuple[str, ...] = ("train", "val"),
    cpus: float = 0.25,
):
    """Ray Datasets of token ids, one per split, materialized before training starts.

    Materializing up front means tokenization never competes with training workers for CPUs; string columns are
    dropped because `iter_torch_batches` cannot carry them. All splits go through one actor, so the tokenizer
    loads once.
    """
    import ray
    from ray.data import ActorPoolStrategy

    frame = pd.concat([splits.frame(n)[["text", "label"]].assign(split=n) for n in names], ignore_index=True)
    # from_items builds its blocks here in the driver; ray.data.from_pandas runs a metadata task that asks for a whole
    # CPU and takes no resource setting, so beside a Serve app that leaves 0.75 CPU free it never ran.
    tokenized = (
        ray.data.from_items(frame.to_dict("records"))
        .map_batches(
            Tokenize,
            fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "labels": splits.labels, "max_length": max_length},
            batch_format="pandas",
            batch_size=256,
            compute=ActorPoolStrategy(size=1),
            num_cpus=cpus,
        )
        .materialize()
    )
    return {
        n: tokenized.filter(expr=f"split == '{n}'", num_cpus=cpus).drop_columns(["split"], num_cpus=cpus).materialize()
        for n in names
    }


def dvc_tags(cfg: DataConfig) -> dict[str, str]:
    """`dvc.data.*` (the CSV) and `dvc.feedback.*` (the feedback store) when DVC tracks them; empty otherwise."""
    from ray_app.dvcinfo import dvc_version

    tags: dict[str, str] = {}
    for prefix, path in (("dvc.data", cfg.path), ("dvc.feedback", cfg.feedback_uri)):
        version = dvc_version(path)
        if version is not None:
            tags.update(version.tags(prefix))
    return tags


def report_page(report: DataReport) -> str:
    """data/report.json as a page: what was read, kept and dropped (with examples), and each split's classes."""
    kept = pd.DataFrame([{"rows read": report.rows_read, "rows kept": report.rows_valid,
                          "bad fraction": round(report.bad_fraction, 4), **{f"{k} rows": v for k, v in
                          report.split_sizes.items()}, "from feedback": report.feedback_rows}])  # fmt: skip
    bad = pd.DataFrame(sorted(report.bad_rows.items()), columns=["reason", "rows"])
    classes = pd.DataFrame(report.class_counts).fillna(0).astype(int).rename_axis("label").reset_index()
    sections: dict[str, pd.DataFrame | str] = {"Rows": kept, "Rows dropped, by reason": bad}
    sections["Classes per split"] = classes
    if report.bad_examples:
        sections["Examples of dropped rows"] = pd.DataFrame(report.bad_examples)
    intro = (f"{report.path} (digest {report.digest}): every row is checked (id, visible text, length, a label in "
             "the label set, duplicates, leakage between splits); a bad row is counted here, not a crash.")  # fmt: skip
    return page("Data report", intro, sections)


def log_to_mlflow(splits: Splits, cfg: DataConfig) -> None:
    """Dataset inputs (digest, source, schema, DVC hash), row counts as metrics, the full report as a JSON artifact;
    the DVC version of the data as run tags when the data lives in a DVC repository."""
    import mlflow

    dvc = dvc_tags(cfg)
    input_tags = {"data_digest": splits.report.digest}
    if "dvc.data.md5" in dvc:
        input_tags["dvc_md5"] = dvc["dvc.data.md5"]
    # The path as configured (relative to the repository, with the run's git commit tag): resolved, it would name
    # a Ray job's temporary copy of the repository.
    source = cfg.path
    for name, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        with warnings.catch_warnings():  # MLflow 3.17 registers its local source twice, then warns it is ambiguous
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            ds = mlflow.data.from_pandas(splits.frame(name), source=source, name=f"projects-{name}", targets="label")
        mlflow.log_input(ds, context=context, tags=input_tags)
    metrics = {f"data/rows_{n}": v for n, v in splits.report.split_sizes.items()}
    metrics.update({f"data/bad_{r}": v for r, v in splits.report.bad_rows.items()})
    metrics.update({"data/rows_read": splits.report.rows_read, "data/bad_fraction": splits.report.bad_fraction})
    if cfg.feedback_uri:
        metrics["data/rows_feedback"] = splits.report.feedback_rows
        metrics.update({f"data/feedback_bad_{r}": v for r, v in splits.report.feedback_bad.items()})
    mlflow.log_metrics(metrics)
    mlflow.log_dict(splits.report.to_dict(), "data/report.json")
    mlflow.log_text(report_page(splits.report), "data/report.html")
    mlflow.set_tags({"data_digest": splits.report.digest, **dvc})
    mlflow.log_text(splits.test.to_csv(index=False), "data/test_split.csv")
