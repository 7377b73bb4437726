"""Static checks of the cluster and image definitions (cluster/, docker/).

The launcher YAML goes through Ray's own validation (what `ray up` runs before it touches a
cloud); the KubeRay manifests through a JSON schema holding the fields of the ray.io/v1 CRDs
that they use; then: token auth in every cluster file, no literal credentials, image tags equal
to what docker/build.sh prints, and the Dockerfiles' user, pins and detectron2 commit. No
servers, no network, no Docker engine: the images themselves cannot be built here.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DOCKER = REPO / "docker"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
SECRETS = CLUSTER / "kuberay" / "secrets.example.yaml"
BUILD_SH = DOCKER / "build.sh"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}

CONTAINER_UID = "1000"
GPU_RESOURCE = "nvidia.com/gpu"
TOKEN_SECRET_KEY = "auth_token"  # the data key KubeRay reads from authOptions.secretName
GPU_INSTANCE = re.compile(r"^(g|p)\d")  # AWS GPU instance families: g4dn, g5, g6, p4d, p5, ...
# Names of variables and keys that hold credentials.
SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|access_key|api_key|private_key)")


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def pyproject_version() -> str:
    """The [project] version, read here independently of build.sh's own parsing."""
    table = re.search(
        r"^\[project\]\n(.*?)(?=^\[|\Z)", (REPO / "pyproject.toml").read_text(), re.M | re.S
    )
    assert table is not None
    version = re.search(r'^version\s*=\s*"([^"]+)"', table.group(1), re.M)
    assert version is not None
    return version.group(1)


def print_tags(build_sh: Path = BUILD_SH, env: dict[str, str] | None = None) -> list[str]:
    result = subprocess.run(
        ["bash", str(build_sh), "--print-tags"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@cache
def built_tags() -> dict[str, str]:
    """flavour -> tag, as docker/build.sh prints them (cpu first, then cuda)."""
    tags = print_tags()
    assert len(tags) == 2, tags
    return dict(zip(("cpu", "cuda"), tags, strict=True))


# --- Ray cluster launcher -------------------------------------------------------------------


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before contacting the cloud: fill in the provider's defaults, merge
    the setup commands, check the docker section, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared: dict[str, Any] = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_passes_ray_validation() -> None:
    config = ray_validate(load_yaml(LAUNCHER))

    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "the head is a CPU node"
    gpu_workers = [
        t for t in workers.values() if GPU_INSTANCE.match(t["node_config"]["InstanceType"])
    ]
    assert gpu_workers, f"no GPU worker node type in {sorted(workers)}"
    assert all(t["max_workers"] >= 1 for t in gpu_workers)
    # The image is the environment: no package installs at node start.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key


def _unknown_top_level_key(c: dict[str, Any]) -> None:
    c["dashboard_port"] = 8265


def _max_workers_not_int(c: dict[str, Any]) -> None:
    c["max_workers"] = "four"


def _node_type_without_node_config(c: dict[str, Any]) -> None:
    del c["available_node_types"][c["head_node_type"]]["node_config"]


def _unknown_docker_key(c: dict[str, Any]) -> None:
    c["docker"]["tag"] = "latest"


def _head_type_not_defined(c: dict[str, Any]) -> None:
    c["head_node_type"] = "no_such_type"


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (_unknown_top_level_key, jsonschema.ValidationError),
        (_max_workers_not_int, jsonschema.ValidationError),
        (_node_type_without_node_config, jsonschema.ValidationError),
        (_unknown_docker_key, jsonschema.ValidationError),
        (_head_type_not_defined, ValueError),
    ],
)
def test_broken_launcher_copies_fail_ray_validation(
    breakage: Callable[[dict[str, Any]], None], error: type[Exception]
) -> None:
    config = load_yaml(LAUNCHER)
    breakage(config)
    with pytest.raises(error):
        ray_validate(config)


def _start_command(commands: list[str]) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, commands
    return starts[0]


