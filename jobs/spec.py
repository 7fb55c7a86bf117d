"""The job spec: typed sections, YAML loading with errors that name the key, `--set` overrides.

A spec is plain data (it travels to Ray actors as a dict). Every key has a default, so an
empty spec is the embedded default job: SmolLM2, generated passkey data, local Ray, the local
MLflow store.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """A spec problem, always naming the offending key."""


@dataclass
class PolicySpec:
    name: str = "full"
    ratio: float | None = None  # keep this fraction of each prompt's tokens ...
    tokens: int | None = None  # ... or this many tokens per head
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationSpec:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # extra stop strings (single tokens); EOS always stops
    prefill_chunk_tokens: int | None = None  # None: one-shot prefill (the papers' setting)


@dataclass
class GenerateDataSpec:
    """Data the job makes for itself when the input file is absent."""

    task: str = "passkey"
    context_length: int = 1024
    samples: int = 8
    seed: int = 0
    haystack: str = "repeat"


@dataclass
class InputSpec:
    path: str = "data/passkey-1k.parquet"
    prompt_mode: str = "question_last"  # or context_only: compress the context, then append the question
    chat_template: bool = True
    limit: int | None = None  # take only the first N rows
    generate: GenerateDataSpec | None = field(default_factory=GenerateDataSpec)


@dataclass
class OutputSpec:
    path: str = "out/passkey"
    mode: str = "overwrite"  # overwrite | error | resume (keep the rows present, process the missing ones)


@dataclass
class TrackingSpec:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "kvpipe"
    run_name: str | None = None
    timeout_s: float = 10.0  # per tracking call; a slow or dead server never sinks the job


@dataclass
class ClusterSpec:
    address: str | None = None  # None: $RAY_ADDRESS, else an embedded local Ray
    replicas: int | str = 1  # or "auto": one per GPU (per tensor_parallel GPUs) of the cluster
    cpus_per_replica: float = 0.5  # fractional: the read and write tasks need CPU too
    gpus_per_replica: float | None = None  # None: 1 per replica (x tensor_parallel) when GPUs exist
    resources_per_replica: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    placement: str = "default"  # default (Ray Data decides) | spread (replicas over nodes)
    batch_size: int = 4  # rows per generate() call (fixed batching, and always on CPU)
    batch_planner: str = "memory"  # memory: size GPU batches from free memory | fixed: batch_size
    max_batch_size: int = 64  # the memory planner's cap on rows per generate() call
    max_batch_tokens: int | None = None  # the memory planner's cap on rows x tokens per call
    memory_fraction: float = 0.9  # share of the free device memory the planner may plan for
    rows_per_task: int = 16  # rows per Ray Data batch handed to a replica


@dataclass
class JobSpec:
    model: str = "smollm2"
    engine: str = "hf"  # hf | deepspeed
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto | cpu | cuda
    tensor_parallel: int = 1
    policy: PolicySpec = field(default_factory=PolicySpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "engine": {"hf", "deepspeed"},
    "dtype": {"auto", "float32", "bfloat16", "float16"},
    "device": {"auto", "cpu", "cuda"},
    "input.prompt_mode": {"question_last", "context_only"},
    "output.mode": {"overwrite", "error", "resume"},
    "cluster.placement": {"default", "spread"},
    "cluster.batch_planner": {"memory", "fixed"},
}
POSITIVE = {
    "tensor_parallel",
    "generation.max_new_tokens",
    "cluster.replicas",
    "cluster.batch_size",
    "cluster.rows_per_task",
    "cluster.max_batch_size",
    "cluster.max_batch_tokens",
    "generation.prefill_chunk_tokens",
    "policy.tokens",
    "input.generate.context_length",
    "input.generate.samples",
    "input.limit",
}


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Coerce or reject `value` for a field annotated `annotation`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except SpecError as exc:
                errors.append(str(exc))
        raise SpecError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise SpecError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(annotation, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise SpecError(f"{key}: expected a string, got {value!r}")
        return value
    raise SpecError(f"{key}: unsupported type {annotation}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"unknown key {prefix}{unknown[0]!s}; expected one of: {', '.join(sorted(names))}")
    values = {}
    for name, value in data.items():
        key = prefix + name
        values[name] = _check_type(value, hints[name], key)
        if key in CHOICES and values[name] not in CHOICES[key]:
            raise SpecError(f"{key}: {value!r} is not one of {sorted(CHOICES[key])}")
        number = isinstance(values[name], (int, float)) and not isinstance(values[name], bool)
        if key in POSITIVE and number and values[name] < 1:
            raise SpecError(f"{key}: must be >= 1, got {value!r}")
    return cls(**values)


def _validate(spec: JobSpec) -> JobSpec:
    from policies import policy_names  # noqa: PLC0415  (policies import torch; keep spec light)

    base_names = spec.policy.name.split("+")
    for part in base_names:
        if part not in policy_names():
            raise SpecError(f"policy.name: unknown policy {part!r}; known: {', '.join(policy_names())}")
    if spec.policy.ratio is not None and not 0.0 < spec.policy.ratio <= 1.0:
        raise SpecError(f"policy.ratio: must be in (0, 1], got {spec.policy.ratio}")
    if spec.policy.ratio is not None and spec.policy.tokens is not None:
        raise SpecError("policy.ratio and policy.tokens: give one budget, not both")
    compresses = spec.policy.name != "full"
    if compresses and spec.policy.ratio is None and spec.policy.tokens is None:
        raise SpecError(f"policy.ratio: policy {spec.policy.name!r} needs a budget (ratio or tokens)")
    if spec.generation.temperature <= 0:
        raise SpecError("generation.temperature: must be > 0")
    if not 0 < spec.generation.top_p <= 1:
        raise SpecError("generation.top_p: must be in (0, 1]")
    _validate_cluster(spec)
    return spec


def _validate_cluster(spec: JobSpec) -> None:
    c = spec.cluster
    if isinstance(c.replicas, str) and c.replicas != "auto":
        raise SpecError(f"cluster.replicas: expected an integer >= 1 or 'auto', got {c.replicas!r}")
    if c.cpus_per_replica < 0:
        raise SpecError(f"cluster.cpus_per_replica: must be >= 0, got {c.cpus_per_replica}")
    if c.gpus_per_replica is not None and c.gpus_per_replica < 0:
        raise SpecError(f"cluster.gpus_per_replica: must be >= 0, got {c.gpus_per_replica}")
    for name, amount in c.resources_per_replica.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise SpecError(f"cluster.resources_per_replica.{name}: expected a number >= 0, got {amount!r}")
        if name in ("CPU", "GPU"):
            raise SpecError(
                f"cluster.resources_per_replica.{name}: use cluster.cpus_per_replica / gpus_per_replica"
            )
    if not 0 < c.memory_fraction <= 1:
        raise SpecError(f"cluster.memory_fraction: must be in (0, 1], got {c.memory_fraction}")
    if spec.tensor_parallel > 1 and spec.engine != "deepspeed":
        raise SpecError("tensor_parallel: tensor_parallel > 1 needs engine: deepspeed")


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Apply one `--set a.b.c=value` to a nested dict."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SpecError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def read_mapping(path: str | Path | None, overrides: list[str] | None, what: str = "spec") -> dict:
    """A YAML mapping (empty without a path) with `key=value` overrides applied."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{path}: the {what} must be a mapping of keys")
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return data


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML spec (or the defaults), apply `key=value` overrides, validate."""
    return spec_from_dict(read_mapping(path, overrides))


def spec_from_dict(data: dict) -> JobSpec:
    return _validate(_build(JobSpec, data))


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
