"""The deployment files, each checked by the tool the real system checks it with: Ray's cluster-config validation for
cluster.yaml, KubeRay's CRD schemas (committed, converted from KubeRay's own CRD files) and Serve's deploy schema for
the KubeRay resources, hadolint for the image, GitHub's workflow schema for the workflows. No network, no cluster."""

from __future__ import annotations

import copy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from ray_app.config_loader import load_config
from ray_app.deploy import POD_OVERRIDES, _json_schema, render_rayservice, serve_config_for_pod

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KUBERAY = ROOT / "deploy" / "kuberay"
CRS = {"rayjob": KUBERAY / "rayjob.yaml", "rayservice": KUBERAY / "rayservice.yaml"}
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _tool(name: str) -> str:
    """A dev-extra executable from this venv; missing means the install is broken, which must fail, not skip."""
    path = BIN / name
    assert path.exists(), f"{path} missing: `make venv` installs it with the dev extra"
    return str(path)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# --- cluster.yaml: Ray's own validation -----------------------------------------------------------------------------


def _ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before touching a cloud: merge the provider's defaults, then validate against Ray's schema.

    Both functions are private to Ray. If Ray moves them this test must fail and be pointed at the new ones, never
    skip: a skipped validator is a config nobody checks.
    """
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        pytest.fail(f"Ray {ray.__version__} moved its cluster-config validation ({exc}); find it in ray.autoscaler")
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validation() -> None:
    config = _ray_validate(_load(ROOT / "cluster.yaml"))
    nodes = config["available_node_types"]
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) > 0]
    assert gpu and all(n["min_workers"] < n["max_workers"] for n in gpu), "an autoscaling GPU worker group"
    assert nodes[config["head_node_type"]]["resources"].get("GPU", 0) == 0, "a CPU head"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c), "token auth on every node"
    head = " ".join(config["head_start_ray_commands"])
    assert '--backend-store-uri "postgresql://' in head and "--artifacts-destination" in head
    assert "--dashboard-host=127.0.0.1" in head
    # the protected registry by default: MLflow's auth app, its users made on the head, every node's roles named
    assert "mlflow server --app-name basic-auth" in head and "ray_app.registry_auth users" in head
    for c in (c for c in starts if "ray start" in c):
        assert "RAY_APP_MLFLOW_CREDENTIALS=" in c and "RAY_APP_MLFLOW_SERVE_CREDENTIALS=" in c, c


def test_cluster_yaml_local_file_mounts_exist() -> None:
    """Paths inside the repository must exist; `~` paths are the user's own (token, secrets) and are documented."""
    mounts = _load(ROOT / "cluster.yaml")["file_mounts"]
    local = [src for src in mounts.values() if not src.startswith("~")]
    assert local and all((ROOT / src).exists() for src in local)


def test_rays_validation_rejects_a_misspelt_key() -> None:
    """Proves the check above can fail: Ray's schema forbids unknown top-level keys."""
    config = _load(ROOT / "cluster.yaml")
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        _ray_validate(config)