def test_launcher_token_auth_and_tunnel_only_dashboard() -> None:
    config = load_yaml(LAUNCHER)
    mounted = {dst.rstrip("/") for dst in config["file_mounts"]}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = _start_command(config[key])
        assert re.search(r"\bRAY_AUTH_MODE=token\b", command), f"{key}: token auth is off"
        assert "RAY_AUTH_TOKEN=" not in command, f"{key}: a token on the command line"
        token_path = re.search(r"\bRAY_AUTH_TOKEN_PATH=([^\s;]+)", command)
        assert token_path is not None, f"{key}: no RAY_AUTH_TOKEN_PATH"
        token_dir = token_path.group(1).replace("$HOME/", "~/").rsplit("/", 1)[0]
        assert token_dir in mounted, f"{key}: {token_dir} is not a file mount ({mounted})"

    run_options = config["docker"].get("run_options", [])
    assert "--env RAY_AUTH_MODE=token" in run_options, "shells in the container lack token auth"

    head = _start_command(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard must listen on localhost only"
    # The token comes from the user's machine, never from this repository.
    for local in config["file_mounts"].values():
        assert local.startswith("~/"), local
        assert not Path(local).expanduser().resolve().is_relative_to(REPO), local


# --- KubeRay manifests ----------------------------------------------------------------------
# A JSON schema with the fields of the ray.io/v1 CRDs (KubeRay 1.6: RayClusterSpec,
# HeadGroupSpec, WorkerGroupSpec, AuthOptions, RayJobSpec) that these manifests use, typed and
# required as the CRDs have them; spec-level objects list their CRD fields exhaustively so that
# a misspelt field fails here, as the API server's strict field validation would reject it.
# Pod templates are checked only for what Ray needs (containers with a name and an image).

INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
QUANTITY = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\d+(\.\d+)?([KMGTPE]i|[mkMGTPE])?$"},
    ]
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ENV_VAR = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "value": {"type": "string"},
        "valueFrom": {"type": "object"},
    },
    "additionalProperties": False,
    "not": {"required": ["value", "valueFrom"]},
}
ENV_FROM = {
    "type": "object",
    "properties": {
        "prefix": {"type": "string"},
        "secretRef": {"type": "object", "required": ["name"]},
        "configMapRef": {"type": "object", "required": ["name"]},
    },
    "additionalProperties": False,
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "image": {"type": "string", "minLength": 1},
        "env": {"type": "array", "items": ENV_VAR},
        "envFrom": {"type": "array", "items": ENV_FROM},
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"containerPort": INT32},
            },
        },
        "resources": {
            "type": "object",
            "properties": {
                "limits": {"type": "object", "additionalProperties": QUANTITY},
                "requests": {"type": "object", "additionalProperties": QUANTITY},
            },
            "additionalProperties": False,
        },
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}},
        },
    },
}
HEAD_GROUP_SPEC = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "properties": {
        "template": POD_TEMPLATE,
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "ingressOptions": {"type": "object"},
        "resources": STRING_MAP,
        "labels": STRING_MAP,
        "rayStartParams": STRING_MAP,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
    },
    "additionalProperties": False,
}
WORKER_GROUP_SPEC = {
    "type": "object",
    "required": [
        "groupName",
        "replicas",
        "minReplicas",
        "maxReplicas",
        "rayStartParams",
        "template",
    ],
    "properties": {
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string", "minLength": 1},
        "replicas": INT32,
        "minReplicas": INT32,
        "maxReplicas": INT32,
        "idleTimeoutSeconds": INT32,
        "priority": {"type": "integer"},
        "resources": STRING_MAP,
        "labels": STRING_MAP,
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
        "numOfHosts": INT32,
    },
    "additionalProperties": False,
}
AUTH_OPTIONS = {
    "type": "object",
    "properties": {
        "mode": {"enum": ["disabled", "token"]},
        "secretName": {"type": "string", "minLength": 1},
        "enableK8sTokenAuth": {"type": "boolean"},
    },
    "additionalProperties": False,
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "upgradeStrategy": {"type": "object"},
        "authOptions": AUTH_OPTIONS,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": STRING_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "historyServerOptions": {"type": "object"},
        "networkPolicy": {"type": "object"},
        "tlsOptions": {"type": "object"},
        "headGroupSpec": HEAD_GROUP_SPEC,
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP_SPEC},
    },
    "additionalProperties": False,
}
RAY_JOB_SPEC = {
    "type": "object",
    "properties": {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": INT32,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": STRING_MAP,
        "clusterSelector": STRING_MAP,
        "submitterConfig": {"type": "object"},
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "ttlSecondsAfterFinished": INT32,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    },
    "additionalProperties": False,
}


