"""Send a registered version's frozen test rows through the running Serve app, the way a client would.

A fresh install then has a real prediction log for `ray-app monitor` to check, and a labels file (request id → true
label) for `ray-app monitor --labels` and `ray-app feedback`: the request ids are ours, sent as `x-request-id`.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import requests
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from ray_app.config import AppConfig
from ray_app.errors import AppError
from ray_app.registry import CHAMPION, frozen_test_rows

log = logging.getLogger("ray_app")


@dataclass
class ReplayResult:
    url: str
    model: str
    version: str
    sent: int
    statuses: dict[str, int]
    labels_file: str
    accuracy: float | None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def champion_rows(cfg: AppConfig) -> tuple[str, pd.DataFrame]:
    """The champion's own frozen test split: rows it was never trained on, drawn like its monitoring reference."""
    client = MlflowClient()
    name = cfg.registry.model_name
    try:
        version = client.get_model_version_by_alias(name, CHAMPION).version
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing model/alias
        raise AppError(f"model {name} has no {CHAMPION} alias to replay against ({exc})") from None
    return str(version), frozen_test_rows(client, name, str(version))


def _post(session: requests.Session, url: str, row: dict[str, Any], headers: dict[str, str]) -> tuple[int, str | None]:
    """One request; the predicted label, or None when the app answered with an error."""
    try:
        resp = session.post(f"{url}/predict", json=row, headers=headers, timeout=60)
    except requests.RequestException as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    if resp.status_code != 200:
        return resp.status_code, None
    return 200, resp.json()["predictions"][0]["label"]


# How replayed traffic may differ from what the version was validated on. `titles-only`: clients that send the title
# and drop the description, a real shift in text length, vocabulary and embeddings; the drift demo uses it.
SHIFTS = ("none", "titles-only")


def apply_shift(rows: pd.DataFrame, text_columns: list[str], shift: str) -> pd.DataFrame:
    """The rows as shifted clients would send them (every text column after the first blank for `titles-only`)."""
    if shift == "none":
        return rows
    return rows.assign(**dict.fromkeys(text_columns[1:], ""))


def replay(
    cfg: AppConfig, url: str, labels_out: Path, api_key: str | None, concurrency: int = 4, shift: str = "none"
) -> ReplayResult:
    """Replay every test row once, `concurrency` at a time, and write `request_id,item,label` for the rows sent."""
    if shift not in SHIFTS:
        raise AppError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}")
    version, rows = champion_rows(cfg)
    columns = cfg.data.text_columns
    rows = apply_shift(rows, columns, shift)
    run = uuid.uuid4().hex[:8]  # a second replay of the same version must not reuse the first one's request ids
    ids = [f"replay-{version}-{run}-{i}" for i in range(len(rows))]
    bodies = rows[columns].astype(str).to_dict("records")
    base = {"x-api-key": api_key} if api_key else {}
    with requests.Session() as session, ThreadPoolExecutor(concurrency) as pool:
        futures = [
            pool.submit(_post, session, url.rstrip("/"), body, {**base, "x-request-id": rid})
            for rid, body in zip(ids, bodies, strict=True)
        ]
        answers = [f.result() for f in tqdm(futures, desc=f"replay ({shift})", unit="req", disable=None)]
    statuses = Counter(str(status) for status, _ in answers)
    truth = rows["label"].astype(str).tolist()
    labels = pd.DataFrame({"request_id": ids, "item": 0, "label": truth})
    labels_out.parent.mkdir(parents=True, exist_ok=True)
    labels.to_csv(labels_out, index=False)
    answered = [(pred, true) for (status, pred), true in zip(answers, truth, strict=True) if status == 200]
    accuracy = sum(p == t for p, t in answered) / len(answered) if answered else None
    errors = sorted({str(pred) for status, pred in answers if status == 0})[:5]
    if not answered:
        raise AppError(f"no request to {url}/predict succeeded (statuses {dict(statuses)}); is the app deployed?")
    return ReplayResult(
        url, cfg.registry.model_name, version, len(rows), dict(statuses), str(labels_out), accuracy, errors
    )
