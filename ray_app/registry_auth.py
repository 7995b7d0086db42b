"""The registry as a trust boundary: MLflow's own authentication (`mlflow server --app-name basic-auth`), a writer
user that trains, registers and promotes, and a reader user that serves. A request without credentials is 401, a
reader's write 403.

Secrets never go into committed files or into job metadata (`ray job submit --runtime-env-json` and Serve configs
are readable by anyone who can list jobs): each process reads its user from a credentials file on its node, mode
0600, in MLflow's own credentials format, named by `RAY_APP_MLFLOW_CREDENTIALS` (a path, not a secret). On KubeRay
that file is a mounted Kubernetes Secret. A node can name a second file for serving
(`RAY_APP_MLFLOW_SERVE_CREDENTIALS`, the reader), so jobs write as the writer and replicas on the same node read as the
reader without a per-cluster serve config.

`python -m ray_app.registry_auth` is how a cluster head sets this up (cluster.yaml runs it; docs/security.md):
`credentials DIR` makes the admin's, writer's and reader's files once, where `ray up` runs; `server-env` prints what
`mlflow server --app-name basic-auth` needs; `users` makes (or re-passwords) the writer and reader from their files.
"""

from __future__ import annotations

import argparse
import configparser
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

AUTH_APP = "basic-auth"
CREDENTIALS_ENV = "RAY_APP_MLFLOW_CREDENTIALS"
SERVE_CREDENTIALS_ENV = "RAY_APP_MLFLOW_SERVE_CREDENTIALS"
ROLES = ("admin", "writer", "reader")
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
    """A serving replica's MLflow user: the file its config names (registry_credentials), else the node's serving
    file (`RAY_APP_MLFLOW_SERVE_CREDENTIALS`), else the node's one user (`use_node_credentials`)."""
    path = path or os.environ.get(SERVE_CREDENTIALS_ENV)
    if not path:
        return use_node_credentials()
    creds = read_credentials(path)
    os.environ.update(creds.env())
    return creds


def server_config(root: Path, database_uri: str | None = None) -> Path:
    """MLflow's auth ini for one server: its user database beside the tracking store, by absolute path (MLflow
    resolves a relative one from the server's working directory), or `database_uri` (a cluster's PostgreSQL, so
    users and permissions outlive the head node). Everyone signed in may read; writes need the permission an owner
    gets (MLflow grants MANAGE to whoever creates an experiment or a registered model)."""
    root.mkdir(parents=True, exist_ok=True)
    ini = root / "basic_auth.ini"
    database_uri = database_uri or f"sqlite:///{(root / 'basic_auth.db').resolve()}"
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a database URI may carry a password
    with os.fdopen(fd, "w") as f:
        f.write(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {database_uri}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
    return ini


def server_env(root: Path, admin: Credentials, database_uri: str | None = None) -> dict[str, str]:
    """What `mlflow server --app-name basic-auth` needs to start: its ini, the admin's first password and a stable
    secret for its CSRF tokens (kept in a 0600 file, so a restart keeps signed-in browser sessions valid)."""
    if admin.username != "admin":
        raise ValueError(f"the server's admin user is 'admin' (its ini's admin_username), not {admin.username!r}")
    config = server_config(root, database_uri)
    key_file = root / "flask_secret_key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": key_file.read_text(),
    }


def new_password() -> str:
    return secrets.token_urlsafe(24)


def new_users() -> dict[str, Credentials]:
    """The three users a protected registry has, with new passwords (the admin's name is fixed by its ini)."""
    return {role: Credentials("admin" if role == "admin" else f"ray-app-{role}", new_password()) for role in ROLES}


