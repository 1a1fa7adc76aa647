"""One config tree for every stage: frozen dataclasses, YAML + dotted ``key=value`` overrides.

Validation collects every problem and raises once (:class:`ConfigError`); each message names
the field, the bad value and the fix. This module imports no torch and no ray, so that the
driver, tests and tools can validate a config in milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UserError

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "config_hash",
    "apply_overrides",
    "DEFAULT_CONFIG_PATH",
]

DEFAULT_CONFIG_PATH = Path(__file__).parent / "configs" / "quickstart.yaml"


class ConfigError(UserError):
    """A config that cannot run. ``problems`` lists one readable line per bad field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


# --------------------------------------------------------------------------------------------
# The tree. Field names are the public vocabulary (pool, row_id, budget, selector, score).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolConfig:
    """Where the unlabeled prompts come from and how their fields map."""

    path: str = "builtin:tasks"  # builtin:tasks, builtin:pydocs, file, glob, folder or s3:// prefix
    format: str = "auto"  # auto | jsonl | json | parquet
    size: int = 2000  # rows generated for builtin:tasks (ignored for files)
    seed: int = 0  # seed of the builtin generators
    prompt_field: str = "instruction"
    input_field: str | None = "input"  # optional; joined to the prompt with a blank line
    response_field: str = "output"  # the annotation oracle; selection never reads it
    task_field: str | None = "task"
    id_field: str | None = None  # None: row_id is a stable hash of the content
    max_prompt_chars: int = 4000
    max_bad_fraction: float = 0.5
    eval_path: str | None = None  # held-out split; builtin pools bring their own
    eval_size: int = 280  # rows of the builtin balanced eval split
    eval_fraction: float = 0.0  # hold out this fraction of a file pool when eval_path is unset
    rows_per_shard: int = 50_000  # rows per Parquet part of pool.parquet


@dataclass(frozen=True)
class ScoringConfig:
    """The base model's uncertainty on its own response, plus prompt embeddings."""

    model: str = "builtin:smollm2-135m"  # hub id, local folder, s3:// prefix or builtin:*
    max_new_tokens: int = 24
    max_prompt_tokens: int = 256
    batch_size: int = 16
    embedding_layer: int = -1  # hidden-state layer mean-pooled into `embedding`
    encoder: str | None = None  # e.g. builtin:minilm for a second column `embedding_encoder`
    # auto: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16 / AMX / Arm BF16), else fp32; the
    # uncertainty math is fp32 whatever the model runs in | float32 | bfloat16 | float16
    dtype: str = "auto"
    num_actors: int = 1  # max actors of the scoring pool (one per GPU on clusters)
    min_actors: int = 1
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.5  # fractional on CPU-only clusters (a whole CPU can deadlock reads)
    max_retries: int = 2  # retries of a failing batch before its rows are quarantined
    # auto: static on GPU, dynamic on CPU. static = a preallocated KV cache with fixed shapes (prompt width
    # rounded up to a multiple of 64, micro-batch padded to batch_size), which transformers compiles on
    # CUDA; dynamic = plain generate.
    generation: str = "auto"


@dataclass(frozen=True)
class SelectionConfig:
    """Which selector picks `budget` prompts from the scored pool."""

    name: str = "facility_location"
    budget: int = 100
    seed: int = 0
    embedding: str = "embedding"  # embedding | embedding_encoder
    params: Mapping[str, Any] = field(default_factory=dict)  # selector hyperparameters
    mode: str = "auto"  # auto | local | distributed
    shards: int = 4  # m in RandGreeDi / two-round k-center
    local_max_rows: int = 200_000  # auto: in-process below this many rows
    allow_budget_over_pool: bool = False  # True: cap budget at the pool size instead of failing
    cpus_per_task: float = 0.25  # Ray CPUs of each distributed selection task (fractional: no deadlock in Tune)


@dataclass(frozen=True)
class AnnotationConfig:
    """How selected prompts get their responses."""

    mode: str = "oracle"  # oracle (pool's response column) | export | import
    annotations_path: str | None = None  # JSONL of {row_id, response} for mode=import