def resource_schema(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
                },
            },
            "spec": spec,
        },
        "additionalProperties": False,
    }


RAY_CLUSTER_SCHEMA = resource_schema("RayCluster", RAY_CLUSTER_SPEC)
RAY_JOB_SCHEMA = resource_schema("RayJob", RAY_JOB_SPEC)


def cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, RayClusterSpec) for the RayCluster and the RayJob's cluster."""
    yield RAYCLUSTER.name, load_yaml(RAYCLUSTER)["spec"]
    yield RAYJOB.name, load_yaml(RAYJOB)["spec"]["rayClusterSpec"]


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group, container) for the head ("head") and every worker group of a RayClusterSpec."""
    for container in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield "head", container
    for group in spec.get("workerGroupSpecs", []):
        for container in group["template"]["spec"]["containers"]:
            yield group["groupName"], container


def secret_documents() -> dict[str, dict[str, Any]]:
    docs = load_documents(SECRETS)
    assert all(d.get("kind") == "Secret" for d in docs), "secrets.example.yaml holds Secrets only"
    return {d["metadata"]["name"]: d for d in docs}


@pytest.mark.parametrize(
    ("path", "schema"), [(RAYCLUSTER, RAY_CLUSTER_SCHEMA), (RAYJOB, RAY_JOB_SCHEMA)]
)
def test_kuberay_manifests_match_crd_schema(path: Path, schema: dict[str, Any]) -> None:
    docs = load_documents(path)
    assert len(docs) == 1, f"{path.name}: one resource per file"
    jsonschema.validate(docs[0], schema)


def _drop_group_name(d: dict[str, Any]) -> None:
    del d["spec"]["workerGroupSpecs"][0]["groupName"]


def _misspelt_worker_groups(d: dict[str, Any]) -> None:
    d["spec"]["workerGroupSpec"] = d["spec"].pop("workerGroupSpecs")


def _int_ray_start_param(d: dict[str, Any]) -> None:
    d["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 4


def _no_containers(d: dict[str, Any]) -> None:
    d["spec"]["headGroupSpec"]["template"]["spec"]["containers"] = []


def _unknown_auth_mode(d: dict[str, Any]) -> None:
    d["spec"]["authOptions"]["mode"] = "password"


def _old_api_version(d: dict[str, Any]) -> None:
    d["apiVersion"] = "ray.io/v1alpha1"


@pytest.mark.parametrize(
    "breakage",
    [
        _drop_group_name,
        _misspelt_worker_groups,
        _int_ray_start_param,
        _no_containers,
        _unknown_auth_mode,
        _old_api_version,
    ],
)
def test_broken_raycluster_copies_fail_schema(breakage: Callable[[dict[str, Any]], None]) -> None:
    manifest = load_yaml(RAYCLUSTER)
    breakage(manifest)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, RAY_CLUSTER_SCHEMA)


@pytest.mark.parametrize(("name", "spec"), list(cluster_specs()))
def test_kuberay_cluster_layout(name: str, spec: dict[str, Any]) -> None:
    head_limits = [
        c.get("resources", {}).get("limits", {}) for g, c in containers(spec) if g == "head"
    ]
    assert all(GPU_RESOURCE not in limits for limits in head_limits), (
        f"{name}: the head is a CPU node"
    )

    gpu_groups = [
        group
        for group in spec["workerGroupSpecs"]
        if any(
            int(c["resources"]["limits"].get(GPU_RESOURCE, 0)) >= 1
            for c in group["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, f"{name}: no worker group with {GPU_RESOURCE} limits"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    assert max(g["maxReplicas"] for g in gpu_groups) >= 1


@pytest.mark.parametrize(("name", "spec"), list(cluster_specs()))
def test_kuberay_token_auth_and_internal_dashboard(name: str, spec: dict[str, Any]) -> None:
    auth = spec["authOptions"]
    assert auth["mode"] == "token", f"{name}: token auth is off"
    token_secret = secret_documents().get(auth["secretName"])
    assert token_secret is not None, (
        f"{name}: Secret {auth['secretName']!r} is not in {SECRETS.name}"
    )
    assert TOKEN_SECRET_KEY in token_secret["stringData"]
    # Token auth needs Ray >= 2.52; the manifests state the image's Ray version.
    assert tuple(int(p) for p in spec["rayVersion"].split(".")) >= (2, 52)

    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", (
        f"{name}: the head service is exposed"
    )
    assert not head.get("enableIngress", False), f"{name}: an ingress exposes the dashboard"


@pytest.mark.parametrize(("name", "spec"), list(cluster_specs()))
def test_kuberay_credentials_come_from_secrets(name: str, spec: dict[str, Any]) -> None:
    known = secret_documents()
    for group, container in containers(spec):
        for var in container.get("env", []):
            assert var["name"] not in {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}, (
                f"{name}/{group}: set by KubeRay from authOptions, not by hand"
            )
            if SECRET_NAME.search(var["name"]):
                assert "value" not in var, f"{name}/{group}: {var['name']} has a literal value"
        refs = [
            src["secretRef"]["name"] for src in container.get("envFrom", []) if "secretRef" in src
        ]
        assert "pseudoflow-storage" in refs, f"{name}/{group}: no storage credentials"
        assert set(refs) <= set(known), f"{name}/{group}: unknown Secrets {set(refs) - set(known)}"


def test_rayjob_runs_pseudoflow_and_cleans_up() -> None:
    spec = load_yaml(RAYJOB)["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:2] == ["pseudoflow", "run"], spec["entrypoint"]
    assert entrypoint[entrypoint.index("--config") + 1]
    assert entrypoint[entrypoint.index("--root") + 1].startswith("s3://")
    assert "--tracking-uri" not in entrypoint, "MLflow's URI comes from the environment"
    # the entrypoint's config is a valid GPU run: the presets and --set values it names load
    sets = [entrypoint[i + 1] for i, word in enumerate(entrypoint) if word == "--set"]
    config = load_config(entrypoint[entrypoint.index("--config") + 1], sets)
    assert config.runtime.use_gpu
    assert config.data.root.startswith("s3://")
    assert config.teacher.init
    assert config.student.init
    head_env = {
        var["name"]
        for group, container in containers(spec["rayClusterSpec"])
        if group == "head"
        for var in container.get("env", [])
    }
    assert "MLFLOW_TRACKING_URI" in head_env

    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0


def test_rayjob_cluster_matches_raycluster() -> None:
    cluster = load_yaml(RAYCLUSTER)["spec"]
    job_cluster = load_yaml(RAYJOB)["spec"]["rayClusterSpec"]
    for key in ("rayVersion", "authOptions"):
        assert job_cluster[key] == cluster[key], key
    assert {c["image"] for _, c in containers(job_cluster)} == {
        c["image"] for _, c in containers(cluster)
    }


def test_secret_template_holds_placeholders_only() -> None:
    docs = secret_documents()
    assert set(docs) == {"pseudoflow-ray-auth", "pseudoflow-storage"}
    for name, doc in docs.items():
        assert "data" not in doc, f"{name}: base64 `data` could hide a real value; use stringData"
        for key, value in doc["stringData"].items():
            assert re.fullmatch(r"<[^<>]+>", value), (
                f"{name}.{key}: {value!r} is not a <placeholder>"
            )


# --- no literal secrets ---------------------------------------------------------------------

SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([\w.-]*(?:password|passwd|secret|token|access_key|api_key|private_key)[\w.-]*)"
    r"\s*[:=]\s*[\"']?([^\s\"'#;,)]*)"
)
LONG_HEX = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32,}(?![0-9A-Za-z])")
BASE64ISH = re.compile(r"(?<![\w/+=.-])[A-Za-z0-9+/]{40,}={0,2}(?![\w/+=.-])")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _is_reference(key: str, value: str) -> bool:
    """Not a value: the name or path of a secret, a <placeholder>, an environment reference, a
    home-relative path, or a YAML mapping/list that follows (its own lines are scanned too)."""
    if re.search(r"(?i)(name|ref|_path|_file)$", key):
        return True
    return value == "" or value.startswith(("<", "$", "~/", "[", "{"))


def literal_secrets(text: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    found = [m.group(0) for m in AWS_KEY_ID.finditer(text)]
    found += [m.group(0) for m in LONG_HEX.finditer(text) if m.group(0) not in allowed]
    found += [m.group(0) for m in BASE64ISH.finditer(text) if re.search(r"\d", m.group(0))]
    found += [
        m.group(0)
        for m in SECRET_ASSIGNMENT.finditer(text)
        if not _is_reference(m.group(1), m.group(2))
    ]
    return found


def pinned_detectron2_commit() -> str:
    return dockerfile_args(DOCKERFILES["cuda"])["DETECTRON2_COMMIT"]


def scanned_files() -> list[Path]:
    return sorted(p for root in (CLUSTER, DOCKER) for p in root.rglob("*") if p.is_file())


def test_no_literal_secrets_in_cluster_or_docker_files() -> None:
    # The pinned detectron2 commit is the only long hex string allowed (docker/ only).
    allowed = frozenset({pinned_detectron2_commit()})
    files = scanned_files()
    assert LAUNCHER in files
    assert SECRETS in files
    problems = {
        str(path.relative_to(REPO)): hits
        for path in files
        if (
            hits := literal_secrets(
                path.read_text(), allowed if path.is_relative_to(DOCKER) else frozenset()
            )
        )
    }
    assert problems == {}


@pytest.mark.parametrize(
    "planted",
    [
        "RAY_AUTH_TOKEN=" + "9aa25b5c26f1e8e6" * 4 + " ray start --head",
        "AWS_ACCESS_KEY_ID: " + "AKIA" + "Q" * 16,
        "  password: hunter2",
        'AWS_SECRET_ACCESS_KEY: "' + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "Z9x8w7v6u5" + '"',
        "auth_token: " + "SUJtz0H78DhWvVd9xThGajyybwpiGFIQLBVgia46GMU",
    ],
    # fixed values: pytest-xdist's workers must collect the same test ids
)
def test_secret_scan_finds_planted_values(planted: str) -> None:
    assert literal_secrets(planted)


# --- images ---------------------------------------------------------------------------------

IMAGE_KEYS = frozenset({"image", "head_image", "worker_image"})


def image_references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in IMAGE_KEYS and isinstance(value, str):
                yield value
            else:
                yield from image_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from image_references(item)


def test_build_sh_tags_follow_the_pyproject_version() -> None:
    version = pyproject_version()
    tags = built_tags()
    assert tags["cpu"].endswith(f":{version}-cpu")
    assert tags["cuda"].endswith(f":{version}-cuda")
    assert tags["cpu"].rsplit(":", 1)[0] == tags["cuda"].rsplit(":", 1)[0], "one repository"


def test_build_sh_reads_the_version_and_needs_no_docker(tmp_path: Path) -> None:
    (tmp_path / "docker").mkdir()
    shutil.copy2(BUILD_SH, tmp_path / "docker" / "build.sh")
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\n\n'
        '[project]\nname = "pseudoflow"\nversion = "9.8.7"\n\n'
        '[tool.other]\nversion = "0.0.0"\n'
    )
    # A `docker` first on PATH that leaves a mark if --print-tags ever calls it.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_docker = fake_bin / "docker"
    fake_docker.write_text(f"#!/bin/sh\ntouch {tmp_path / 'docker-was-called'}\nexit 1\n")
    fake_docker.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"}

    tags = print_tags(tmp_path / "docker" / "build.sh", env=env)

    repository = built_tags()["cpu"].rsplit(":", 1)[0]
    assert tags == [f"{repository}:9.8.7-cpu", f"{repository}:9.8.7-cuda"]
    assert not (tmp_path / "docker-was-called").exists()


def test_cluster_files_name_the_built_cuda_tag() -> None:
    cuda = built_tags()["cuda"]
    references = {
        path.name: list(image_references(doc))
        for path in (LAUNCHER, RAYCLUSTER, RAYJOB)
        for doc in load_documents(path)
    }
    assert all(references.values()), f"a cluster file names no image: {references}"
    assert {ref for refs in references.values() for ref in refs} == {cuda}
    assert load_yaml(LAUNCHER)["docker"]["image"] == cuda


def test_docs_mention_only_built_tags() -> None:
    tags = set(built_tags().values())
    repository = built_tags()["cpu"].rsplit(":", 1)[0]
    mentioned = {
        match
        for path in scanned_files()
        if path.suffix in {".md", ".yaml", ".yml"}
        for match in re.findall(re.escape(repository) + r":[\w.-]+", path.read_text())
    }
    assert mentioned, "no tag mentioned in cluster/ or docker/"
    assert mentioned <= tags, f"stale or unknown tags: {mentioned - tags}"


# --- Dockerfiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and parser directives dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "a continuation line never ends"
    return instructions


def _arg_default(args: str) -> tuple[str, str | None]:
    name, sep, value = args.partition("=")
    return name.strip(), value.strip().strip("\"'") if sep else None


def dockerfile_args(path: Path) -> dict[str, str]:
    """Every ARG default in the file (global and per stage), by name."""
    values: dict[str, str] = {}
    for inst in parse_dockerfile(path.read_text()):
        if inst.keyword == "ARG":
            name, value = _arg_default(inst.args)
            if value is not None:
                values[name] = value
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text
    )


def final_stage(path: Path) -> list[Instruction]:
    instructions = parse_dockerfile(path.read_text())
    last_from = max(i for i, inst in enumerate(instructions) if inst.keyword == "FROM")
    return instructions[last_from:]


def env_values(stage: list[Instruction], values: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in stage:
        if inst.keyword == "ENV":
            for pair in inst.args.split():
                key, _, value = pair.partition("=")
                env[key] = substitute(value, values)
    return env


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_runs_as_non_root_user(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    values = dockerfile_args(path)
    stage = final_stage(path)
    keywords = [inst.keyword for inst in stage]

    users = [i for i, inst in enumerate(stage) if inst.keyword == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    runs_at = min(i for i, k in enumerate(keywords) if k in {"CMD", "ENTRYPOINT"})
    assert users[-1] < runs_at, f"{path.name}: USER comes after CMD/ENTRYPOINT"
    user = substitute(stage[users[-1]].args, values).split(":")[0]
    assert user not in {"0", "root"}, f"{path.name}: runs as root"
    assert user == CONTAINER_UID, f"{path.name}: user {user}, expected uid {CONTAINER_UID}"
    # A numeric USER lets Kubernetes verify runAsNonRoot.
    assert user.isdigit()

    useradd = [inst.args for inst in stage if inst.keyword == "RUN" and "useradd" in inst.args]
    assert useradd, f"{path.name}: the user is never created"
    assert "--create-home" in useradd[0]
    assert '--uid "${USER_UID}"' in useradd[0]

    env = env_values(stage, values)
    workdir = [substitute(inst.args, values) for inst in stage if inst.keyword == "WORKDIR"]
    assert env["HOME"] == f"/home/{values['USER_NAME']}", "HOME is the created user's home"
    assert workdir[-1] == env["HOME"]
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_base_images_are_pinned(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    values = dockerfile_args(path)
    instructions = parse_dockerfile(path.read_text())
    stages = {
        inst.args.split()[-1]
        for inst in instructions
        if inst.keyword == "FROM" and " AS " in inst.args.upper()
    }
    froms = [
        substitute(inst.args.split()[0], values) for inst in instructions if inst.keyword == "FROM"
    ]
    assert len(froms) >= 2, f"{path.name}: expected a multi-stage build"
    for image in froms:
        if image in stages:
            continue
        assert "$" not in image, f"{path.name}: unresolved base image {image}"
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name, f"{path.name}: {image} has no tag"
        assert "/" not in tag, f"{path.name}: {image} has no tag"
        assert tag != "latest", f"{path.name}: {image} is not pinned"


def test_cuda_image_builds_detectron2_from_a_pinned_commit() -> None:
    path = DOCKERFILES["cuda"]
    commit = pinned_detectron2_commit()
    assert re.fullmatch(r"[0-9a-f]{40}", commit), f"DETECTRON2_COMMIT {commit!r} is not a full SHA"
    runs = [inst.args for inst in parse_dockerfile(path.read_text()) if inst.keyword == "RUN"]
    fetch = [r for r in runs if "fetch" in r and "${DETECTRON2_COMMIT}" in r]
    assert fetch, "the pinned commit is never fetched"
    assert "rev-parse HEAD" in fetch[0], "the checked-out commit is not verified"
    assert any(
        "pip install" in r and "/tmp/detectron2" in r and "--no-build-isolation" in r for r in runs
    )
    readme = (DOCKER / "README.md").read_text()
    assert commit in readme, "docker/README.md does not say which detectron2 commit is built"


# What detectron2 imports at run time, besides torch: its setup.py requirements that
# detectron2.config, .modeling, .model_zoo and .engine import (Pillow, matplotlib, tqdm,
# tensorboard and packaging come with its own `pip install`).
DETECTRON2_RUNTIME = (
    "fvcore",
    "iopath",
    "pycocotools",
    "omegaconf",
    "hydra-core",
    "yacs",
    "termcolor",
    "tabulate",
    "black",
    "cloudpickle",
)


def pip_requirements(run: str) -> list[Requirement]:
    """The requirements every `pip install` of one RUN instruction names (options and local
    paths left out)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "(", ")"}:
            commands.append([])
        else:
            commands[-1].append(token)
    found = []
    for words in commands:
        starts = [i for i in range(len(words) - 1) if words[i : i + 2] == ["pip", "install"]]
        for word in words[starts[0] + 2 :] if starts else []:
            if not word.startswith(("-", "/", ".")):
                found.append(Requirement(word))
    return found


