"""Reading the configuration: a YAML file, dotted `--set` overrides and typed updates from CLI flags, validated
once into an `AppConfig`; a bad value fails with every problem's dotted path and the keys allowed there."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ray_app.config import AppConfig
from ray_app.errors import AppError


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 3e-4); the value is parsed as YAML so lists and nulls work."""
    if "=" not in item:
        raise AppError(f"override {item!r} is not KEY=VALUE (for example --set train.lr=3e-4)")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise AppError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    return parts, value


def apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AppError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = AppConfig
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part)) if hasattr(parent, "model_fields") else None
                parent = field.annotation if field is not None else None
            allowed = sorted(parent.model_fields) if parent is not None and hasattr(parent, "model_fields") else []
            lines.append(f"  {key}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif isinstance(e.get("input"), dict):  # a section-level check: its message names the key; skip the dump
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, updates: dict[str, Any] | None = None
) -> AppConfig:
    """Read a YAML file (or the defaults), apply `a.b=c` overrides, then `updates` (a CLI flag's typed value, e.g.
    {"tune": {"resume": True}}), and validate the result once."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise AppError(f"config file {p} does not exist; pass one of the files in configs/ with --config")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise AppError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise AppError(f"config file {p} must hold a mapping of sections (data, model, train, ...)")
        tree = loaded
    for item in overrides or []:
        apply_override(tree, *parse_override(item))
    for section, values in (updates or {}).items():
        for key, value in values.items():
            apply_override(tree, [section, key], value)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        return AppConfig.model_validate(tree)
    except ValidationError as err:
        raise AppError(_format_validation_error(err, source)) from None


def dump_yaml(cfg: AppConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