@dataclass(frozen=True)
class TrainingConfig:
    """LoRA (or full) SFT on Ray Train with DeepSpeed or DDP."""

    model: str | None = None  # None: the scoring model
    backend: str = "deepspeed"  # deepspeed | ddp
    zero_stage: int = 2
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: Mapping[str, float] = field(default_factory=lambda: {"CPU": 1})
    max_seq_len: int = 256
    packing: bool = False
    micro_batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 3.0
    max_steps: int | None = None  # set: overrides epochs
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant
    grad_clip: float = 1.0
    # auto: bf16 (bf16 base weights, fp32 LoRA/optimizer, autocast) on GPU and on CPUs with native bf16,
    # else fp32 | bf16 | fp32
    precision: str = "auto"
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Any = "all-linear"
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: only at the end
    storage_path: str | None = None  # None: <output.dir>/train
    max_failures: int = 1
    merge_weights: bool = False
    log_every: int = 10
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    run_name: str | None = None  # Ray Train run name; None: derived from the training config + data
    checkpoints_to_keep: int | None = 2  # newest checkpoints kept in storage; None keeps all


@dataclass(frozen=True)
class EvaluationConfig:
    """Held-out loss and generation metrics for the base and finetuned models."""

    max_new_tokens: int = 24
    batch_size: int = 16
    max_examples: int | None = None
    base_model: bool = True  # also evaluate the base model
    generate: bool = True  # exact match / ROUGE-L need generation; loss does not
    num_actors: int = 1
    mode: str = "auto"  # auto | local | distributed (Ray Data actors)
    local_max_rows: int = 300  # auto: evaluate in-process up to this many rows
    cpus_per_actor: float = 0.5  # fractional on CPU-only clusters (a whole CPU can deadlock reads)
    num_gpus_per_actor: float = 0.0
    dtype: str = "auto"  # as scoring.dtype: auto (bf16 where native) | float32 | bfloat16 | float16


@dataclass(frozen=True)
class SweepConfig:
    """Tune grid over selector x budget x seed."""

    enabled: bool = False  # `edsft run`: sweep + report instead of a single select/train/evaluate
    selectors: tuple = ("random", "facility_location", "uncertainty")
    budgets: tuple = (50, 200)
    seeds: tuple = (0,)
    params: Mapping[str, Any] = field(default_factory=dict)  # selector -> {param: value or [grid]}
    metric: str = "exact_match"
    max_concurrent_trials: int | None = None  # None: from the cluster's CPUs/GPUs
    cpus_per_trial: float = 0.001  # the trial itself only drives its TorchTrainer
    max_failures: int = 0  # retries of a failing trial inside one sweep (re-running the sweep resumes errored ones)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local cluster; "auto": join the running one
    num_cpus: int | None = None  # local cluster only
    object_store_memory: int | None = None


@dataclass(frozen=True)
class StorageConfig:
    """Object store settings; credentials come only from the environment."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:5000 for a local S3-compatible server
    region: str | None = None


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/quickstart"  # local folder or s3:// prefix
    report_to: tuple = ()  # any of: mlflow, tensorboard
    mlflow_tracking_uri: str | None = None  # None: a file store under the run dir
    progress: bool = True


@dataclass(frozen=True)
class Config:
    pool: PoolConfig = field(default_factory=PoolConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted overrides applied and validated: ``cfg.replace(**{"selection.budget": 5})``."""
        data = config_to_dict(self)
        for key, value in dotted.items():
            _set_dotted(data, key, value)
        return config_from_dict(data)

    @property
    def training_model(self) -> str:
        return self.training.model or self.scoring.model