def builder_runs(path: Path) -> list[str]:
    """The builder stage's RUN instructions, ARG defaults substituted."""
    values = dockerfile_args(path)
    instructions = parse_dockerfile(path.read_text())
    froms = [i for i, inst in enumerate(instructions) if inst.keyword == "FROM"]
    builder = instructions[froms[0] : froms[1]]
    return [substitute(inst.args, values) for inst in builder if inst.keyword == "RUN"]


def test_pip_requirements_reads_names_and_specifiers() -> None:
    run = (
        'FORCE_CUDA=1 pip install --no-build-isolation /tmp/x "setuptools<81" black '
        '&& pip install "ray[data]==2.1" ./pkg && python -c "import a; print(1)"; pip install x'
    )
    assert [str(r) for r in pip_requirements(run)] == [
        "setuptools<81",
        "black",
        "ray[data]==2.1",
        "x",
    ]
    assert pip_requirements("apt-get install -y git") == []


def test_cuda_image_installs_what_detectron2_needs_at_import() -> None:
    """detectron2.model_zoo imports pkg_resources, which setuptools 81+ no longer ships: the
    image installs setuptools<81 and every runtime package before building detectron2, never
    moves setuptools past 80 later, and imports detectron2.model_zoo in its last check."""
    runs = builder_runs(DOCKERFILES["cuda"])
    build = next(i for i, r in enumerate(runs) if "pip install" in r and "/tmp/detectron2" in r)
    before = {canonicalize_name(r.name): r for run in runs[:build] for r in pip_requirements(run)}
    missing = [name for name in ("setuptools", *DETECTRON2_RUNTIME) if name not in before]
    assert not missing, f"Dockerfile.cuda does not install {missing} before detectron2"
    for run in runs:
        for req in pip_requirements(run):
            if canonicalize_name(req.name) == "setuptools":
                assert not req.specifier.contains("81.0"), (
                    f"{req}: setuptools without pkg_resources"
                )
                assert req.specifier.contains("80.10.2"), req
    assert "detectron2.model_zoo" in runs[-1], "the last check does not import detectron2.model_zoo"
    listed = readme_requirements()
    for name in ("setuptools", *DETECTRON2_RUNTIME):
        assert listed.get(name) == before[name].specifier, (
            f"docker/README.md lists {name}{listed.get(name, ' not at all')}; "
            f"Dockerfile.cuda installs {before[name]}"
        )


