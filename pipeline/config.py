"""Loading a run's YAML into the frozen :class:`PipelineConfig`.

Unknown keys and wrong types are all reported together, each with its dotted path; ``--set
section.key=value`` overrides are applied before validation; built-in configs are addressable by
name (``quickstart``, ``smoke``, ``voc``, ``cityscapes``, the ``gpu`` overlay) or any YAML by
path, and layered left to right: ``voc,gpu``.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipeline.redact import redact, redact_values
from stages.core import errors
from stages.core.config import StrictModel
from stages.detect.config import DetectConfig
from stages.evaluate.config import EvaluateConfig
from stages.ingest.config import DataConfig
from stages.pseudolabel.config import GROUND_TRUTH, PseudolabelConfig
from stages.segtrain import SegTrainConfig, StudentConfig
from stages.teach.config import TeachConfig
from stages.train_detector.config import DetectorConfig


class RuntimeConfig(StrictModel):
    """Where and how things run (execution only: never changes a result's identity)."""

    use_gpu: bool = False
    torch_threads: int | None = Field(None, ge=1, description="default: the machine's cores")
    ray_num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray")


class TrackingConfig(StrictModel):
    uri: str | None = Field(None, description="default: sqlite:///<root>/mlflow.db")
    experiment: str = "pseudoflow"
    log_models: bool = Field(
        True,
        description="save each trained teacher and student as an MLflow pytorch model (pt2: "
        "no pickle) in its cache entry, logged as the 'model' artifact of every run using it",
    )


# The reference rows every sweep has unless told otherwise (``sweep.references``): the student
# without its unlabeled loss, and the student with the unlabeled ground truth as plain labels (no
# photometric change, no CutMix: supervised training on every image, where the source has masks).
DEFAULT_REFERENCES: dict[str, dict[str, Any]] = {
    "supervised": {"student.alpha": 0.0},
    "full": {
        "pseudolabel.policy": "ground_truth",
        "student.cutmix": 0.0,
        "student.strong.jitter_chance": 0.0,
        "student.strong.grayscale": 0.0,
        "student.strong.blur": 0.0,
    },
}


class SweepConfig(StrictModel):
    """What ``pseudoflow sweep`` runs: the cross product of ``grid`` over ``seeds`` seeds, plus the
    reference rows once per seed. Read by the sweep command only: no stage's key holds it."""

    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="dotted config key -> the values to try (the sweep runs the cross product); "
        "--grid KEY=V1,V2 adds or replaces an axis",
    )
    seeds: int = Field(
        1, ge=1, le=20, description="runs per grid point, with seed, seed + 1, ... (--seeds)"
    )
    parallel: int = Field(
        1,
        ge=1,
        le=64,
        description="pipeline runs at once (--parallel): each seed's first run alone, then the "
        "rest as they become free of one another; runtime.torch_threads, where unset, is then "
        "this machine's cores / parallel (at least 1)",
    )
    references: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_REFERENCES.items()},
        description="row name -> overrides of a reference row run once per seed; 'supervised' and "
        "'full' give each row its gap-closing g (a ground_truth row is left out, with a warning, "
        "where the unlabeled images have no masks)",
    )


class PipelineConfig(StrictModel):
    """One pipeline run: data, every stage, runtime and tracking."""

    name: str = Field("pseudoflow", description="the run's name: pipeline run ids start with it")
    seed: int = Field(0, description="every random draw: data generation, weights, augmentation")
    data: DataConfig = DataConfig()
    teacher: SegTrainConfig = SegTrainConfig()
    detector: DetectorConfig = DetectorConfig()
    detect: DetectConfig = DetectConfig()
    teach: TeachConfig = TeachConfig()
    pseudolabel: PseudolabelConfig = PseudolabelConfig()
    student: StudentConfig = StudentConfig()
    rounds: int = Field(
        1,
        ge=1,
        le=5,
        description="teach -> pseudolabel -> train_student rounds; the last student "
        "teaches the next round",
    )
    evaluate: EvaluateConfig = EvaluateConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        wpl, classes = self.pseudolabel.wpl, self.data.num_classes
        if self.pseudolabel.policy == "wpl" and not self.detector.enabled:
            raise ValueError(
                "pseudolabel.policy 'wpl' needs detections: set detector.enabled: true"
            )
        if self.rounds > 1 and self.student.weights:
            raise ValueError(
                f"rounds: {self.rounds} trains a student per round; student.weights skips training"
            )
        bad = {k: v for k, v in (wpl.class_map or {}).items() if not 0 <= v < classes}
        if bad:
            raise ValueError(
                f"pseudolabel.wpl.class_map {bad}: segmentation classes must be in [0, {classes})"
            )
        return self


