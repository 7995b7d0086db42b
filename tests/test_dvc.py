"""DVC for real: `dvc repro` of dvc.yaml on the smoke config against this session's Ray head and MLflow server, user
data through `dvc add` / `dvc push` / `dvc pull` with a local remote, and the DVC version that MLflow runs record
beside the data digest. Each test works in a copy of the working tree turned into a fresh git + DVC repository."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ray_app.config import DataConfig
from ray_app.data import DataReport, Splits, log_to_mlflow
from ray_app.dvcinfo import MODIFIED, NEW, RECORDED, dvc_version
from ray_app.local import BIN
from tests.conftest import ROOT, SMOKE

DVC = str(BIN / "dvc")
CSV = "data/projects/dataset.csv"
STAGES = ("data", "train", "register", "evaluate")
GIT = ["git", "-c", "user.name=ray_app tests", "-c", "user.email=tests@ray-app.invalid"]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 120) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The working tree as git would commit it (tracked and new files, nothing ignored), as a fresh git repository
    with this project's DVC setup; DVC's per-repo state goes to the temp dir, not /var/tmp."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    target = tmp_path / "repo"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is listed too
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    assert (target / "dvc.yaml").is_file() and (target / ".dvc" / "config").is_file()
    run(["git", "init", "-q"], target)
    run([DVC, "config", "--local", "core.site_cache_dir", str(tmp_path / "dvc-site")], target)
    run([*GIT, "add", "-A"], target)
    run([*GIT, "commit", "-qm", "working tree"], target)
    return target


def feedback_store(repo: Path, rows: int) -> Path:
    """A feedback store as `ray-app feedback` leaves it: Parquet parts in a directory inside the repository."""
    store = repo / "data" / "feedback"
    store.mkdir(parents=True, exist_ok=True)
    frame = pd.read_csv(repo / CSV).head(rows)
    frame.assign(id=[f"fb-{i}" for i in range(rows)]).to_parquet(store / f"part-{rows}.parquet")
    return store


# ---- quick: DVC and MLflow, no Ray ----------------------------------------------------------------------------------


def test_user_data_round_trips_through_a_local_remote(repo: Path, tmp_path: Path) -> None:
    """What the README tells users to do with data they add: `dvc add`, commit the .dvc file, push to a remote; a
    fresh cache pulls the same bytes back."""
    export = repo / "data" / "exports" / "export-2026-11.csv"
    export.parent.mkdir(parents=True)
    pd.read_csv(repo / CSV).sample(50, random_state=1).assign(id=lambda f: "new-" + f["id"].astype(str)).to_csv(
        export, index=False
    )
    wanted = md5(export)
    run([DVC, "add", str(export.relative_to(repo))], repo)
    pointer = yaml.safe_load((repo / "data/exports/export-2026-11.csv.dvc").read_text())
    assert pointer["outs"][0]["md5"] == wanted
    assert "/export-2026-11.csv" in (repo / "data/exports/.gitignore").read_text().splitlines()  # out of git
    remote = tmp_path / "remote"
    run([DVC, "remote", "add", "-d", "local", str(remote)], repo)
    run([*GIT, "add", "data/exports", ".dvc/config"], repo)
    run([*GIT, "commit", "-qm", "an export, tracked by DVC"], repo)
    assert "1 file pushed" in run([DVC, "push"], repo)
    assert (remote / "files" / "md5" / wanted[:2] / wanted[2:]).is_file()

    export.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    assert "1 file fetched" in run([DVC, "pull"], repo)
    assert md5(export) == wanted


def test_dvc_version_of_added_data_and_of_a_stage_dependency(repo: Path, tmp_path: Path) -> None:
    store = feedback_store(repo, 10)
    run([DVC, "add", "data/feedback"], repo)
    recorded = yaml.safe_load((repo / "data/feedback.dvc").read_text())["outs"][0]["md5"]
    version = dvc_version(str(store))
    assert version is not None
    assert (version.md5, version.recorded, version.status) == (recorded, (recorded,), RECORDED)
    assert (version.source, version.path) == ("data/feedback.dvc", "data/feedback")
    assert dvc_version(str(next(store.glob("*.parquet")))) == version  # a file inside: the directory's version

    feedback_store(repo, 12)  # new rows arrive, not yet `dvc add`ed: the version says so
    changed = dvc_version(str(store))
    assert changed is not None and changed.status == MODIFIED and changed.md5 != recorded

    csv = dvc_version(str(repo / CSV))  # in git, a dependency of the stages; no dvc.lock yet in a fresh copy
    assert csv is not None and (csv.md5, csv.status) == (md5(repo / CSV), NEW)
    assert csv.source == "dvc.lock (data, evaluate, train)"

    unpacked = tmp_path / "job-working-dir"  # what `ray job submit --working-dir .` unpacks: no .git
    shutil.copytree(repo, unpacked, ignore=shutil.ignore_patterns(".git"))
    in_job = dvc_version(str(unpacked / CSV))
    assert in_job is not None and (in_job.md5, in_job.source) == (csv.md5, csv.source)

    assert dvc_version(str(repo / "README.md")) is None  # in the repo, not tracked
    outside = tmp_path / "outside.csv"
    outside.write_text("id\n1\n")
    assert dvc_version(str(outside)) is None
    assert dvc_version(None) is None and dvc_version("s3://bucket/data.csv") is None
    (repo / "dvc.yaml").write_text("stages: [not, a, mapping\n")
    assert dvc_version(str(repo / CSV)) is None  # a broken dvc.yaml costs the tag, never the run


def _splits(frame: pd.DataFrame, cfg: DataConfig) -> Splits:
    frame = frame.assign(label=frame["tag"].str.lower(), text=frame["title"])
    parts = {name: frame.iloc[i::3].reset_index(drop=True) for i, name in enumerate(("train", "val", "test"))}
    report = DataReport(
        path=cfg.path, rows_read=len(frame), rows_valid=len(frame), bad_rows={}, bad_fraction=0.0,
        split_sizes={n: len(p) for n, p in parts.items()}, class_counts={}, digest="d1g35t",
    )  # fmt: skip
    return Splits(**parts, labels=list(cfg.labels), report=report)


def test_mlflow_runs_record_the_dvc_version_beside_the_digest(repo: Path, tmp_path: Path, mlflow_server: str) -> None:
    store = feedback_store(repo, 10)
    run([DVC, "add", "data/feedback"], repo)
    recorded = yaml.safe_load((repo / "data/feedback.dvc").read_text())["outs"][0]["md5"]
    outside = tmp_path / "outside.csv"
    shutil.copy(repo / CSV, outside)
    client = MlflowClient(mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(f"dvc-{uuid.uuid4().hex[:8]}")

    tags = {}
    for path, feedback in ((repo / CSV, str(store)), (outside, None)):
        cfg = DataConfig(path=str(path), feedback_uri=feedback)
        with mlflow.start_run() as active:
            log_to_mlflow(_splits(pd.read_csv(path).head(30), cfg), cfg)
        logged = client.get_run(active.info.run_id)
        tags[path] = logged.data.tags
        assert tags[path]["data_digest"] == "d1g35t"
        input_tags = [{t.key: t.value for t in i.tags} for i in logged.inputs.dataset_inputs]
        assert len(input_tags) == 3 and all(t["data_digest"] == "d1g35t" for t in input_tags)
        assert all(t.get("dvc_md5") == (md5(path) if path != outside else None) for t in input_tags)
    inside = tags[repo / CSV]
    assert inside["dvc.data.md5"] == md5(repo / CSV) and inside["dvc.data.status"] == NEW
    assert inside["dvc.data.path"] == CSV and inside["dvc.data.tracked_by"].startswith("dvc.lock")
    assert (inside["dvc.feedback.md5"], inside["dvc.feedback.status"]) == (recorded, RECORDED)
    assert inside["dvc.feedback.tracked_by"] == "data/feedback.dvc"
    assert not [k for k in tags[outside] if k.startswith("dvc.")]  # outside a DVC repo: nothing, and no failure


# ---- slow: the pipeline on a real cluster ---------------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_repro_runs_the_stages_on_the_smoke_config_and_then_has_nothing_to_do(
    repo: Path, mlflow_server: str, ray_cluster: dict[str, str], tiny_model: Path, storage: Path
) -> None:
    """The smoke config becomes the pipeline's config through params.yaml, as a user switches configs; Ray and MLflow
    come from the environment, as `make repro` passes them."""
    name = f"dvc-{uuid.uuid4().hex[:8]}"
    conf = yaml.safe_load(SMOKE.read_text())
    conf["model"]["name_or_path"] = str(tiny_model)
    conf["train"]["storage_path"] = str(storage)
    conf["registry"]["model_name"] = name
    conf["mlflow"]["experiment"] = name
    (repo / "configs" / "dvc-smoke.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    (repo / "params.yaml").write_text("config: configs/dvc-smoke.yaml\n")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(repo),  # the copy's package, the code that the `ray_app` dependency hashes
        "RAY_ADDRESS": ray_cluster["address"],
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": mlflow_server,
    }

    first = run([DVC, "repro"], repo, env, timeout=900)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first, first[-3000:]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    csv_dep = next(d for d in lock["data"]["deps"] if d["path"] == CSV)
    assert csv_dep["md5"] == md5(repo / CSV)
    assert lock["train"]["params"]["configs/dvc-smoke.yaml"]["train"]["epochs"] == 2
    assert {o["path"] for o in lock["evaluate"]["outs"]} == {"metrics/evaluate.json"}

    data = json.loads((repo / "metrics/data.json").read_text())
    trained = json.loads((repo / "metrics/train.json").read_text())
    registered = json.loads((repo / "metrics/register.json").read_text())["model"]
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert sum(data["data"]["split_sizes"].values()) == data["data"]["rows_valid"] <= conf["data"]["max_rows"]
    assert Path(trained["train"]["checkpoint_path"]).exists()
    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(name, "challenger").version == registered["version"]
    assert evaluation["model_uri"] == f"models:/{name}@challenger" and 0 <= evaluation["metrics"]["f1_weighted"] <= 1
    for run_id in (data["run_id"], trained["run_id"]):  # the data run and the training run both carry it
        tags = client.get_run(run_id).data.tags
        assert tags["dvc.data.md5"] == csv_dep["md5"] and tags["dvc.data.tracked_by"].startswith("dvc.lock")
    shown = run([DVC, "metrics", "show", "--json"], repo, env)
    assert "metrics/evaluate.json" in shown and json.dumps(evaluation["metrics"]["f1_weighted"]) in shown

    second = run([DVC, "repro"], repo, env, timeout=300)
    assert "Running stage" not in second and "Data and pipelines are up to date" in second, second[-3000:]
