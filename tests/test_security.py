"""Security defaults, checked on the real services the suite starts the way `make run` starts them: Ray's token
authentication on, the dashboard and MLflow reachable on loopback only, secrets only from the environment."""

from __future__ import annotations

import socket
import stat

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


@pytest.fixture(scope="module")
def protected_mlflow(tmp_path_factory: pytest.TempPathFactory):
    """An MLflow server with its own authentication, the writer and reader users and their credentials files."""
    from ray_app.local import free_port, start_mlflow, stop_mlflow
    from ray_app.registry_auth import Credentials, create_users, new_password, write_credentials

    root = tmp_path_factory.mktemp("mlflow-auth")
    admin, port = Credentials("admin", new_password()), free_port()
    pid = start_mlflow(root, port, admin=admin)
    uri = f"http://127.0.0.1:{port}"
    users = create_users(uri, admin, "protected-classifier")
    files = {role: write_credentials(root / "credentials" / role, creds) for role, creds in users.items()}
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

    from ray_app.registry import load_classifier
    from ray_app.registry_auth import read_credentials, use_node_credentials
    from ray_app.serve.ids import Resolver, parse_model_id
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


def test_credentials_files_others_can_read_are_refused(tmp_path) -> None:
    from ray_app.registry_auth import Credentials, read_credentials, write_credentials

    path = write_credentials(tmp_path / "reader", Credentials("reader", "s3cret-value"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_credentials(path) == Credentials("reader", "s3cret-value")
    assert "s3cret" not in repr(read_credentials(path))
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        read_credentials(path)
