"""Security defaults, checked on the real services the suite starts the way `make run` starts them: Ray's token
authentication on, the dashboard and MLflow reachable on loopback only, secrets only from the environment."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from ray_app.local import RAY_TOKEN_FILE
from ray_app.runtime import secret_from_env
from ray_app.serve.settings import ServeArgs
from tests.conftest import ROOT

# Keys that would hold a secret if someone wrote one into a committed file; their values must name an env var or a
# file, never be the secret itself.
SECRET_WORDS = ("password", "secret", "token", "api_key", "apikey", "access_key")


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent: UDP connect only picks the interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        return s.connect_ex((host, port)) == 0


@pytest.mark.slow
def test_dashboard_and_mlflow_answer_on_loopback_only(ray_cluster, mlflow_server) -> None:
    outward = _outward_address()
    if outward is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for name, url in (("dashboard", ray_cluster["dashboard"]), ("mlflow", mlflow_server)):
        port = int(url.rsplit(":", 1)[1])
        assert _accepts("127.0.0.1", port), f"{name} is not up on loopback"
        assert not _accepts(outward, port), f"{name} port {port} accepts connections on {outward}"


@pytest.mark.slow
def test_ray_dashboard_wants_the_token(ray_cluster) -> None:
    """`ray job submit`, the Jobs API and the dashboard: 401 without the token, 403 with a wrong one."""
    jobs = f"{ray_cluster['dashboard']}/api/jobs/"
    assert httpx.get(jobs, timeout=30).status_code == 401
    assert httpx.get(jobs, headers={"Authorization": "Bearer not-the-token"}, timeout=30).status_code == 403
    token = RAY_TOKEN_FILE.read_text().strip()
    assert httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    mode = stat.S_IMODE(RAY_TOKEN_FILE.stat().st_mode)
    assert mode & 0o077 == 0, f"{RAY_TOKEN_FILE} is readable by others: {oct(mode)}"


def test_serve_api_key_comes_from_the_environment(monkeypatch) -> None:
    """The app's args name the variable; a key written into serve_config.yaml itself is refused."""
    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    args = ServeArgs.model_validate(app["args"])
    assert args.api_key_env and args.api_key_env.isupper()
    monkeypatch.setenv(args.api_key_env, "from-the-env")
    assert secret_from_env(args.api_key_env) == "from-the-env"
    monkeypatch.delenv(args.api_key_env)
    assert secret_from_env(args.api_key_env) is None
    with pytest.raises(ValidationError, match="api_key"):
        ServeArgs.model_validate({**app["args"], "api_key": "literal-key"})


def test_serve_http_on_loopback_and_make_turns_token_auth_on() -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    makefile = (ROOT / "Makefile").read_text()
    assert "export RAY_AUTH_MODE ?= token" in makefile


def _secret_values(tree, path: str = "") -> list[str]:
    """Paths of keys that look like secrets and hold a literal (not an env reference, a file path or null)."""
    found: list[str] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            where = f"{path}.{key}"
            lowered = str(key).lower()
            if any(w in lowered for w in SECRET_WORDS) and isinstance(value, str):
                named = lowered.endswith(("_env", "_path", "_file", "_ref")) or value.startswith(("${", "~", "/"))
                if not named and value.strip():
                    found.append(where)
            found += _secret_values(value, where)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += _secret_values(value, f"{path}[{i}]")
    return found


def test_committed_configs_hold_no_secrets() -> None:
    files = [*ROOT.glob("configs/*.yaml"), ROOT / "serve_config.yaml", ROOT / "cluster.yaml"]
    files += [*(ROOT / "deploy" / "kuberay").glob("*.yaml"), *(ROOT / ".github" / "workflows").glob("*.yml")]
    offenders = {}
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if found := _secret_values(doc):
                offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, f"literal secrets in committed files: {offenders}"


def test_secret_scan_can_fail() -> None:
    assert _secret_values({"db": {"password": "hunter2", "password_env": "DB_PASSWORD"}}) == [".db.password"]
    assert _secret_values({"env": {"RAY_AUTH_TOKEN": "${{ secrets.RAY_AUTH_TOKEN }}"}}) == []


def _registry_auth(*args: str) -> str:
    """`python -m ray_app.registry_auth ...` as cluster.yaml's head command runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "ray_app.registry_auth", *args], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def protected_mlflow(tmp_path_factory: pytest.TempPathFactory):
    """An MLflow server with its own authentication, set up the way a cluster head does it (cluster.yaml): the
    credentials files made once, the server started with the admin's, the writer and reader made from theirs, and
    made again (a head restart) without harm."""
    from ray_app.local import start_mlflow, stop_mlflow
    from ray_app.ports import free_port
    from ray_app.registry_auth import read_credentials

    root = tmp_path_factory.mktemp("mlflow-auth")
    files = {role: root / "credentials" / role for role in ("admin", "writer", "reader")}
    _registry_auth("credentials", str(root / "credentials"))
    port = free_port()
    pid = start_mlflow(root, port, admin=read_credentials(files["admin"]))
    uri = f"http://127.0.0.1:{port}"
    users_args = ["users", "--tracking-uri", uri, "--model-name", "protected-classifier"]
    users_args += [arg for role, path in files.items() for arg in (f"--{role}", str(path))]
    _registry_auth(*users_args)
    _registry_auth(*users_args)
    users = {role: read_credentials(files[role]) for role in ("writer", "reader")}
    yield {"uri": uri, "users": users, "files": files, "model": "protected-classifier"}
    stop_mlflow(pid, root)


def _as(monkeypatch: pytest.MonkeyPatch, creds) -> None:
    """This process's MLflow user (none: empty), restored after the test even where the app sets it itself."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", creds.username if creds else "")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", creds.password if creds else "")


