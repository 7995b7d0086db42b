"""The feedback store: labelled answers to served requests, kept as Parquet so later training runs learn from them.

`ray-app feedback FILE` joins a labels file (request id, optional item, label) to the prediction log, checks the rows
with the same row rules as the training data, and appends the good ones. `data.prepare` adds the store's rows to the
training split only, so val/test stay the bundled, comparable rows.

The prediction log holds the text the model read (title and description already joined), not the two fields. A
feedback row therefore keeps that whole text as its title and an empty description: joining them again gives back
exactly the string the model saw, with nothing guessed about where the title ended.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ray_app.config import AppConfig, DataConfig
from ray_app.errors import AppError
from ray_app.storage import filesystem

PREFIX = "feedback-"
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("label", pa.string()),
        ("request_id", pa.string()),
        ("item", pa.int32()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("predicted_label", pa.string()),
        ("received_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def read_labels(path: Path) -> pd.DataFrame:
    """A labels file (CSV or JSON Lines) with `request_id`, `label` and optionally `item` (default 0: the first item
    of the request, which is every single-item request)."""
    if not path.is_file():
        raise AppError(f"labels file {path} does not exist; give a CSV or JSONL file with request_id and label")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            raise AppError(f"labels file {path} must be .csv or .jsonl (JSON Lines), not {suffix or 'no suffix'}")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise AppError(f"labels file {path} cannot be read: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    missing = [c for c in ("request_id", "label") if c not in frame.columns]
    if missing:
        raise AppError(
            f"labels file {path} lacks the join key or label column(s) {missing}; it has {list(frame.columns)}. "
            "It needs request_id and label (and item for multi-item requests)"
        )
    if frame.empty:
        raise AppError(f"labels file {path} has no rows")
    raw = frame["item"] if "item" in frame.columns else pd.Series(0, index=frame.index)
    blank = raw.isna() | (raw.astype(str).str.strip() == "")  # no item: the request's first (and usually only)
    item = pd.to_numeric(raw.where(~blank, 0), errors="coerce")
    if item.isna().any() or (item < 0).any() or (item % 1 != 0).any():
        raise AppError(
            f"labels file {path}: column item must hold whole numbers >= 0 (the item's place in its request)"
        )
    return pd.DataFrame(
        {"request_id": frame["request_id"].astype(str).str.strip(), "item": item.astype(int), "label": frame["label"]}
    )


def join_labels(labels: pd.DataFrame, log: pd.DataFrame) -> pd.DataFrame:
    """Each label beside the logged answer to its (request id, item); `matched` is False where the log has none.
    A request logged on several routes (primary and shadow) keeps its primary row. A request id the caller reused
    for several requests names no single answer: those labels are `ambiguous` (and not matched), never joined to
    whichever request came first."""
    from ray_app.prediction_log import with_served_key

    served = with_served_key(log[log["status"] == 200])
    served["_key"] = served.pop("served_id")
    served["_shadow"] = served["route"] == "shadow"
    served = served.sort_values("_shadow", kind="stable").drop_duplicates(["_key", "item"], keep="first")
    served["ambiguous"] = served.groupby(["request_id", "item"])["_key"].transform("nunique") > 1
    served = served.drop_duplicates(["request_id", "item"], keep="first").drop(columns=["_shadow", "_key"])
    served = served.rename(columns={"label": "predicted_label"})
    served["item"] = served["item"].astype(int)
    joined = labels.merge(served, on=["request_id", "item"], how="left", indicator=True)
    joined["ambiguous"] = joined["ambiguous"].astype("boolean").fillna(False).astype(bool)
    joined["matched"] = (joined.pop("_merge") == "both") & ~joined["ambiguous"]
    return joined


def store_rows(joined: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Labelled rows checked by the training data's own row rules; returns (good rows in the store's schema, bad
    rows counted by reason)."""
    from ray_app.rows import validate_batch

    reasons = pd.Series("", index=joined.index, dtype=object)
    reasons[joined["ambiguous"]] = "ambiguous_request_id"  # a reused X-Request-Id: which answer is unknown
    reasons[(reasons == "") & ~joined["matched"]] = "unknown_request"
    reasons[(reasons == "") & joined["text"].isna()] = "text_not_logged"  # the log ran with store_text: false
    ids = "fb-" + joined["request_id"].astype(str) + "-" + joined["item"].astype(str)
    raw = as_training_frame(ids, joined["text"].fillna(""), joined["label"], cfg)
    checked = validate_batch(raw, cfg)
    reasons[reasons == ""] = checked.loc[reasons == "", "reason"]
    good = joined[reasons == ""]
    rows = pd.DataFrame(
        {
            "id": ids[good.index],
            "text": good["text"],
            "label": checked.loc[good.index, "label"],
            "request_id": good["request_id"],
            "item": good["item"].astype("int32"),
            "model_name": good["model_name"],
            "model_version": good["model_version"],
            "predicted_label": good["predicted_label"],
            "received_at": pd.Timestamp.now(tz="UTC").floor("ms"),
        }
    ).reset_index(drop=True)
    return rows, dict(Counter(reasons[reasons != ""]))