class ConfigError(errors.ConfigError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def builtin_configs() -> list[str]:
    folder = resources.files("pipeline") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The raw mapping of a built-in config name or a YAML path, and where it came from."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError([f"config file {name_or_path!r} does not exist"])
        text, origin = path.read_text(), str(path)
    elif name_or_path in builtin_configs():
        text = (resources.files("pipeline") / "configs" / f"{name_or_path}.yaml").read_text()
        origin = f"builtin:{name_or_path}"
    else:
        valid = ", ".join(builtin_configs())
        raise ConfigError([f"unknown config {name_or_path!r}: give a YAML path or one of {valid}"])
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{origin}: not valid YAML: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError([f"{origin}: the top level must be a mapping"])
    return raw, origin


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars) to a copy of ``raw``."""
    result: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw)) or {}
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        *parents, leaf = key.strip().split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"override {item!r}: {part!r} is not a section")
                break
            node = child
        else:
            node[leaf] = yaml.safe_load(value)
    if problems:
        raise ConfigError(problems)
    return result


def merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` over ``base``: sections merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in layer.items():
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            out[key] = merge(below, value)
        else:
            out[key] = value
    return out


def read_layers(names: str) -> dict[str, Any]:
    """``voc,gpu``: each comma-separated built-in name or YAML path read and merged over the
    ones before it (a base config, then overlays such as ``gpu``)."""
    parts = [part.strip() for part in names.split(",")]
    if not all(parts):
        raise ConfigError([f"config {names!r}: an empty name between commas"])
    raw: dict[str, Any] = {}
    for part in parts:
        raw = merge(raw, read_yaml(part)[0])
    return raw


def load_config(name_or_path: str, overrides: list[str] | None = None) -> PipelineConfig:
    """Read (and layer: :func:`read_layers`), override and validate a config; raise
    :class:`ConfigError` listing every problem."""
    return validate(apply_overrides(read_layers(name_or_path), overrides or []))


def validate(raw: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(error) for error in exc.errors()]) from exc


def _describe(error: Any) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "<top level>"
    if error["type"] == "extra_forbidden":
        valid = _fields_at(PipelineConfig, error["loc"][:-1])
        return f"{path}: unknown key; valid keys here: {', '.join(valid)}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return f"{path}: {message}"
    return f"{path}: {message} (got {error.get('input')!r})"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a dumped config (a dict is a section, but for the keys
    of :func:`_mapping_keys`, such as ``sweep.grid``: that is one leaf)."""
    if isinstance(value, dict) and prefix not in _mapping_keys():
        for key, child in value.items():
            yield from _leaves(child, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


@functools.cache
def _mapping_keys() -> frozenset[str]:
    """The dotted keys whose values are mappings of lists or mappings (``sweep.grid``,
    ``sweep.references``): one leaf each. A mapping of scalars (``teach.resources``) is walked
    like a section: one leaf per entry, none when empty."""
    nested = ("dict[str, list", "dict[str, dict")
    return frozenset(row.key for row in reference() if row.type.startswith(nested))


def flatten(config: PipelineConfig) -> dict[str, str]:
    """Dotted key -> string value of every leaf, credentials redacted (a URL's
    ``user:password@``, ``?token=...``: see :mod:`pipeline.redact`)."""
    return {k: redact(str(v)) for k, v in _leaves(config.model_dump(mode="json"))}


def run_params(config: PipelineConfig) -> dict[str, str]:
    """The MLflow params of a run: the keys that are set and used, as flat scalars. Left out:
    unset keys (None), the data sources and policy options the run does not use, the detector's
    sections but ``detector.enabled`` when it is disabled; lists are comma-joined."""
    unused = [f"data.{s}." for s in ("generated", "voc", "cityscapes") if s != config.data.source]
    unused += [
        f"pseudolabel.{p}." for p in ("s4mc", "csl", "wpl") if p != config.pseudolabel.policy
    ]
    if not config.detector.enabled:
        unused += ["detector.", "detect."]
    if config.pseudolabel.policy == GROUND_TRUTH:
        unused.append("pseudolabel.tau")  # the masks are the labels: no threshold applies
    unused.append("sweep.")  # the sweep's own run logs it
    return {
        key: redact(",".join(map(str, value)) if isinstance(value, list) else str(value))
        for key, value in _leaves(config.model_dump(mode="json"))
        if value is not None and (key == "detector.enabled" or not key.startswith(tuple(unused)))
    }


def to_yaml(config: PipelineConfig) -> str:
    """The config as YAML to show or store (MLflow artifact, files under the root, checkpoints):
    credentials redacted. A run uses the config object itself, never this text."""
    return yaml.safe_dump(redact_values(config.model_dump(mode="json")), sort_keys=False)


# ------------------------------------------------------------------------- the reference
@dataclass(frozen=True)
class Setting:
    """One config key as the reference lists it."""

    key: str
    type: str
    default: str
    description: str


def reference(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[Setting]:
    """Every key of ``model`` (sections walked in order), from the pydantic models themselves:
    the dotted key, its type with bounds, its default and its description."""
    rows: list[Setting] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += reference(annotation, f"{key}.")
            continue
        bounds = [_bound(m) for m in field.metadata if _bound(m)]
        rows.append(
            Setting(
                key,
                _type_name(annotation) + (f" ({', '.join(bounds)})" if bounds else ""),
                _show(field.get_default(call_default_factory=True)),
                " ".join((field.description or "").split()),
            )
        )
    return rows


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:  # a bounded member of a union: int (>= 1) | 'auto'
        bounds = [_bound(m) for m in args[1:] for m in getattr(m, "metadata", [m]) if _bound(m)]
        return _type_name(args[0]) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    return str(getattr(annotation, "__name__", annotation))


def _bound(meta: Any) -> str:
    for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        value = getattr(meta, attr, None)
        if value is not None:
            return f"{sign} {value}"
    return ""


def _show(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def reference_markdown() -> str:
    """The config reference as Markdown (docs/config.md is this text; a test keeps it so)."""
    lines = [
        "# Configuration reference",
        "",
        "Every key of a run's config, generated from the pydantic models by",
        "`pseudoflow config show --defaults` (a test fails when this file differs from it).",
        "Set a key in the YAML or with `--set section.key=value`.",
        "",
    ]
    section = None
    for row in reference():
        head = row.key.split(".")[0] if "." in row.key else "(top level)"
        if head != section:
            section = head
            lines += ["", f"## {head}", "", "| key | type | default | description |"]
            lines.append("|---|---|---|---|")
        default = row.default.replace("|", "\\|")
        lines.append(f"| `{row.key}` | {row.type} | `{default}` | {row.description} |")
    return "\n".join(lines) + "\n"
