"""The closed loop's time from a breach to its decision, and the share of each step (check, retrain, shadow, each
canary step, gate), read from the cycle's own MLflow step runs; the baseline is the retrain job alone (its run time
as Ray's job API reports it), measured in the same cycle.

    .venv/bin/python bench/loop.py                                   # configs/smoke.yaml: the tiny model
    .venv/bin/python bench/loop.py --config configs/default.yaml     # MiniLM, the shipped loop and canary settings

Starts its own Ray head and MLflow server on free ports and deploys serve_config.yaml on them; the champion is the
config's model trained on the data set with its labels permuted (answers fast and wrongly, by construction), so the
outcome on the smoke config is a promotion; on the default config it is reported, not required. Traffic: callers of
the app whose true labels reach the feedback store a moment later (`Traffic`, also used by tests/test_loop.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ROOT, median, report

os.environ.setdefault("RAY_AUTH_MODE", "token")
PERMUTE = {
    "natural-language-processing": "mlops",
    "mlops": "natural-language-processing",
    "computer-vision": "other",
    "other": "computer-vision",
}


def permuted_copy(data: pd.DataFrame, path: Path) -> Path:
    """The data set with every label replaced by another: a model trained on it is wrong on purpose."""
    data.assign(tag=data["tag"].map(PERMUTE)).to_csv(path, index=False)
    return path


class Traffic:
    """`callers` threads asking the served app (a new X-User-Id each request, so the canary gets its share), whose
    true labels arrive in the feedback store a moment later, the way `ray-app feedback` stores them."""

    def __init__(self, base: str, cfg: Any, rows: pd.DataFrame, api_key: str | None = None, callers: int = 1) -> None:
        self.base, self.cfg, self.rows = base, cfg, rows
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.codes: Counter[int] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(callers)]

    def _run(self) -> None:
        sent: list[dict] = []
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=60) as http:
            while not self.stop.is_set():
                row = self.rows.sample(1).iloc[0]
                rid = uuid.uuid4().hex
                body = {"title": row["title"], "description": row["description"]}
                status = http.post("/predict", json=body, headers={"X-Request-Id": rid, "X-User-Id": rid}).status_code
                with self.lock:
                    self.codes[status] += 1
                sent.append({"request_id": rid, "item": 0, "label": row["tag"]})
                if len(sent) >= 20:
                    self._label(sent)
                    sent = []

    def _label(self, sent: list[dict]) -> None:
        from ray_app.feedback import append, join_labels, store_rows
        from ray_app.prediction_log import read_recent

        time.sleep(0.6)  # the prediction log flushes every 0.5 s here
        labels = pd.DataFrame(sent)
        rows, _ = store_rows(join_labels(labels, read_recent(self.cfg.canary.log_uri, 60)), self.cfg.data)
        append(self.cfg.data.feedback_uri, rows)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def step_runs(experiment: str, cycle_run_id: str) -> list[dict[str, Any]]:
    """The cycle's step runs in order: name, seconds, verdict; then the cycle's own run as `cycle`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{cycle_run_id}'", order_by=["attributes.start_time"])
    return [_timed(r.info, r.info.run_name, r.data.tags.get("verdict")) for r in runs]


def cycle_seconds(cycle_run_id: str) -> float:
    """From the breach (the cycle's run is opened when the check finds it) to the decision (the run's end)."""
    from mlflow.tracking import MlflowClient

    return _timed(MlflowClient().get_run(cycle_run_id).info, "cycle", None)["s"]


def _timed(info: Any, name: str, verdict: str | None) -> dict[str, Any]:
    return {"step": name, "s": ((info.end_time or info.start_time) - info.start_time) / 1000, "verdict": verdict}


def send_shifted(base: str, data: pd.DataFrame, text_columns: list[str], n: int, api_key: str | None = None) -> None:
    """The drift demo's traffic (`ray-app replay --shift titles-only`): titles without descriptions."""
    from ray_app.replay import apply_shift

    shifted = apply_shift(data.sample(n, random_state=1), text_columns, "titles-only")
    headers = {"X-API-Key": api_key} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        for _, row in shifted.iterrows():
            http.post("/predict", json={"title": row["title"], "description": row["description"]}).raise_for_status()
    time.sleep(1)  # flushed


def loop_settings(work: Path, dashboard: str, tag: str, smoke: bool) -> list[str]:
    """Where the loop reads and writes in this run; on the smoke config also the small bars its drills use."""
    sets = [
        f"data.feedback_uri={work / 'feedback'}", f"monitor.log_uri={work / 'predlog'}",
        f"canary.log_uri={work / 'predlog'}", f"monitor.experiment=monitoring-{tag}", f"loop.experiment=loop-{tag}",
        f"loop.dashboard_address={dashboard}", "loop.check_every_s=3600", "loop.tick_s=1",
        f"monitor.retrain.working_dir={ROOT}", "data.max_rows=null", "monitor.min_rows=20",
    ]  # fmt: skip
    if smoke:
        sets += ["canary.min_requests=20", "canary.min_labelled=10", "canary.max_p99_ms=5000", "loop.ramp=[0.25, 0.5]"]
    return sets


