"""The registry as a trust boundary: MLflow's own authentication (`mlflow server --app-name basic-auth`), a writer
user that trains, registers and promotes, and a reader user that serves. A request without credentials is 401, a
reader's write 403.

Secrets never go into committed files or into job metadata (`ray job submit --runtime-env-json` and Serve configs
are readable by anyone who can list jobs): each process reads its user from a credentials file on its node, mode
0600, in MLflow's own credentials format, named by `RAY_APP_MLFLOW_CREDENTIALS` (a path, not a secret). On KubeRay
that file is a mounted Kubernetes Secret.
"""

from __future__ import annotations

import configparser
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

AUTH_APP = "basic-auth"
CREDENTIALS_ENV = "RAY_APP_MLFLOW_CREDENTIALS"
_USER, _PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print a password
        return f"Credentials({self.username!r}, password=***)"

    def env(self) -> dict[str, str]:
        return {_USER: self.username, _PASSWORD: self.password}


def write_credentials(path: Path, creds: Credentials) -> Path:
    """MLflow's credentials-file format ([mlflow] mlflow_tracking_username/password), created 0600 before a byte
    of the secret is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[mlflow]\nmlflow_tracking_username = {creds.username}\nmlflow_tracking_password = {creds.password}\n")
    os.chmod(path, 0o600)
    return path


def read_credentials(path: str | Path) -> Credentials:
    """Refuses a file others can read: a password readable by every user on the node protects nothing."""
    path = Path(path).expanduser()
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by other users: chmod 600 it")
    parser = configparser.ConfigParser()
    parser.read(path)
    return Credentials(parser["mlflow"]["mlflow_tracking_username"], parser["mlflow"]["mlflow_tracking_password"])


def use_node_credentials() -> Credentials | None:
    """Called once where a process starts (the CLI, each Serve replica): the user in the file that
    `RAY_APP_MLFLOW_CREDENTIALS` names becomes this process's MLflow user, as MLflow's client reads it (its
    MLFLOW_TRACKING_USERNAME / _PASSWORD). Credentials already in the environment win; no file, no change."""
    path = os.environ.get(CREDENTIALS_ENV)
    if not path or os.environ.get(_USER):
        return None
    creds = read_credentials(path)
    os.environ.update(creds.env())
    return creds


def use_credentials(path: str | None) -> Credentials | None:
    """A process's MLflow user from the file its config names (serving's registry_credentials), over any other;
    without one, the node's (`use_node_credentials`)."""
    if not path:
        return use_node_credentials()
    creds = read_credentials(path)
    os.environ.update(creds.env())
    return creds


def server_config(root: Path) -> Path:
    """MLflow's auth ini for one server: its user database beside the tracking store, by absolute path (MLflow
    resolves a relative one from the server's working directory). Everyone signed in may read; writes need the
    permission an owner gets (MLflow grants MANAGE to whoever creates an experiment or a registered model)."""
    root.mkdir(parents=True, exist_ok=True)
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{(root / 'basic_auth.db').resolve()}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return ini


def server_env(root: Path, admin: Credentials) -> dict[str, str]:
    """What `mlflow server --app-name basic-auth` needs to start: its ini, the admin's first password and a stable
    secret for its CSRF tokens (kept in a 0600 file, so a restart keeps signed-in browser sessions valid)."""
    key_file = root / "flask_secret_key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(server_config(root)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": key_file.read_text(),
    }


def new_password() -> str:
    return secrets.token_urlsafe(24)


def create_users(tracking_uri: str, admin: Credentials, model_name: str) -> dict[str, Credentials]:
    """The writer and the reader, with new passwords. The writer creates the registered model, so it owns it
    (MANAGE) before anyone else could; the reader only has the server's default READ."""
    import requests

    users = {role: Credentials(f"ray-app-{role}", new_password()) for role in ("writer", "reader")}
    for creds in users.values():
        r = requests.post(
            f"{tracking_uri}/api/2.0/mlflow/users/create",
            json={"username": creds.username, "password": creds.password},
            auth=(admin.username, admin.password),
            timeout=30,
        )
        r.raise_for_status()
    writer = users["writer"]
    r = requests.post(
        f"{tracking_uri}/api/2.0/mlflow/registered-models/create",
        json={"name": model_name},
        auth=(writer.username, writer.password),
        timeout=30,
    )
    if "RESOURCE_ALREADY_EXISTS" in r.text:  # made earlier by someone else: the admin makes the writer its manager
        r = requests.post(
            f"{tracking_uri}/api/3.0/mlflow/users/permissions/grant",
            json={
                "username": writer.username,
                "resource_type": "registered_model",
                "resource_id": model_name,
                "permission": "MANAGE",
            },
            auth=(admin.username, admin.password),
            timeout=30,
        )
    r.raise_for_status()
    return users


# What the pipeline writes on every version it registers (pipeline.register_checkpoint) and on its run
# (evaluate.log_eval): serving refuses a version without them, so a version registered by hand, by a script or by
# anyone who got hold of registry credentials is not served unless the app's config says so (require_lineage).
LINEAGE_TAGS = ("run_id", "data_digest", "config_hash", "git_commit")
EVALUATION_METRIC = "test_f1_weighted"


def lineage_problem(client, name: str, version: str) -> str | None:
    """Why this version is not the pipeline's work, or None: a lineage tag missing, or no test evaluation on its run.
    Not the promotion gate: challengers have both, and shadow and canary traffic must reach them."""
    mv = client.get_model_version(name, version)
    missing = [tag for tag in LINEAGE_TAGS if tag not in (mv.tags or {})]
    if missing:
        return f"it has no lineage tags {missing} (the pipeline's `ray-app register` writes them)"
    if not mv.run_id or EVALUATION_METRIC not in client.get_run(mv.run_id).data.metrics:
        return f"its run has no test evaluation ({EVALUATION_METRIC})"
    return None
