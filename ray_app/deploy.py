"""Deployment files derived from the project's own: KubeRay's RayService serve config from serve_config.yaml, and JSON
Schemas from KubeRay's CRDs, so that what runs on Kubernetes cannot drift from what `make run` and the tests deploy.

`ray-app kuberay` rewrites `serveConfigV2` in deploy/kuberay/rayservice.yaml (the rest of that file is written by
hand, with its comments); `python -m ray_app.deploy crd-schema CRD.yaml OUT.json` converts a CRD once, when KubeRay is
upgraded. Neither touches the network.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"

# What must differ in a pod, with why; everything else is serve_config.yaml as it is.
POD_OVERRIDES: dict[str, tuple[Any, str]] = {
    "http_options.host": ("0.0.0.0", "the pod's proxy must accept traffic from KubeRay's serve Service, not loopback"),
    "applications.classifier.args.tracking_uri": (
        "http://mlflow.mlflow.svc.cluster.local:5000",
        "no MLflow server runs inside the Ray pods; this is the in-cluster MLflow Service",
    ),
    "applications.classifier.args.stream.bootstrap_servers": (
        "kafka-bootstrap.kafka.svc.cluster.local:9092",
        "no broker runs inside the Ray pods; this is the in-cluster Kafka's bootstrap Service",
    ),
    "applications.classifier.args.stream.producer_batch_bytes": (
        16384,
        "one record per batch is for Tansu's end offsets; Kafka reports them right whatever the batch",
    ),
    "applications.classifier.args.prediction_log.uri": (
        "s3://YOUR-BUCKET/ray_app/prediction_log",
        "a pod's disk is lost on restart and each node has its own; `ray-app canary-report` reads shared storage",
    ),
}
_BLOCK_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: *\|.*$")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c`; a list of named items (`applications`) is addressed by its items' `name`."""
    *parents, last = dotted.split(".")
    node: Any = tree
    for key in parents:
        node = next(i for i in node if i.get("name") == key) if isinstance(node, list) else node[key]
    if last not in node:
        raise KeyError(f"{dotted}: no such key in serve_config.yaml; update POD_OVERRIDES")
    node[last] = value


def serve_config_for_pod(serve_config: dict[str, Any]) -> dict[str, Any]:
    """serve_config.yaml's content with only POD_OVERRIDES applied."""
    out = copy.deepcopy(serve_config)
    for dotted, (value, _why) in POD_OVERRIDES.items():
        _set_dotted(out, dotted, value)
    return out


def serve_config_block(serve_config: dict[str, Any], indent: str) -> str:
    """The `serveConfigV2: |` literal block: the pod's serve config as YAML, headed by what differs and why."""
    header = [
        "# Generated from serve_config.yaml by `ray-app kuberay`; edit that file, then run the command again.",
        "#",
    ]
    header += ["# Differs from serve_config.yaml only in (what must differ in a pod):"]
    for key, (value, why) in POD_OVERRIDES.items():
        header += [f"#   {key}: {value}", f"#     ({why})"]
    body = yaml.safe_dump(serve_config_for_pod(serve_config), sort_keys=False, width=120).splitlines()
    lines = [f"{indent}serveConfigV2: |"] + [f"{indent}  {line}" for line in header + body]
    return "\n".join(lines) + "\n"


def render_rayservice(rayservice_text: str, serve_config: dict[str, Any]) -> str:
    """`rayservice_text` with its serveConfigV2 block replaced; every other line is kept as written."""
    lines = rayservice_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK_KEY.match(line)]
    if len(starts) != 1:
        raise ValueError(f"expected one `serveConfigV2: |` line, found {len(starts)}")
    start = starts[0]
    indent = _BLOCK_KEY.match(lines[start]).group("indent")
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(indent + "  ")):
        end += 1
    return "".join(lines[:start]) + serve_config_block(serve_config, indent) + "".join(lines[end:])


def write_rayservice(serve_config_path: Path = SERVE_CONFIG, rayservice_path: Path = RAYSERVICE) -> bool:
    """Regenerate the block in place; True when the file changed."""
    current = rayservice_path.read_text()
    wanted = render_rayservice(current, yaml.safe_load(serve_config_path.read_text()))
    if wanted != current:
        rayservice_path.write_text(wanted)
    return wanted != current


# --- KubeRay CRD -> JSON Schema -------------------------------------------------------------------------------------

_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def _json_schema(node: dict[str, Any], structural: bool = True) -> dict[str, Any]:
    """One OpenAPI v3 (Kubernetes structural) schema node as JSON Schema.

    `nullable` becomes a "null" type; `x-kubernetes-list-type: set` becomes uniqueItems; other `x-kubernetes-*`
    keys (CEL rules among them) have no JSON Schema meaning and are dropped. Objects with declared properties get
    `additionalProperties: false`, as the API server's strict field validation (`kubectl apply --validate=strict`)
    rejects unknown fields; not inside allOf/anyOf/oneOf, which only add constraints to the enclosing object.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _json_schema(sub, structural) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _json_schema(value, structural and key != "not")
        elif key in _SUBSCHEMA_LISTS:
            out[key] = [_json_schema(sub, structural=False) for sub in value]
        elif key != "nullable" and not key.startswith("x-kubernetes-"):
            out[key] = value
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if structural and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def crd_json_schema(crd: dict[str, Any], version: str = "v1", source: str = "") -> dict[str, Any]:
    """JSON Schema for one served version of a CRD: its openAPIV3Schema, with apiVersion and kind fixed."""
    spec = crd["spec"]
    served = {v["name"]: v for v in spec["versions"] if v.get("served")}
    if version not in served:
        raise ValueError(f"{spec['names']['kind']} does not serve {version}; served: {sorted(served)}")
    schema = _json_schema(served[version]["schema"]["openAPIV3Schema"])
    kind, api_version = spec["names"]["kind"], f"{spec['group']}/{version}"
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *schema.get("required", [])})
    header = {"$schema": "http://json-schema.org/draft-07/schema#", "title": f"{kind} ({api_version})"}
    if source:
        header["$comment"] = f"Converted by ray_app.deploy.crd_json_schema from {source}"
    return {**header, **schema}


def write_crd_schema(crd_path: Path, out_path: Path, source: str, version: str = "v1") -> None:
    crd = yaml.safe_load(crd_path.read_text())
    out_path.write_text(json.dumps(crd_json_schema(crd, version, source), separators=(",", ":"), sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_app.deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rs = sub.add_parser("rayservice", help="Rewrite serveConfigV2 in the RayService from serve_config.yaml.")
    rs.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    rs.add_argument("--out", type=Path, default=RAYSERVICE)
    crd = sub.add_parser("crd-schema", help="Convert a KubeRay CRD file to a JSON Schema file.")
    crd.add_argument("crd", type=Path)
    crd.add_argument("out", type=Path)
    crd.add_argument("--source", default="", help="Where the CRD came from (repository, tag, path), kept in the file.")
    crd.add_argument("--version", default="v1")
    args = parser.parse_args(argv)
    if args.command == "rayservice":
        changed = write_rayservice(args.serve_config, args.out)
        print(f"{args.out}: {'updated' if changed else 'up to date'}")
    else:
        write_crd_schema(args.crd, args.out, args.source, args.version)
        print(f"{args.out}: written")


if __name__ == "__main__":
    main()
