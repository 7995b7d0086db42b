"""Ray Data preprocessing (prepare + tokenize) vs plain pandas + the fast tokenizer doing the same work on one file.

Why: on a small CSV and a 2-core machine Ray Data's parallelism has little to win and its task and actor start-up
to pay; this says how much, and `--scale K` (the CSV replicated K times) shows whether the gap closes on more rows.
Both sides tokenize every valid row of `--splits` (default all three; build_trainer itself does train,val only).

    .venv/bin/python bench/data.py [--config configs/default.yaml] [--set data.max_rows=100] [--repeats 3] [--scale 4]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config, connect, median, parse, parser, report

from ray_app.config import AppConfig, DataConfig
from ray_app.data import (
    assign_splits,
    digest_of,
    mark_duplicates,
    mark_leakage,
    prepare,
    split_rank,
    tokenize,
    validate_batch,
)
from ray_app.model import load_tokenizer, resolve_model_path


def scaled_csv(dc: DataConfig, k: int) -> str:
    """The CSV K times; copy i gets ids `<id>-i` and titles `<title> (i)`, so no copy is a duplicate of another
    (or leaks across splits) while each copy keeps the original's bad rows."""
    raw = pd.read_csv(dc.path, dtype=str, keep_default_na=False, on_bad_lines="skip")
    copies = [raw]
    for i in range(1, k):
        copy = raw.copy()
        for column, suffix in ((dc.id_column, f"-{i}"), (dc.text_columns[0], f" ({i})")):
            filled = copy[column].str.strip() != ""
            copy.loc[filled, column] = copy.loc[filled, column] + suffix
        copies.append(copy)
    fd, path = tempfile.mkstemp(prefix="bench-data-", suffix=".csv")
    os.close(fd)
    pd.concat(copies, ignore_index=True).to_csv(path, index=False)
    return path


def ray_pass(cfg: AppConfig, names: tuple[str, ...]) -> dict[str, Any]:
    """The project's own path: prepare() (Ray Data read + row checks, driver-side split) then tokenize()."""
    started = time.perf_counter()
    splits = prepare(cfg.data)
    datasets = tokenize(splits, resolve_model_path(cfg.model.name_or_path), cfg.data.max_length, names=names)
    seconds = time.perf_counter() - started
    return {
        "s": seconds,
        "rows_read": splits.report.rows_read,
        "rows_tokenized": sum(ds.count() for ds in datasets.values()),
        "split_sizes": splits.report.split_sizes,
        "digest": splits.report.digest,
    }


def pandas_pass(cfg: AppConfig, names: tuple[str, ...]) -> dict[str, Any]:
    """prepare() without Ray: read_csv, validate_batch on the whole frame, the same dedupe/split/leakage functions,
    then one fast-tokenizer call per split, padded to max_length with the dtypes Tokenize produces."""
    dc = cfg.data
    started = time.perf_counter()
    required = [dc.id_column, *dc.text_columns, dc.label_column]
    raw = pd.read_csv(dc.path, dtype={c: str for c in required}, keep_default_na=False, on_bad_lines="skip")
    frame = mark_duplicates(validate_batch(raw, dc).reset_index(drop=True), dc)
    good = frame[frame["reason"] == ""]
    if dc.max_rows is not None:
        ranks = good[dc.id_column].map(lambda i: split_rank(str(i), dc.split.salt))
        good = good.loc[ranks.sort_values(kind="stable").index[: dc.max_rows]]
    split = assign_splits(good, dc)
    valid = good[mark_leakage(good, split, dc.text_columns[0]) == ""]
    digest = digest_of(valid, dc.id_column)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path))
    label_ids = {label: i for i, label in enumerate(dc.labels)}
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        part = valid[split[valid.index] == name]
        enc = tokenizer(
            list(part["text"]), padding="max_length", truncation=True, max_length=dc.max_length, return_tensors="np"
        )
        out[name] = {
            "input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": enc["attention_mask"].astype(np.int8),
            "labels": part["label"].map(label_ids).to_numpy(dtype=np.int64),
        }
    seconds = time.perf_counter() - started
    return {
        "s": seconds,
        "rows_read": len(raw),
        "rows_tokenized": sum(len(o["labels"]) for o in out.values()),
        "split_sizes": {n: int((split[valid.index] == n).sum()) for n in ("train", "val", "test")},
        "digest": digest,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=1, help="replicate the CSV this many times (new ids and titles)")
    p.add_argument("--splits", default="train,val,test", help="splits to tokenize, comma-separated")
    args = parse(p)
    names = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    cfg = config(args)
    scaled = scaled_csv(cfg.data, args.scale) if args.scale > 1 else None
    if scaled:
        cfg.data.path = scaled
    try:
        init_s = connect(args.address)
        first = {"ray": ray_pass(cfg, names), "pandas": pandas_pass(cfg, names)}  # warm-up; Ray's pays start-up
        runs: list[dict[str, dict[str, Any]]] = []
        for i in range(args.repeats):  # alternate who goes first so drift in machine load hits both alike
            order = ("pandas", "ray") if i % 2 == 0 else ("ray", "pandas")
            runs.append({n: pandas_pass(cfg, names) if n == "pandas" else ray_pass(cfg, names) for n in order})
            print(f"repeat {i + 1}: pandas {runs[-1]['pandas']['s']:.2f}s, ray {runs[-1]['ray']['s']:.2f}s", flush=True)
    finally:
        if scaled:
            Path(scaled).unlink(missing_ok=True)
    for side in ("ray", "pandas"):
        if runs and (runs[0][side]["split_sizes"], runs[0][side]["digest"]) != (
            first["ray"]["split_sizes"],
            first["ray"]["digest"],
        ):
            print(
                f"WARNING: {side} kept other rows than Ray's first pass: {runs[0][side]['split_sizes']} "
                f"vs {first['ray']['split_sizes']}; the comparison is not like for like"
            )

    def med(side: str, key: str) -> float:
        return median([float(run[side][key]) for run in runs])

    rows = [
        {
            "metric": "rows/s (input rows read / s)",
            "pandas": median([r["pandas"]["rows_read"] / r["pandas"]["s"] for r in runs]),
            "ray": median([r["ray"]["rows_read"] / r["ray"]["s"] for r in runs]),
        },
        {
            "metric": "s per pass (read, validate, split, tokenize)",
            "pandas": med("pandas", "s"),
            "ray": med("ray", "s"),
        },
        {
            "metric": "first call s (Ray: includes Ray Data start-up)",
            "pandas": first["pandas"]["s"],
            "ray": first["ray"]["s"],
        },
        {"metric": "input rows read", "pandas": med("pandas", "rows_read"), "ray": med("ray", "rows_read")},
        {
            "metric": f"rows tokenized ({','.join(names)})",
            "pandas": med("pandas", "rows_tokenized"),
            "ray": med("ray", "rows_tokenized"),
        },
    ]
    extra = {"scale": args.scale, "splits": names, "ray_init_s": init_s, "first": first, "runs": runs}
    report("data", "pandas", "ray", rows, args, extra)


if __name__ == "__main__":
    main()