# --------------------------------------------------------------------------------------------
# Allowed values; a single table keeps messages and checks in step.
# --------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple] = {
    "pool.format": ("auto", "jsonl", "json", "parquet"),
    "scoring.dtype": ("auto", "float32", "bfloat16", "float16"),
    "evaluation.dtype": ("auto", "float32", "bfloat16", "float16"),
    "scoring.generation": ("auto", "dynamic", "static"),
    "selection.mode": ("auto", "local", "distributed"),
    "selection.embedding": ("embedding", "embedding_encoder"),
    "annotation.mode": ("oracle", "export", "import"),
    "training.backend": ("deepspeed", "ddp"),
    "training.schedule": ("cosine", "linear", "constant"),
    "evaluation.mode": ("auto", "local", "distributed"),
    "training.precision": ("auto", "bf16", "fp32"),
}
_AT_LEAST: dict[str, float] = {
    "pool.size": 1,
    "pool.max_prompt_chars": 1,
    "pool.eval_size": 0,
    "pool.rows_per_shard": 1,
    "scoring.max_new_tokens": 1,
    "scoring.max_prompt_tokens": 1,
    "scoring.batch_size": 1,
    "scoring.num_actors": 1,
    "scoring.min_actors": 1,
    "scoring.num_gpus_per_actor": 0,
    "scoring.cpus_per_actor": 0,
    "scoring.max_retries": 0,
    "selection.budget": 1,
    "selection.shards": 1,
    "selection.local_max_rows": 1,
    "selection.cpus_per_task": 0,
    "training.zero_stage": 0,
    "training.num_workers": 1,
    "training.max_seq_len": 8,
    "training.micro_batch_size": 1,
    "training.grad_accum": 1,
    "training.epochs": 0,
    "training.lr": 0,
    "training.weight_decay": 0,
    "training.warmup_ratio": 0,
    "training.grad_clip": 0,
    "training.lora_r": 1,
    "training.lora_alpha": 1,
    "training.lora_dropout": 0,
    "training.checkpoint_every": 0,
    "training.max_failures": -1,
    "training.log_every": 1,
    "evaluation.max_new_tokens": 1,
    "evaluation.batch_size": 1,
    "evaluation.num_actors": 1,
    "evaluation.local_max_rows": 0,
    "evaluation.cpus_per_actor": 0,
    "evaluation.num_gpus_per_actor": 0,
    "sweep.cpus_per_trial": 0,
    "sweep.max_failures": 0,
}
_AT_MOST: dict[str, float] = {
    "pool.max_bad_fraction": 1,
    "pool.eval_fraction": 0.9,
    "training.zero_stage": 3,
    "training.warmup_ratio": 1,
    "training.lora_dropout": 1,
}


