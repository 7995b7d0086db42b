"""How a row becomes the one string the model reads; light on imports, since Ray Data tasks and the MLflow model
both use it."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

TEXT_SEPARATOR = ". "


def join_text(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The model reads one string per row: the text columns joined, missing parts skipped."""
    parts = frame[list(columns)].fillna("").astype(str)
    return [join_parts(row) for row in parts.itertuples(index=False)]


def join_parts(parts: Sequence[str]) -> str:
    """One row's text columns as the model reads them (serving builds its input with this too)."""
    return TEXT_SEPARATOR.join(p.strip() for p in parts if p and p.strip())


_INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")  # controls, format marks (ZWSP, BOM), unassigned, spaces


def has_visible_text(text: str) -> bool:
    """False for text that is only controls, spaces and format marks (NUL, zero-width spaces, a BOM): the tokenizer
    sees nothing in it, so a prediction would be the model's prior, not an answer."""
    import unicodedata

    return any(unicodedata.category(ch) not in _INVISIBLE for ch in text)