def as_training_frame(ids: pd.Series, texts: pd.Series, labels: pd.Series, cfg: DataConfig) -> pd.DataFrame:
    """Rows in the bundled CSV's shape: the whole logged text as the first text column, the others empty."""
    frame = pd.DataFrame({cfg.id_column: ids.to_numpy(), cfg.text_columns[0]: texts.to_numpy()})
    for column in cfg.text_columns[1:]:
        frame[column] = ""
    frame[cfg.label_column] = labels.to_numpy()
    return frame


def append(uri: str, rows: pd.DataFrame) -> str | None:
    """One new Parquet file per call, written to a temp name and renamed, so a training run never reads half a file."""
    if rows.empty:
        return None
    fs, root = filesystem(uri)
    fs.create_dir(root, recursive=True)
    name = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    tmp, final = f"{root}/.{name}.tmp", f"{root}/{name}.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(rows, schema=SCHEMA, preserve_index=False), tmp, filesystem=fs)
    fs.move(tmp, final)
    return final


def read_store(uri: str) -> pd.DataFrame:
    """Every stored row, the latest label per id (a later label for the same item corrects the earlier one); a store
    that does not exist yet is empty."""
    fs, root = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        files = [i.path for i in infos if i.base_name.startswith(PREFIX) and i.base_name.endswith(".parquet")]
        if not files:
            return SCHEMA.empty_table().to_pandas()
        table = pads.dataset(files, filesystem=fs, format="parquet", schema=SCHEMA).to_table()
    except (OSError, pa.ArrowInvalid) as exc:
        raise AppError(f"feedback store {uri} cannot be read: {str(exc).splitlines()[0]}") from None
    frame = table.to_pandas().sort_values("received_at", kind="stable")
    return frame.drop_duplicates("id", keep="last").reset_index(drop=True)


def training_rows(cfg: DataConfig, bundled: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Store rows for the training split, re-checked against this config: a text already among the validation or
    test rows would leak into training (dropped), one already in training adds nothing (dropped)."""
    from ray_app.rows import normalize, validate_batch

    store = read_store(cfg.feedback_uri)
    columns = [cfg.id_column, *cfg.text_columns, "label", "text"]
    if store.empty:
        return pd.DataFrame(columns=columns), {}
    checked = validate_batch(as_training_frame(store["id"], store["text"], store["label"], cfg), cfg)
    key = checked["text"].map(normalize)
    held_out = set(pd.concat([bundled["val"]["text"], bundled["test"]["text"]]).map(normalize))
    seen = set(bundled["train"]["text"].map(normalize))
    reasons = checked["reason"].copy()
    reasons[(reasons == "") & key.isin(held_out)] = "feedback_leakage"
    reasons[(reasons == "") & (key.isin(seen) | key.duplicated(keep="last"))] = "feedback_duplicate"
    good = checked[reasons == ""][columns].reset_index(drop=True)
    return good, dict(Counter(reasons[reasons != ""]))


def add_feedback(cfg: AppConfig, path: Path) -> dict:
    """`ray-app feedback FILE`: join, check and append; returns what was stored and what was not, by reason."""
    from ray.data.expressions import col

    from ray_app.prediction_log import read_log

    if not cfg.data.feedback_uri:
        raise AppError("data.feedback_uri is not set: name the feedback store directory (configs/default.yaml uses "
                       "~/ray_app/feedback), with --set data.feedback_uri=PATH or in the config")  # fmt: skip
    labels = read_labels(path)
    rows, bad = store_rows(join_labels(labels, read_log(cfg.monitor.log_uri, col("status") == 200)), cfg.data)
    written = append(cfg.data.feedback_uri, rows)
    return {
        "labels_file": str(path),
        "log_uri": cfg.monitor.log_uri,
        "store": cfg.data.feedback_uri,
        "file": written,
        "rows": len(labels),
        "stored": len(rows),
        "bad": bad,
    }