def _section_types() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _parse_scalar(text: str) -> Any:
    """`key=value` values are YAML: 5 -> int, 1e-4 -> float, [a, b] -> list, null -> None."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and text.strip().lower() in ("1e-4", "1e-5", "2e-4"):  # YAML 1.1 quirk
        return float(text)
    if isinstance(value, str):
        try:
            return float(text)
        except ValueError:
            return value
    return value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML)."""
    data = json.loads(json.dumps(data, default=list))  # deep copy with tuples as lists
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not key=value: write e.g. selection.budget=200")
            continue
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key or "." not in key:
            problems.append(f"override key {key!r} needs a section: write e.g. selection.budget={raw}")
            continue
        _set_dotted(data, key, _parse_scalar(raw))
    if problems:
        raise ConfigError(problems)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (default: the embedded quickstart), apply overrides, validate, return a Config."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    if not path.exists():
        raise ConfigError([f"config file {str(path)!r} does not exist: pass an existing YAML file"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {str(path)!r} is not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}"])
    return config_from_dict(apply_overrides(data, list(overrides)))


def _coerce(value: Any, tp: Any, name: str, problems: list[str]) -> Any:
    """Coerce YAML values to the annotated field type, recording a problem when impossible."""
    if isinstance(tp, str):
        tp = eval(tp, {**globals(), **vars(typing)})  # annotations are strings (PEP 563)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args
    if optional:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else Any
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{name}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            problems.append(f"{name}={value!r} must be an integer")
            return value
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name}={value!r} must be a number")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{name}={value!r} must be a string")
        return value
    if tp is tuple or origin is tuple:
        if value is None:
            return ()
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{name}={value!r} must be a list")
            return value
        return tuple(value)
    if origin in (Mapping, dict) or tp in (dict,) or origin is typing.Mapping or str(origin) == "collections.abc.Mapping":
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{name}={value!r} must be a mapping")
            return value
        return dict(value)
    return value


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from nested mappings; raises ConfigError listing every problem."""
    problems: list[str] = []
    sections = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"config must be a mapping of sections, got {type(data).__name__}"])
    section_types = {f.name: f for f in dataclasses.fields(Config)}
    for key in data:
        if key not in section_types:
            problems.append(_unknown(key, list(section_types), "section"))
    for sname, sfield in section_types.items():
        cls = sfield.default_factory().__class__
        raw = data.get(sname) or {}
        if not isinstance(raw, Mapping):
            problems.append(f"{sname}={raw!r} must be a mapping of keys")
            raw = {}
        kwargs = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in raw.items():
            if k not in fields:
                problems.append(_unknown(f"{sname}.{k}", [f"{sname}.{n}" for n in fields], "key"))
                continue
            before = len(problems)
            value = _coerce(v, fields[k].type, f"{sname}.{k}", problems)
            if len(problems) == before:  # a badly typed value keeps its default so checks below still run
                kwargs[k] = value
        sections[sname] = cls(**kwargs)
    cfg = Config(**{k: v for k, v in sections.items()})
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _unknown(name: str, valid: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid {what}s: {', '.join(sorted(valid))}"
    return f"unknown {what} {name!r}: {hint}"


def validate(cfg: Config) -> list[str]:
    """Every problem with a structurally sound config, one line each (empty when valid)."""
    problems: list[str] = []
    flat = _flatten(config_to_dict(cfg))
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            problems.append(f"{key}={flat[key]!r} is not one of {list(choices)}: pick one of them")
    for key, lo in _AT_LEAST.items():
        v = flat[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < lo:
            problems.append(f"{key}={v!r} must be >= {lo:g}")
    for key, hi in _AT_MOST.items():
        v = flat[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > hi:
            problems.append(f"{key}={v!r} must be <= {hi:g}")
    if cfg.scoring.min_actors > cfg.scoring.num_actors:
        problems.append(
            f"scoring.min_actors={cfg.scoring.min_actors} must be <= scoring.num_actors={cfg.scoring.num_actors}"
        )
    if cfg.training.max_steps is not None and cfg.training.max_steps < 1:
        problems.append(f"training.max_steps={cfg.training.max_steps} must be >= 1, or null to train by epochs")
    if cfg.training.max_steps is None and cfg.training.epochs <= 0:
        problems.append(f"training.epochs={cfg.training.epochs} must be > 0 when training.max_steps is null")
    if not cfg.pool.path:
        problems.append("pool.path='' is empty: point it at a file, folder, s3:// prefix or builtin:tasks")
    if cfg.pool.path.startswith("builtin:") and cfg.pool.path not in ("builtin:tasks", "builtin:pydocs"):
        problems.append(f"pool.path={cfg.pool.path!r} is not a built-in pool: use builtin:tasks or builtin:pydocs")
    if cfg.annotation.mode == "import" and not cfg.annotation.annotations_path:
        problems.append("annotation.mode='import' needs annotation.annotations_path: the JSONL of {row_id, response}")
    for name in cfg.output.report_to:
        if name not in ("mlflow", "tensorboard"):
            problems.append(f"output.report_to contains {name!r}: allowed are 'mlflow' and 'tensorboard'")
    if not cfg.sweep.budgets:
        problems.append("sweep.budgets=[] is empty: give at least one budget, e.g. [50, 200]")
    for b in cfg.sweep.budgets:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            problems.append(f"sweep.budgets contains {b!r}: every budget must be an integer >= 1")
    if not cfg.sweep.seeds:
        problems.append("sweep.seeds=[] is empty: give at least one seed, e.g. [0]")
    if cfg.sweep.max_concurrent_trials is not None and cfg.sweep.max_concurrent_trials < 1:
        problems.append(f"sweep.max_concurrent_trials={cfg.sweep.max_concurrent_trials} must be >= 1 or null")
    for key in ("selection.name",):
        if not flat[key]:
            problems.append(f"{key} is empty: name a selector, e.g. facility_location")
    if cfg.training.backend == "ddp" and cfg.training.zero_stage not in (0, 2):
        pass  # zero_stage is ignored by ddp; keeping the field lets one config switch backends
    if not isinstance(cfg.training.resources_per_worker, Mapping) or not all(
        isinstance(v, (int, float)) and v >= 0 for v in cfg.training.resources_per_worker.values()
    ):
        problems.append(
            f"training.resources_per_worker={dict(cfg.training.resources_per_worker)!r} must map resource names to numbers >= 0"
        )
    return problems


# --------------------------------------------------------------------------------------------
# Serialisation and hashing
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) - YAML/JSON friendly."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not prefix:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(cfg: Config | Mapping, sections: tuple[str, ...] | None = None, extra: Any = None) -> str:
    """A short stable hash of (parts of) the config; stages use it to skip recomputation."""
    data = config_to_dict(cfg) if not isinstance(cfg, Mapping) else dict(cfg)
    if sections is not None:
        data = {s: data[s] for s in sections}
    blob = json.dumps({"cfg": data, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