@pytest.mark.slow
def test_protected_registry_refuses_anonymous_and_reader_writes_and_still_serves_the_reader(
    protected_mlflow, tiny_model, tmp_path, monkeypatch
) -> None:
    """Anonymous writes are 401, the reader's 403; the writer registers a real version; the reader then does what
    a serving replica does with the registry: resolve the alias and load the version."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ray_app.model_ids import Resolver, parse_model_id
    from ray_app.registry import load_classifier
    from ray_app.registry_auth import read_credentials, use_node_credentials
    from tests.conftest import smoke_config
    from tests.serving import register_version

    uri, name, users = protected_mlflow["uri"], protected_mlflow["model"], protected_mlflow["users"]
    mlflow.set_tracking_uri(uri)
    _as(monkeypatch, None)
    with pytest.raises(MlflowException) as anonymous:
        MlflowClient(uri).create_registered_model("anyone-can-write")
    assert "401" in str(anonymous.value) or "not authenticated" in str(anonymous.value).lower()

    monkeypatch.setenv("RAY_APP_MLFLOW_CREDENTIALS", str(protected_mlflow["files"]["writer"]))
    _as(monkeypatch, None)  # unset, so the node's file is used
    assert use_node_credentials() == users["writer"]  # the node's file, as the CLI and the replicas read it
    cfg = smoke_config(uri, "auto", tiny_model, tmp_path, f"registry.model_name={name}")
    mlflow.set_experiment(cfg.mlflow.experiment)  # created by the writer, so it owns it, as the pipeline does
    version = register_version(cfg, tiny_model, 7, tmp_path)

    _as(monkeypatch, read_credentials(protected_mlflow["files"]["reader"]))
    client = MlflowClient(uri)
    with pytest.raises(MlflowException) as refused:
        client.set_registered_model_alias(name, "champion", version)
    assert "403" in str(refused.value) or "permission denied" in str(refused.value).lower()
    ref = Resolver(client, ttl_s=5).resolve(parse_model_id("@challenger", name))
    assert ref.version == version
    classifier = load_classifier(f"models:/{ref.concrete}")
    assert classifier.predict_proba(["YOLO for video frames"]).shape == (1, len(cfg.data.labels))


def test_registry_auth_server_env_is_what_the_server_needs(tmp_path) -> None:
    """`server-env` prints shell lines that set exactly what `start_mlflow(admin=...)` passes to the server."""
    from ray_app.registry_auth import read_credentials, server_env

    _registry_auth("credentials", str(tmp_path / "c"))
    assert "kept" in _registry_auth("credentials", str(tmp_path / "c"))  # a second run keeps the passwords
    printed = _registry_auth("server-env", "--root", str(tmp_path / "s"), "--admin", str(tmp_path / "c" / "admin"))
    shown = subprocess.run(
        ["bash", "-c", f"{printed}\nenv -0"], capture_output=True, text=True, check=True, env={}
    ).stdout
    env = dict(item.split("=", 1) for item in shown.split("\0") if "=" in item)
    expected = server_env(tmp_path / "s", read_credentials(tmp_path / "c" / "admin"))
    assert {k: env[k] for k in expected} == expected
    assert stat.S_IMODE(Path(expected["MLFLOW_AUTH_CONFIG_PATH"]).stat().st_mode) == 0o600


def test_credentials_files_others_can_read_are_refused(tmp_path) -> None:
    from ray_app.registry_auth import Credentials, read_credentials, write_credentials

    path = write_credentials(tmp_path / "reader", Credentials("reader", "s3cret-value"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_credentials(path) == Credentials("reader", "s3cret-value")
    assert "s3cret" not in repr(read_credentials(path))
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        read_credentials(path)


def test_a_node_names_the_writer_for_jobs_and_the_reader_for_serving(tmp_path, monkeypatch) -> None:
    """cluster.yaml sets both files on every node: jobs (`use_node_credentials`) write as the writer, replicas
    (`use_credentials` with no registry_credentials in the serve config) read as the reader; a config's own file
    wins over both."""
    from ray_app.registry_auth import (
        CREDENTIALS_ENV,
        SERVE_CREDENTIALS_ENV,
        Credentials,
        use_credentials,
        use_node_credentials,
        write_credentials,
    )

    files = {n: write_credentials(tmp_path / n, Credentials(n, f"pw-{n}")) for n in ("writer", "reader", "other")}
    monkeypatch.setenv(CREDENTIALS_ENV, str(files["writer"]))
    monkeypatch.setenv(SERVE_CREDENTIALS_ENV, str(files["reader"]))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)  # both restored after the test
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert use_node_credentials() == Credentials("writer", "pw-writer")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    assert use_credentials(None) == Credentials("reader", "pw-reader")
    assert use_credentials(str(files["other"])) == Credentials("other", "pw-other")
