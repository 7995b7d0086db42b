"""notebooks/walkthrough.ipynb executed end to end with nbclient in a real Jupyter kernel, against this session's Ray
head and MLflow server: its parameters cell is overridden the way papermill does it (a cell inserted after the one
tagged `parameters`), and the assertions read back what it really made: registered versions, the served answer, the
prediction log and the monitoring run."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import nbformat
import pytest
import requests
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from ray_app.ports import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
MARK = "WALKTHROUGH="

# Appended by the test only: what the notebook made, for the assertions below.
REPORT = """
import json, sys
print("WALKTHROUGH=" + json.dumps({
    "python": sys.executable, "ray_app": ray_app.__file__, "model": cfg.registry.model_name, "url": URL,
    "data_run": data_run.info.run_id, "trained": trained["model"], "tuned": tuned["model"],
    "promoted": decision.promoted, "answer": answer, "replayed": replayed.to_dict(),
    "monitor_run": outcome["run_id"], "window_rows": outcome["window"]["rows"], "log_uri": cfg.monitor.log_uri,
}))
"""


def test_committed_notebook_has_no_outputs_and_a_parameters_cell() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs before committing"
    assert [c for c in code if "parameters" in c.metadata.get("tags", [])], "the first code cell is tagged parameters"


def test_walkthrough_runs_end_to_end(mlflow_server, ray_cluster, tiny_model, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    port = free_port()
    params = {
        "TRACKING_URI": mlflow_server,
        "RAY_ADDRESS": ray_cluster["address"],
        "DASHBOARD_URL": ray_cluster["dashboard"],
        "MODEL_PATH": str(tiny_model),
        "WORK_DIR": str(tmp_path / "work"),
        "SERVE_PORT": port,
        "RUN_TAG": uuid.uuid4().hex[:6],
    }
    injected = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT.strip()))
    # The kernel inherits this process's environment (PYTHONPATH, RAY_AUTH_MODE) and runs from the repository root;
    # jupyter_client starts the `python3` kernel with this interpreter.
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    finally:
        (tmp_path / "executed.ipynb").write_text(nbformat.writes(nb))  # kept for a failure's post-mortem
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    got = json.loads(printed.split(MARK, 1)[1])

    assert Path(got["ray_app"]).resolve().is_relative_to(ROOT.resolve())  # the kernel ran the code under test
    client_ = MlflowClient(mlflow_server)
    name = got["model"]
    versions = {v.version for v in client_.search_model_versions(f"name = '{name}'")}
    assert {got["trained"]["version"], got["tuned"]["version"]} == versions and len(versions) == 2
    champion = client_.get_model_version_by_alias(name, "champion").version
    assert champion == (got["tuned"]["version"] if got["promoted"] else got["trained"]["version"])
    assert client_.get_model_version_by_alias(name, "challenger").version == got["tuned"]["version"]

    prediction = got["answer"]["predictions"][0]
    assert got["answer"]["version"] == champion and got["answer"]["route"] == "primary"
    assert prediction["label"] in prediction["probabilities"]
    assert got["replayed"]["statuses"] == {"200": got["replayed"]["sent"]}
    assert got["window_rows"] == got["replayed"]["sent"] + 1 >= 30  # every served row, the single request included
    assert list(Path(got["log_uri"]).glob("**/*.parquet"))

    monitor = client_.get_run(got["monitor_run"])
    assert client_.get_experiment(monitor.info.experiment_id).name == "walkthrough-monitoring"
    assert monitor.data.tags["model_version"] == champion and "drift/share" in monitor.data.metrics
    assert "feedback/accuracy" in monitor.data.metrics
    artifacts = {a.path for a in client_.list_artifacts(monitor.info.run_id, "monitoring")}
    assert "monitoring/drift_report.html" in artifacts
    data_tags = client_.get_run(got["data_run"]).data.tags
    assert data_tags["data_digest"]
    csv = ROOT / "data" / "projects" / "dataset.csv"  # the repository is a DVC repo: the run names the file's version
    assert data_tags["dvc.data.md5"] == hashlib.md5(csv.read_bytes()).hexdigest()

    with pytest.raises(requests.ConnectionError):  # the last cell shut Serve down
        requests.get(f"{got['url']}/health", timeout=5)