def create_users(
    tracking_uri: str, admin: Credentials, model_name: str, users: dict[str, Credentials] | None = None
) -> dict[str, Credentials]:
    """The writer and the reader (new ones, or `users` as given; a user that exists gets the given password, so
    running this again after a head node restart is harmless). The writer creates the registered model, so it owns
    it (MANAGE) before anyone else could; the reader only has the server's default READ."""
    import requests

    if users is None:
        users = {role: creds for role, creds in new_users().items() if role != "admin"}
    for creds in users.values():
        body = {"username": creds.username, "password": creds.password}
        auth = (admin.username, admin.password)
        r = requests.post(f"{tracking_uri}/api/2.0/mlflow/users/create", json=body, auth=auth, timeout=30)
        if "RESOURCE_ALREADY_EXISTS" in r.text:
            r = requests.patch(f"{tracking_uri}/api/2.0/mlflow/users/update-password", json=body, auth=auth, timeout=30)
        r.raise_for_status()
    writer = users["writer"]
    r = requests.post(
        f"{tracking_uri}/api/2.0/mlflow/registered-models/create",
        json={"name": model_name},
        auth=(writer.username, writer.password),
        timeout=30,
    )
    if "RESOURCE_ALREADY_EXISTS" in r.text:  # made earlier (by a first run, or someone else): the writer manages it
        grant = {"username": writer.username, "resource_type": "registered_model", "resource_id": model_name}
        auth = (admin.username, admin.password)
        r = requests.get(f"{tracking_uri}/api/3.0/mlflow/users/permissions/get", params=grant, auth=auth, timeout=30)
        r.raise_for_status()
        if r.json().get("permission") != "MANAGE":
            r = requests.post(
                f"{tracking_uri}/api/3.0/mlflow/users/permissions/grant",
                json={**grant, "permission": "MANAGE"},
                auth=auth,
                timeout=30,
            )
    r.raise_for_status()
    return users


# What the pipeline writes on every version it registers (pipeline.register_checkpoint) and on its run
# (evaluate.log_eval): serving refuses a version without them, so a version registered by hand, by a script or by
# anyone who got hold of registry credentials is not served unless the app's config says so (require_lineage).
LINEAGE_TAGS = ("run_id", "data_digest", "config_hash", "git_commit")
EVALUATION_METRIC = "test/f1_weighted"
EVALUATION_METRIC_BEFORE = "test_f1_weighted"  # its name on versions registered before metrics had sections


def lineage_problem(client, name: str, version: str) -> str | None:
    """Why this version is not the pipeline's work, or None: a lineage tag missing, or no test evaluation on its run.
    Not the promotion gate: challengers have both, and shadow and canary traffic must reach them."""
    mv = client.get_model_version(name, version)
    missing = [tag for tag in LINEAGE_TAGS if tag not in (mv.tags or {})]
    if missing:
        return f"it has no lineage tags {missing} (the pipeline's `ray-app register` writes them)"
    logged = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    if EVALUATION_METRIC not in logged and EVALUATION_METRIC_BEFORE not in logged:
        return f"its run has no test evaluation ({EVALUATION_METRIC})"
    return None


# --- the command line a cluster head runs (cluster.yaml) ------------------------------------------------------------


def _wait_for(url: str, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"error: no MLflow server answered {url}/health within {timeout_s:g} s")
        time.sleep(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ray_app.registry_auth", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("credentials", help="Write admin, writer and reader credentials files (0600) to DIR; "
                       "files already there are kept.")  # fmt: skip
    c.add_argument("dir", type=Path)
    e = sub.add_parser("server-env", help="Print `export` lines for `mlflow server --app-name basic-auth`.")
    e.add_argument("--root", type=Path, required=True, help="Where the server's auth ini and CSRF key live")
    e.add_argument("--admin", type=Path, required=True, help="The admin's credentials file")
    e.add_argument("--database-uri", default=None, help="The users' database (default: SQLite under --root)")
    u = sub.add_parser("users", help="Create the writer and reader from their files (again: reset passwords).")
    u.add_argument("--tracking-uri", required=True)
    u.add_argument("--model-name", required=True, help="The registered model the writer will own")
    u.add_argument("--wait", type=float, default=120, help="Seconds to wait for the server to answer")
    for role in ROLES:
        u.add_argument(f"--{role}", type=Path, required=True, help=f"The {role}'s credentials file")
    args = p.parse_args(argv)
    if args.command == "credentials":
        for role, creds in new_users().items():
            path = args.dir.expanduser() / role
            if path.exists():
                read_credentials(path)  # still refuses a file others can read
                print(f"{path}: kept")
            else:
                write_credentials(path, creds)
                print(f"{path}: written (0600)")
    elif args.command == "server-env":
        env = server_env(args.root.expanduser(), read_credentials(args.admin), args.database_uri)
        sys.stdout.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    else:
        creds = {role: read_credentials(getattr(args, role)) for role in ROLES}
        _wait_for(args.tracking_uri, args.wait)
        users = create_users(args.tracking_uri, creds["admin"], args.model_name, {r: creds[r] for r in ROLES[1:]})
        print(f"users {sorted(u.username for u in users.values())} ready on {args.tracking_uri}")


if __name__ == "__main__":
    main()
