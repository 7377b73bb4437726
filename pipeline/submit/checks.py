"""Secrets never travel: environment variables passed by reference, and a root, tracking URI or
config value that carries a credential refused before anything is sent, named, never echoed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.redact import has_password, secret_query_names

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig


# An environment name is a secret's when one of its underscore-separated words is one of these.
class SubmitError(RuntimeError):
    """A submission or job query that cannot go on; the message says what to do."""


SECRET_WORDS = frozenset(
    {
        "KEY",
        "KEYS",
        "APIKEY",
        "TOKEN",
        "TOKENS",
        "SECRET",
        "SECRETS",
        "PASSWORD",
        "PASSWORDS",
        "PASSWD",
        "PASSPHRASE",
        "CREDENTIAL",
        "CREDENTIALS",
        "PRIVATE",
        "AUTH",
    }
)


CREDENTIALS_ON_THE_CLUSTER = (
    "credentials reach a job from the cluster nodes' own environment (a Kubernetes Secret, the "
    "launcher's node environment) or an instance role, never from the submitting machine"
)


def parse_env(values: tuple[str, ...], refs: tuple[str, ...]) -> dict[str, str]:
    """Job environment: ``NAME=VALUE`` plain values (never secrets) and ``NAME[=CLUSTER_NAME]``
    references, which the job receives as ``${CLUSTER_NAME}``: Ray expands them on the
    cluster, from the nodes' own environment, so the value never leaves the cluster.

    A plain value is refused when its name looks like a secret's (a word of it is one of
    :data:`SECRET_WORDS`) or the value is a URL with a password or a secret query parameter; the
    error names the variable, never its value."""
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        _check_name(name, item if sep == "" else f"{name}=...")
        if not sep:
            raise SubmitError(f"--env {item!r}: expected NAME=VALUE")
        if looks_secret(name):
            raise SubmitError(
                f"--env {name}=...: {name} looks like a secret; secrets are passed by reference "
                f"(--env-ref {name}), so their values never leave the cluster: "
                f"{CREDENTIALS_ON_THE_CLUSTER}"
            )
        what = _credentials_in(value)
        if what:
            raise SubmitError(
                f"--env {name}=...: the value of {name} {what}; put the whole value in the "
                f"cluster nodes' own environment and pass it by reference (--env-ref {name}): "
                f"{CREDENTIALS_ON_THE_CLUSTER}"
            )
        env[name] = value
    for item in refs:
        name, _, cluster_name = item.partition("=")
        _check_name(name, item)
        _check_name(cluster_name or name, item)
        env[name] = "${" + (cluster_name or name) + "}"
    return env


def looks_secret(name: str) -> bool:
    """Whether an environment name looks like a secret's: ``OPENAI_API_KEY``, ``MY_TOKEN``, but
    not ``KEYBOARD`` or ``AUTHOR`` (whole underscore-separated words only)."""
    return any(word in SECRET_WORDS for word in name.upper().split("_"))


def _credentials_in(value: str) -> str | None:
    """What secret ``value`` carries, in words without the secret, or ``None``."""
    if has_password(value):
        return "is a URL with a password in it (user:password@)"
    names = secret_query_names(value)
    if names:
        return f"is a URL with a secret in its query ({', '.join(sorted(set(names)))})"
    return None


def _check_name(name: str, item: str) -> None:
    if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
        raise SubmitError(f"{item!r}: environment names are upper case, digits and underscores")


def check_root(root: str) -> str:
    """A cluster run's root must name the same place on every node: a URL or an absolute path,
    without credentials in it."""
    what = _credentials_in(root)
    if what:
        raise SubmitError(
            f"--root {what}: give the storage URL only (s3://bucket/prefix); "
            f"{CREDENTIALS_ON_THE_CLUSTER} (for S3: --env-ref AWS_ACCESS_KEY_ID --env-ref "
            "AWS_SECRET_ACCESS_KEY, or the nodes' instance role)"
        )
    if "://" in root or Path(root).is_absolute():
        return root
    raise SubmitError(
        f"--root {root!r} is a relative path, which would mean a folder inside the job's "
        "temporary working directory: give shared storage (s3://bucket/prefix) or an absolute "
        "path every node sees"
    )


def check_tracking_uri(uri: str | None) -> str:
    """The MLflow server a cluster run logs to: its URL only, never credentials (the cluster
    nodes hold ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` themselves)."""
    if not uri:
        raise SubmitError(
            "a cluster run logs to an MLflow server: pass --tracking-uri http://HOST:5000 or set "
            "MLFLOW_TRACKING_URI (README, 'Cluster')"
        )
    what = _credentials_in(uri)
    if what:
        kind = "carries a password" if has_password(uri) else "carries a secret"
        raise SubmitError(
            f"the tracking URI {kind}: it {what}. Give the server's URL only "
            "(http://HOST:5000); MLflow credentials go in MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD in the cluster nodes' own environment, passed by reference "
            "(--env-ref MLFLOW_TRACKING_USERNAME --env-ref MLFLOW_TRACKING_PASSWORD)"
        )
    return uri


def check_config(config: PipelineConfig) -> PipelineConfig:
    """The resolved config is shipped as a file: none of its values may carry credentials."""
    problems = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, list):
            for index, child in enumerate(value):
                walk(f"{prefix}.{index}", child)
        elif isinstance(value, str) and (what := _credentials_in(value)):
            problems.append(f"{prefix} {what}")

    walk("", config.model_dump(mode="json"))
    if problems:
        raise SubmitError(
            f"the config is shipped to the cluster and {'; '.join(problems)}: give URLs "
            f"without credentials; {CREDENTIALS_ON_THE_CLUSTER}"
        )
    return config
