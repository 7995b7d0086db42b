"""The row rules: what makes a labelled row good, one home for the data stage, the feedback store and monitoring.

A row is good when it has an id, visible text within `max_text_chars`, and a label that maps into the label set
(through the configured aliases); otherwise its `reason` names the first rule it breaks.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from ray_app.config import DataConfig
from ray_app.text import has_visible_text, join_text

_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACES.sub(" ", str(text)).strip().lower()


def map_label(raw: Any, cfg: DataConfig) -> str | None:
    """Configured aliases first, then the label set; unknown tags go to `unknown_label` (or None: a bad row)."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)) or not str(raw).strip():
        return None
    tag = str(raw).strip().lower()
    tag = cfg.label_aliases.get(tag, tag)
    return tag if tag in cfg.labels else cfg.unknown_label


def validate_batch(batch: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Adds `label`, `text` and `reason` (empty when the row is good) to a batch of raw rows."""
    reasons = pd.Series("", index=batch.index, dtype=object)
    ids = batch[cfg.id_column]
    reasons[ids.isna() | (ids.astype(str).str.strip() == "")] = "missing_id"
    texts = join_text(batch, cfg.text_columns)
    text = pd.Series(texts, index=batch.index, dtype=object)
    # Per field, as serving and batch inference check a request: joined, two invisible fields read as visible
    # ("\u200b. \u200b": the separator is text).
    visible = batch[cfg.text_columns].apply(lambda col: col.map(lambda v: isinstance(v, str) and has_visible_text(v)))
    reasons[(reasons == "") & ~visible.any(axis=1)] = "empty_text"
    reasons[(reasons == "") & (text.str.len() > cfg.max_text_chars)] = "text_too_long"
    raw_labels = batch[cfg.label_column]
    labels = raw_labels.map(lambda raw: map_label(raw, cfg))
    missing = raw_labels.isna() | (raw_labels.astype(str).str.strip() == "")
    reasons[(reasons == "") & missing] = "missing_label"
    reasons[(reasons == "") & labels.isna()] = "unknown_label"
    out = batch.copy()
    out[cfg.id_column] = ids.astype(str).str.strip()
    out["label"] = labels.astype(object)
    out["text"] = text
    out["reason"] = reasons
    return out