def readme_requirements() -> dict[str, Any]:
    """name -> specifier of every `requirement` in backticks in docker/README.md."""
    listed = {}
    for text in re.findall(
        r"`([A-Za-z][\w.\-]*(?:[<>=!~][^`]*)?)`", (DOCKER / "README.md").read_text()
    ):
        try:
            req = Requirement(text)
        except ValueError:
            continue
        listed[canonicalize_name(req.name)] = req.specifier
    return listed


def test_cuda_image_ranges_are_detectron2s_own() -> None:
    """Where detectron2 is installed, its metadata requires what the Dockerfile installs."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("detectron2") or []
    except PackageNotFoundError:
        pytest.skip("detectron2 is not installed here")
    wanted = {
        canonicalize_name(r.name): r.specifier
        for r in map(Requirement, declared)
        if r.marker is None or r.marker.evaluate({"extra": ""})  # not the dev/all extras
    }
    runs = builder_runs(DOCKERFILES["cuda"])
    installed = {
        canonicalize_name(r.name): r.specifier for run in runs for r in pip_requirements(run)
    }
    for name in DETECTRON2_RUNTIME:
        assert name in wanted, f"detectron2 no longer requires {name}"
        assert name in installed, f"Dockerfile.cuda does not install {name}"
        assert installed[name] == wanted[name], f"{name}: {installed[name]} != {wanted[name]}"


def test_code_and_image_pin_the_same_detectron2_commit() -> None:
    """The commit the detector backend tells users to install is the one the CUDA image builds."""
    from stages.core.detectors import DETECTRON2_COMMIT

    assert pinned_detectron2_commit() == DETECTRON2_COMMIT


def test_dockerfiles_install_the_same_stack() -> None:
    cpu, cuda = (dockerfile_args(DOCKERFILES[f]) for f in ("cpu", "cuda"))
    for name in (
        "TORCH_VERSION",
        "TORCHVISION_VERSION",
        "RAY_VERSION",
        "PSYCOPG2_VERSION",
        "USER_UID",
    ):
        assert cpu[name] == cuda[name], f"{name}: cpu {cpu[name]} != cuda {cuda[name]}"
    for path in DOCKERFILES.values():
        text = path.read_text()
        assert '"ray[default,data,train]==${RAY_VERSION}"' in text
        assert '"/src[s3]"' in text, f"{path.name}: pseudoflow with its s3 extra"
        assert '"psycopg2-binary==${PSYCOPG2_VERSION}"' in text
    # The manifests' rayVersion is the image's Ray.
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == cuda["RAY_VERSION"], name


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerignore_keeps_local_state_out_of_the_context(flavour: str) -> None:
    ignore = DOCKERFILES[flavour].with_name(f"Dockerfile.{flavour}.dockerignore")
    patterns = {
        line.strip().rstrip("/")
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    required = {
        ".venv",
        "runs",
        ".git",
        "*.egg-info",
        "**/__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
    }
    assert required <= patterns, f"{ignore.name} misses {required - patterns}"