def one_cycle(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve
    from ray.job_submission import JobSubmissionClient

    from ray_app.config_loader import load_config
    from ray_app.local import start_mlflow, start_ray_head, stop_mlflow, stop_ray_head
    from ray_app.loop_actor import start, stop, with_explicit_paths
    from ray_app.model import make_tiny_model
    from ray_app.pipeline import run_pipeline
    from ray_app.ports import free_port, free_serve_ports
    from ray_app.runtime import connect_ray, setup_mlflow
    from tests.serving import deploy_config, serve_deploy, wait_until

    work = Path(tempfile.mkdtemp(prefix="loopb-"))
    tag, smoke = uuid.uuid4().hex[:6], "smoke" in Path(args.config).name
    mlflow_port, serve_port = free_port(), free_port()
    mlflow_pid = start_mlflow(work / "mlflow", mlflow_port)
    address, dashboard, pids = start_ray_head(work / "ray", free_port(), free_port(), num_cpus=2,
                                              serve_ports=free_serve_ports())  # fmt: skip
    try:
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        sets = [f"mlflow.tracking_uri={tracking_uri}", f"ray.address={address}", f"registry.model_name=loopb-{tag}",
                f"train.storage_path={work / 'ckpt'}", *loop_settings(work, dashboard, tag, smoke)]  # fmt: skip
        if smoke:
            tiny = str(make_tiny_model(work / "tiny-bert"))
            sets.append(f"model.name_or_path={tiny}")
            retrain = [f"model.name_or_path={tiny}", f"train.storage_path={work / 'ckpt'}", "data.max_rows=null"]
        else:
            retrain = [f"train.storage_path={work / 'ckpt'}"]
        sets += [f"monitor.retrain.config={args.config}", f"monitor.retrain.overrides={json.dumps(retrain)}"]
        cfg = load_config(args.config, [*sets, *args.overrides])
        tracking = setup_mlflow(cfg)
        connect_ray(cfg)
        data = pd.read_csv(ROOT / cfg.data.path)
        wrong = cfg.replace(data={"path": str(permuted_copy(data, work / "permuted.csv"))}, registry={"min_score": 0})
        champion = run_pipeline(wrong, tracking)["model"]["version"]
        conf = dict(port=serve_port, tracking_uri=tracking_uri, model_name=cfg.registry.model_name,
                    log_dir=work / "predlog", api_key="")  # fmt: skip
        serve_deploy(deploy_config(path=work / "s.yaml", **conf), dashboard)
        base = f"http://127.0.0.1:{serve_port}"
        wait_until(lambda: httpx.get(f"{base}/ready", timeout=10).status_code == 200, 600, "/ready")
        send_shifted(base, data, cfg.data.text_columns, 60)
        started = time.monotonic()
        with Traffic(base, cfg, data, callers=args.callers) as traffic:
            start(with_explicit_paths(cfg))
            final = wait_until(lambda: _outcome(base), args.timeout_s, "a decision", interval=2)
        took = time.monotonic() - started
        stop(cfg.registry.model_name, keep_traffic=True)
        steps = step_runs(cfg.loop.experiment, final["last"]["cycle_run_id"])
        decision_s = cycle_seconds(final["last"]["cycle_run_id"])
        job = JobSubmissionClient(dashboard).get_job_info(f"loop-retrain-{cfg.registry.model_name}-"
                                                          f"{final['last']['cycle_run_id'][:12]}")  # fmt: skip
        job_s = (job.end_time - job.start_time) / 1000
        serve.shutdown()
        return {"config": Path(args.config).name, "champion": champion, "outcome": final["last"]["outcome"],
                "reason": final["last"]["reason"], "breach_to_decision_s": decision_s, "start_to_decision_s": took,
                "retrain_job_s": job_s,
                "steps": steps, "requests": dict(traffic.codes)}  # fmt: skip
    finally:
        import ray

        ray.shutdown()
        stop_ray_head(work / "ray", pids)
        stop_mlflow(mlflow_pid, work / "mlflow")


def _outcome(base: str) -> dict[str, Any] | None:
    loop = httpx.get(f"{base}/models", timeout=10).json()["loop"]
    return loop if loop.get("last", {}).get("outcome") else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=1, help="Cycles, each on fresh services; the table has medians.")
    p.add_argument("--callers", type=int, default=2, help="Concurrent callers of the app during the cycle.")
    p.add_argument("--timeout-s", type=float, default=3600)
    args = p.parse_args()
    cycles = [one_cycle(args) for _ in range(args.repeats)]
    for c in cycles:
        print(f"{c['config']}: {c['outcome']} ({c['reason']}) in {c['breach_to_decision_s']:.0f} s; {c['requests']}")
    total = median([c["breach_to_decision_s"] for c in cycles])
    job = median([c["retrain_job_s"] for c in cycles])
    names = list(dict.fromkeys(s["step"] for c in cycles for s in c["steps"]))
    rows = []
    for name in names:  # the check ends at the breach: its share is of its own time, not of breach -> decision
        seconds = median([s["s"] for c in cycles for s in c["steps"] if s["step"] == name])
        share = "before the breach" if name == "check" else f"share {seconds / total:.2f}"
        rows.append({"metric": f"{name}: s ({share})", "retrain job": None, "loop": seconds})
    rows.append({"metric": "breach -> decision: s", "retrain job": job, "loop": total})
    start = median([c["start_to_decision_s"] for c in cycles])
    rows.append({"metric": "loop start -> decision (wall, check included): s", "retrain job": None, "loop": start})
    outcomes = dict(Counter(c["outcome"] for c in cycles))
    name = f"loop-{Path(args.config).stem}"  # one results file per config
    report(name, "retrain job", "loop", rows, args, {"outcomes": outcomes, "cycles": cycles})


if __name__ == "__main__":
    main()
