"""What every configuration section shares, and the defaults training and serving must agree on.

A leaf: the training schema (`config.py`), the search schema (`tune_config.py`) and serving's settings
(`serve/settings.py`) all build on it, so a shared default is written once here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, model_validator

DEFAULT_LABELS = ("natural-language-processing", "computer-vision", "mlops", "other")
# Longest title or description: the data stage drops longer rows, batch inference reports them, serving refuses them.
MAX_TEXT_CHARS = 2000

# How a registered version runs (ray_app/backends.py): serving's `backend` setting names one of these; cuda-fp16 needs
# a GPU replica, the others run on CPU (fp32 on the replica's GPU when it has one).
Backend = Literal["fp32", "torch-int8", "onnx-fp32", "onnx-int8", "cuda-fp16"]


class Section(BaseModel):
    """Unknown keys fail at load time with their dotted path, instead of being ignored half-way through a run; a key
    that was removed fails naming what replaces it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    removed: ClassVar[dict[str, str]] = {}  # old key -> what to write instead

    @model_validator(mode="before")
    @classmethod
    def _no_removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in sorted(cls.removed.keys() & data.keys()):
                raise ValueError(f"{key} is no longer a setting: {cls.removed[key]}")
        return data