# --- KubeRay: CRD schemas, Serve's deploy schema, the generator -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CRS))
def test_kuberay_resource_matches_its_crd_schema(name: str) -> None:
    schema = KUBERAY / "schemas" / f"{name}.json"
    result = _run(_tool("check-jsonschema"), "--schemafile", str(schema), str(CRS[name]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "mutate", "error"),
    [
        (
            "rayjob",
            lambda cr: cr["spec"]["rayClusterSpec"].update(enableInTreeAutoscalng=True),
            "'enableInTreeAutoscalng' was unexpected",
        ),
        (
            "rayservice",
            lambda cr: cr["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="4"),
            "'4' is not of type 'integer'",
        ),
        ("rayjob", lambda cr: cr.update(kind="RayService"), "'RayJob' was expected"),
    ],
    ids=["misspelt-key", "wrong-type", "wrong-kind"],
)
def test_crd_schema_rejects_mistakes(name: str, mutate, error: str, tmp_path: Path) -> None:
    """The converted schemas are strict (unknown fields fail, as with `kubectl apply --validate=strict`)."""
    cr = _load(CRS[name])
    mutate(cr)
    bad = tmp_path / f"{name}.yaml"
    bad.write_text(yaml.safe_dump(cr))
    result = _run(_tool("check-jsonschema"), "--schemafile", str(KUBERAY / "schemas" / f"{name}.json"), str(bad))
    assert result.returncode == 1 and error in result.stdout, result.stdout + result.stderr


def _cluster_spec(cr: dict[str, Any]) -> dict[str, Any]:
    return cr["spec"].get("rayClusterSpec") or cr["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("name", sorted(CRS))
def test_kuberay_cluster_has_gpu_autoscaling_auth_and_limits(name: str) -> None:
    spec = _cluster_spec(_load(CRS[name]))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    role = "reader" if name == "rayservice" else "writer"  # serving only reads the registry; training writes
    for c in containers:
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"]), c["name"]
        env = {e["name"]: e for e in c["env"]}
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # from a Secret, never inline
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == f"ray-app-mlflow-{role}", (c["name"], var)
    gpu = [
        g
        for g in spec["workerGroupSpecs"]
        if all("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu and all(g["minReplicas"] < g["maxReplicas"] for g in gpu)


def test_rayservice_is_what_the_generator_writes() -> None:
    """`ray-app kuberay` run on the committed files changes nothing: serveConfigV2 is serve_config.yaml's."""
    committed = CRS["rayservice"].read_text()
    assert render_rayservice(committed, _load(ROOT / "serve_config.yaml")) == committed


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and all(isinstance(i, dict) and "name" in i for i in tree):
        return {k: v for item in tree for k, v in _flatten(item, f"{prefix}{item['name']}.").items()}
    return {prefix.rstrip("."): tree}


def test_rayservice_serve_config_passes_serves_schema_and_differs_only_where_a_pod_must() -> None:
    from ray.serve.schema import ServeDeploySchema

    from ray_app.serve.settings import ServeArgs

    embedded = yaml.safe_load(_load(CRS["rayservice"])["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(embedded)
    for app in schema.applications:
        ServeArgs.model_validate(app.args)  # what the builder will get, checked by the app's own types
    local, pod = _flatten(_load(ROOT / "serve_config.yaml")), _flatten(embedded)
    differing = {k for k in local.keys() | pod.keys() if local.get(k) != pod.get(k)}
    assert differing == set(POD_OVERRIDES)


def test_kuberay_command_regenerates_after_a_serve_config_change(tmp_path: Path) -> None:
    """Edit serve_config.yaml, run `ray-app kuberay`: the RayService follows; a second run changes nothing."""
    serve_config = _load(ROOT / "serve_config.yaml")
    serve_config["applications"][0]["deployments"][0]["num_replicas"] = 3
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(serve_config))
    shutil.copy(CRS["rayservice"], tmp_path / "rayservice.yaml")
    cmd = [_tool("ray-app"), "kuberay", "--serve-config", "serve_config.yaml", "--out", "rayservice.yaml"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "updated" in first.stdout and "up to date" in second.stdout, first.stderr + second.stderr
    embedded = yaml.safe_load(_load(tmp_path / "rayservice.yaml")["spec"]["serveConfigV2"])
    assert embedded["applications"][0]["deployments"][0]["num_replicas"] == 3


def test_generator_rejects_an_override_that_no_longer_exists() -> None:
    serve_config = _load(ROOT / "serve_config.yaml")
    del serve_config["http_options"]["host"]
    with pytest.raises(KeyError, match=r"http_options\.host"):
        serve_config_for_pod(serve_config)


def test_rayjob_entrypoint_is_a_valid_config() -> None:
    """The entrypoint's --config and every --set load through the app's own config validation."""
    argv = shlex.split(_load(CRS["rayjob"])["spec"]["entrypoint"])
    assert argv[:2] == ["ray-app", "pipeline"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / argv[argv.index("--config") + 1], sets)
    assert cfg.train.use_gpu and not cfg.pipeline.promote


def test_crd_conversion_rules() -> None:
    node = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "nullable": True},
            "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        },
        "anyOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]}],
    }
    out = _json_schema(node)
    assert out["additionalProperties"] is False and "additionalProperties" not in out["anyOf"][0]
    assert out["properties"]["a"]["type"] == ["string", "null"]
    assert out["properties"]["tags"]["uniqueItems"] is True
    assert "x-kubernetes-int-or-string" not in out["properties"]["q"]


# --- the image and the workflows ------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = _run(_tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_can_fail() -> None:
    """Guards the test above against a hadolint that passes everything (e.g. a wrapper that found no binary)."""
    bad = "FROM rayproject/ray\nRUN apt-get install curl\n"
    result = subprocess.run([_tool("hadolint"), "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert result.returncode == 1 and "DL3006" in result.stdout, result.stdout + result.stderr


def test_dockerfile_is_multistage_pinned_and_non_root() -> None:
    lines = [line.split() for line in DOCKERFILE.read_text().splitlines() if line and not line.startswith("#")]
    bases = [words[1] for words in lines if words[0] == "FROM"]
    assert len(bases) >= 2, "multi-stage"
    assert all(b.startswith(f"rayproject/ray:{ray.__version__}-py311-cu") for b in bases), bases
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "constraints.txt" in DOCKERFILE.read_text()


def test_same_image_everywhere() -> None:
    image = _load(ROOT / "cluster.yaml")["docker"]["image"]
    for path in CRS.values():
        spec = _cluster_spec(_load(path))
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {image}, path.name


def test_workflows_pass_githubs_schema() -> None:
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "train.yml"}
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_do_what_they_say() -> None:
    ci = _load(ROOT / ".github" / "workflows" / "ci.yml")
    assert "pull_request" in ci[True]  # YAML 1.1 reads the key `on` as True
    ci_steps = [s.get("run", "") for job in ci["jobs"].values() for s in job["steps"]]
    assert "make lint" in ci_steps and "make test" in ci_steps
    train = _load(ROOT / ".github" / "workflows" / "train.yml")
    assert "workflow_dispatch" in train[True]
    steps = [s for job in train["jobs"].values() for s in job["steps"]]
    to_cluster = [s for s in steps if s.get("run", "").startswith("ray ")]
    assert to_cluster and all(s["env"]["RAY_AUTH_TOKEN"] == "${{ secrets.RAY_AUTH_TOKEN }}" for s in to_cluster)
    assert "RAY_AUTH_TOKEN" not in train.get("env", {}), "the token only where it is used"
    runs = [s.get("run", "") for s in steps]
    submits = [r for r in runs if r.startswith("ray job submit")]
    assert any("ray-app pipeline" in r and "pipeline.promote=false" in r for r in submits), "trains without promoting"
    assert any("ray-app promote" in r for r in submits), "promotes only through the gate"
