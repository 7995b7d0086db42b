"""How a row becomes the one string the model reads; light on imports, since Ray Data tasks and the MLflow model
both use it."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

TEXT_SEPARATOR = ". "


def join_text(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The model reads one string per row: the text columns joined, missing parts skipped."""
    parts = frame[list(columns)].fillna("").astype(str)
    return [TEXT_SEPARATOR.join(p.strip() for p in row if p.strip()) for row in parts.itertuples(index=False)]
