"""How a row becomes the one string the model reads; light on imports, since Ray Data tasks and the MLflow model
both use it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

TEXT_SEPARATOR = ". "


def join_text(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The model reads one string per row: the text columns joined, missing parts skipped."""
    parts = frame[list(columns)].fillna("").astype(str)
    return [join_parts(row) for row in parts.itertuples(index=False)]


def join_parts(parts: Sequence[str]) -> str:
    """One row's text columns as the model reads them (serving builds its input with this too)."""
    return TEXT_SEPARATOR.join(p.strip() for p in parts if p and p.strip())


# Controls, spaces, line and paragraph separators, format marks (soft hyphen, zero-width spaces and joiners, bidi
# marks, the BOM, tag characters) and private use: Unicode 14's categories Cc, Cf, Co, Zs, Zl and Zp, spelled out as
# ranges so the rule is the same on every Python and can be published as a JSON Schema pattern. Surrogates (Cs) are
# left out: no regex engine takes them in a class, and serving refuses a lone one first (422 invalid_text).
# Unassigned code points count as text (which of them are assigned changes with each Unicode version).
_INVISIBLE_RANGES = (
    (0x0000, 0x0020), (0x007F, 0x00A0), (0x00AD, 0x00AD), (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD),
    (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2), (0x1680, 0x1680), (0x180E, 0x180E), (0x2000, 0x200F),
    (0x2028, 0x202F), (0x205F, 0x2064), (0x2066, 0x206F), (0x3000, 0x3000), (0xE000, 0xF8FF), (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x13438), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xE0020, 0xE007F), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD),
)  # fmt: skip


def _char(cp: int) -> str:
    """BMP characters as \\uXXXX escapes (read alike by Python's re and ECMA-262); others as themselves."""
    return f"\\u{cp:04x}" if cp <= 0xFFFF else chr(cp)


# One visible character: the pattern /predict publishes for title and description, and the rule the server applies.
VISIBLE_CHAR = "[^" + "".join(_char(a) if a == b else f"{_char(a)}-{_char(b)}" for a, b in _INVISIBLE_RANGES) + "]"
_VISIBLE = re.compile(VISIBLE_CHAR)


def has_visible_text(text: str) -> bool:
    """False for text that is only controls, spaces and format marks (NUL, zero-width spaces, a BOM): the tokenizer
    sees nothing in it, so a prediction would be the model's prior, not an answer."""
    return _VISIBLE.search(text) is not None


def text_problem(fields: Mapping[str, Any], max_chars: int) -> tuple[str, str | None] | None:
    """The first rule a request's (or a batch row's) text fields break, as (reason, field): a field longer than
    `max_chars` (`text_too_long`, named), or no field with visible text (`empty_text`). Serving and batch inference
    both judge each field, and each phrases the answer for its own reader."""
    for name, value in fields.items():
        if isinstance(value, str) and len(value) > max_chars:
            return "text_too_long", name
    if not any(isinstance(value, str) and has_visible_text(value) for value in fields.values()):
        return "empty_text", None
    return None
