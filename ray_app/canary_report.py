"""`ray-app canary-report`: is the challenger as good as the champion on live traffic? Read from the prediction
log that the Serve app writes (error rate, p50/p99 per version, agreement when the challenger ran in shadow), and
from labels that arrived for the served requests (accuracy per version: the quality signal).

The verdict uses the promotion bar of `canary` in the config; serving's guard (looser) only pulls a failing canary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ray_app.config import AppConfig, CanaryConfig
from ray_app.errors import AppError
from ray_app.prediction_log import read_recent, with_served_key

PROMOTE, HOLD, ROLLBACK = "promote", "hold", "rollback"


def version_stats(frame: pd.DataFrame, version: str) -> dict[str, Any]:
    """Per request (a request's items share status and latency), over every route the version served."""
    rows = with_served_key(frame[frame["model_version"] == version])
    requests = rows.drop_duplicates(["served_id", "route"])
    n = len(requests)
    return {
        "version": version,
        "requests": n,
        "items": len(rows),
        "by_route": requests["route"].value_counts().to_dict(),
        "error_rate": float((requests["status"] >= 500).mean()) if n else None,
        "p50_ms": float(requests["latency_ms"].quantile(0.5)) if n else None,
        "p99_ms": float(requests["latency_ms"].quantile(0.99)) if n else None,
    }


def shadow_agreement(frame: pd.DataFrame, champion: str, challenger: str) -> tuple[float | None, int]:
    """Share of items where the challenger's shadow label equals the champion's answer to the same request."""
    ok = with_served_key(frame[frame["status"] == 200])
    primary = ok[(ok["model_version"] == champion) & (ok["route"] == "primary")]
    shadow = ok[(ok["model_version"] == challenger) & (ok["route"] == "shadow")]
    pairs = primary.merge(shadow, on=["served_id", "item"], suffixes=("_champion", "_challenger"))
    if pairs.empty:
        return None, 0
    return float((pairs["label_champion"] == pairs["label_challenger"]).mean()), len(pairs)


def labelled_accuracy(frame: pd.DataFrame, labels: pd.DataFrame | None, version: str) -> tuple[float | None, int]:
    """Accuracy of `version`'s own answers (primary, canary or named; not shadow) on the labels that name them."""
    from ray_app.feedback import join_labels

    if labels is None or labels.empty or frame.empty:
        return None, 0
    joined = join_labels(labels, frame)
    mine = joined[joined["matched"] & (joined["model_version"] == version) & (joined["route"] != "shadow")]
    if mine.empty:
        return None, 0
    return float((mine["predicted_label"] == mine["label"]).mean()), len(mine)


def quality_verdict(champion: dict[str, Any], challenger: dict[str, Any], cfg: CanaryConfig) -> tuple[str, str] | None:
    """The labels' say: a rollback when the challenger answers worse, a hold while too few of its answers are
    labelled (only when labels are required or some have arrived); None when they have nothing to say."""
    acc, n = challenger["accuracy"], challenger["labelled"]
    if n < cfg.min_labelled:
        if cfg.require_labels or n:
            return HOLD, f"{n} labelled challenger answers; {cfg.min_labelled} needed to judge its quality"
        return None
    if cfg.min_accuracy is not None and acc < cfg.min_accuracy:
        return ROLLBACK, f"challenger accuracy {acc:.3f} < min_accuracy {cfg.min_accuracy} on {n} labelled answers"
    base, base_n = champion["accuracy"], champion["labelled"]
    if base is not None and base_n >= cfg.min_labelled and acc < base - cfg.max_accuracy_drop:
        return ROLLBACK, (
            f"challenger accuracy {acc:.3f} < champion {base:.3f} - {cfg.max_accuracy_drop} "
            f"({n} and {base_n} labelled answers)"
        )
    return None


def verdict(champion: dict[str, Any], challenger: dict[str, Any], agreement: float | None, cfg: CanaryConfig):
    """Roll back on a breach (errors, p99, accuracy on labels), hold while evidence is thin or answers disagree,
    else promote."""
    n = challenger["requests"]
    if n and challenger["error_rate"] > cfg.max_error_rate:
        return ROLLBACK, f"challenger error rate {challenger['error_rate']:.3f} > {cfg.max_error_rate}"
    if cfg.max_p99_ms is not None and n >= cfg.min_requests and challenger["p99_ms"] > cfg.max_p99_ms:
        return ROLLBACK, f"challenger p99 {challenger['p99_ms']:.0f} ms > {cfg.max_p99_ms} ms"
    quality = quality_verdict(champion, challenger, cfg)
    if quality is not None and quality[0] == ROLLBACK:
        return quality
    if n < cfg.min_requests:
        return HOLD, f"challenger served {n} requests; {cfg.min_requests} needed to judge"
    if quality is not None:
        return quality
    if agreement is not None and agreement < cfg.min_agreement:
        return HOLD, f"shadow agreement {agreement:.3f} < {cfg.min_agreement}"
    if (
        champion["requests"]
        and champion["error_rate"] is not None
        and challenger["error_rate"] > champion["error_rate"]
    ):
        return HOLD, f"challenger errors {challenger['error_rate']:.3f} > champion {champion['error_rate']:.3f}"
    accuracy = challenger["accuracy"]
    evidence = (f", agreement {agreement:.3f}" if agreement is not None else "") + (
        f", accuracy {accuracy:.3f} on {challenger['labelled']} labelled" if accuracy is not None else ""
    )
    return PROMOTE, f"{n} requests within limits{evidence}"


def window_labels(cfg: AppConfig, labels_file: Path | None) -> pd.DataFrame | None:
    """Labels for served requests: the feedback store's (`data.feedback_uri`) and a labels file's, if given."""
    from ray_app.feedback import read_labels, read_store

    parts = []
    if cfg.data.feedback_uri:
        parts.append(read_store(cfg.data.feedback_uri)[["request_id", "item", "label"]])
    if labels_file is not None:
        parts.append(read_labels(labels_file))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return None
    return pd.concat(parts, ignore_index=True).drop_duplicates(["request_id", "item"], keep="last")


def compare_aliases(cfg: AppConfig, labels_file: Path | None = None) -> dict[str, Any]:
    """The champion and challenger of `registry.model_name` on the log's recent traffic (`ray-app canary-report`)."""
    from ray_app.registry import CHALLENGER, CHAMPION, aliases

    current = aliases(cfg.registry)
    missing = [a for a in (CHAMPION, CHALLENGER) if a not in current]
    if missing:
        raise AppError(f"model {cfg.registry.model_name} has no {' or '.join(missing)} alias to compare")
    frame = read_recent(cfg.canary.log_uri, cfg.canary.window_minutes)
    return canary_report(frame, current[CHAMPION], current[CHALLENGER], cfg.canary, window_labels(cfg, labels_file))


def canary_report(
    frame: pd.DataFrame, champion: str, challenger: str, cfg: CanaryConfig, labels: pd.DataFrame | None = None
) -> dict[str, Any]:
    stats = {}
    for role, version in (("champion", champion), ("challenger", challenger)):
        accuracy, labelled = labelled_accuracy(frame, labels, version)
        stats[role] = {**version_stats(frame, version), "accuracy": accuracy, "labelled": labelled}
    agreement, pairs = shadow_agreement(frame, champion, challenger)
    decision, reason = verdict(stats["champion"], stats["challenger"], agreement, cfg)
    return {**stats, "shadow_agreement": agreement, "shadow_pairs": pairs, "verdict": decision, "reason": reason}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'':12}{'version':>8}{'requests':>10}{'errors':>9}{'p50 ms':>9}{'p99 ms':>9}"]
    for role in ("champion", "challenger"):
        s = report[role]
        err = "-" if s["error_rate"] is None else f"{s['error_rate']:.3f}"
        p50 = "-" if s["p50_ms"] is None else f"{s['p50_ms']:.1f}"
        p99 = "-" if s["p99_ms"] is None else f"{s['p99_ms']:.1f}"
        lines.append(f"{role:12}{s['version']:>8}{s['requests']:>10}{err:>9}{p50:>9}{p99:>9}")
    for role in ("champion", "challenger"):
        if report[role].get("accuracy") is not None:
            acc, n = report[role]["accuracy"], report[role]["labelled"]
            lines.append(f"{role} accuracy {acc:.3f} on {n} labelled answers")
    if report["shadow_agreement"] is not None:
        lines.append(f"shadow agreement {report['shadow_agreement']:.3f} over {report['shadow_pairs']} items")
    lines.append(f"verdict: {report['verdict'].upper()} ({report['reason']})")
    return "\n".join(lines)
