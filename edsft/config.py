"""One config tree for every stage: frozen dataclasses, YAML + dotted ``key=value`` overrides.

Each field carries its own rule. The annotation is the type (``Literal[...]`` lists the allowed
values, ``int | None`` allows null, ``tuple[int, ...]`` a list of integers); ``rule(...)`` puts
bounds, non-emptiness and the fix to print in the field's metadata; a section's ``_check`` holds
the few rules that relate two of its fields. Every section checks itself when it is built (as
Ray's config dataclasses do in ``__post_init__``), so a config made in code is as safe as one
loaded from YAML. Validation collects every problem and raises once (:class:`ConfigError`); each
message names the field, the bad value and the fix. This module imports no torch and no ray, so
that the driver, tests and tools can validate a config in milliseconds.

Rules that need the selector registry or the report's metrics live a layer up, in
:mod:`edsft.validate`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

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
    "choices",
    "did_you_mean",
    "rule",
    "DEFAULT_CONFIG_PATH",
]

DEFAULT_CONFIG_PATH = Path(__file__).parent / "configs" / "quickstart.yaml"


class ConfigError(UserError):
    """A config that cannot run. ``problems`` lists one readable line per bad field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


# --------------------------------------------------------------------------------------------
# How a field states its rule
# --------------------------------------------------------------------------------------------


def rule(
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    ge: float | None = None,
    le: float | None = None,
    nonempty: str | None = None,
    unique: bool = False,
    hint: str | None = None,
) -> Any:
    """A dataclass field whose value rule sits in its metadata, next to it.

    ``ge`` / ``le``: inclusive bounds (on every entry of a list or mapping field; null passes).
    ``nonempty``: the field may not be '' or []; the text is the fix printed when it is.
    ``unique``: a list field may not repeat a value. ``hint``: the fix appended to a bound's message.
    """
    meta = {"ge": ge, "le": le, "nonempty": nonempty, "unique": unique, "hint": hint}
    return field(default=default, default_factory=factory, metadata={k: v for k, v in meta.items() if v is not None})


@dataclass(frozen=True)
class _Section:
    """A config section: converts its fields to their annotated types and checks their rules when built."""

    section_name: ClassVar[str] = "?"

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in dataclasses.fields(self):
            key = f"{self.section_name}.{f.name}"
            value, bad = _convert(getattr(self, f.name), _hints(type(self))[f.name])
            if bad is not None and value in (None, "") and "nonempty" in f.metadata:
                bad = f"is empty: {f.metadata['nonempty']}"  # `key=` on the command line reads as null
            if bad is not None:
                problems.append(f"{key}={_show(value)} {bad}")
                # A badly typed value takes its default, so that the rules below still run on sane values.
                value = f.default_factory() if f.default_factory is not MISSING else f.default
            else:
                problems += _rule_problems(key, value, f.metadata)
            object.__setattr__(self, f.name, value)
        problems += self._check()
        if problems:
            raise ConfigError(problems)

    def _check(self) -> list[str]:
        """Rules between fields of this section (one problem per line); none by default."""
        return []


# --------------------------------------------------------------------------------------------
# The tree. Field names are the public vocabulary (pool, row_id, budget, selector, score).
# --------------------------------------------------------------------------------------------

BUILTIN_POOLS = ("builtin:tasks", "builtin:pydocs")


@dataclass(frozen=True)
class PoolConfig(_Section):
    """Where the unlabeled prompts come from and how their fields map."""

    section_name: ClassVar[str] = "pool"

    # builtin:tasks, builtin:pydocs, file, glob, folder (a `datasets` save_to_disk folder too), s3:// prefix
    # or hf://datasets/<repo>[@revision]/<path>
    path: str = rule("builtin:tasks", nonempty="point it at a file, folder, s3:// prefix or builtin:tasks")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "arrow"] = "auto"  # the file format; auto: by extension
    size: int = rule(2000, ge=1)  # rows generated for builtin:tasks (ignored for files)
    seed: int = rule(0, ge=0)  # seed of the builtin generators
    prompt_field: str = rule("instruction", nonempty="name the pool's prompt column, e.g. instruction")
    input_field: str | None = "input"  # optional; joined to the prompt with a blank line
    # the annotation oracle; selection never reads it
    response_field: str = rule("output", nonempty="name the pool's response column, e.g. output")
    task_field: str | None = "task"
    id_field: str | None = None  # None: row_id is a stable hash of the content
    max_prompt_chars: int = rule(4000, ge=1)
    max_bad_fraction: float = rule(0.5, ge=0, le=1)  # ingest fails when more rows than this are quarantined
    eval_path: str | None = None  # held-out split; builtin pools bring their own
    eval_size: int = rule(280, ge=0)  # rows of the builtin balanced eval split
    eval_fraction: float = rule(0.0, ge=0, le=0.9)  # hold out this fraction of a file pool when eval_path is unset
    rows_per_shard: int = rule(50_000, ge=1)  # rows per Parquet part of pool.parquet
    # How a record is laid out (pool.format is the *file* format): flat = the *_field columns above;
    # alpaca = flat plus `system` and `history` ([[user, assistant], ...]); sharegpt = `conversations`
    # of {from, value} turns; messages = OpenAI `messages` of {role, content}; auto: told per record.
    layout: Literal["auto", "flat", "alpaca", "sharegpt", "messages"] = "auto"
    # Renamed fields in LLaMA-Factory's dataset_info.json words; they take precedence over the *_field
    # settings. columns: prompt, query, response, system, history, messages. tags: role_tag,
    # content_tag, user_tag, assistant_tag, system_tag, observation_tag, function_tag.
    columns: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    require_response: bool = False  # quarantine rows without a response (a conversation ending on a user turn)

    def _check(self) -> list[str]:
        if self.path.startswith("builtin:") and self.path not in BUILTIN_POOLS:
            return [f"pool.path={self.path!r} is not a built-in pool: use builtin:tasks or builtin:pydocs"]
        problems = []
        for key, known in (("columns", POOL_COLUMNS), ("tags", POOL_TAGS)):
            for name in getattr(self, key):
                if name == "tools":
                    problems.append("pool.columns maps 'tools': tool-use conversations are not supported; drop the entry")
                elif name not in known:
                    problems.append(f"pool.{key}: {_unknown(name, list(known), 'key')}")
        return problems


# LLaMA-Factory's dataset_info.json vocabulary (pool.columns / pool.tags keys).
POOL_COLUMNS = ("prompt", "query", "response", "system", "history", "messages")
POOL_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag", "function_tag")


@dataclass(frozen=True)
class ScoringConfig(_Section):
    """The base model's uncertainty on its own response, plus prompt embeddings."""

    section_name: ClassVar[str] = "scoring"

    # hub id, local folder, s3:// prefix or builtin:*
    model: str = rule("builtin:smollm2-135m", nonempty="name a hub id, local folder, s3:// prefix or builtin:*")
    max_new_tokens: int = rule(24, ge=1)
    max_prompt_tokens: int = rule(256, ge=1)
    # rows per generation micro-batch: a decode step streams every weight once for the whole batch, so
    # on CPU 64 rows took 0.67x the time of 16 (SmolLM2-135M, 1 thread, benchmarks/results/cpu_throughput.md)
    batch_size: int = rule(64, ge=1)
    embedding_layer: int = -1  # hidden-state layer mean-pooled into `embedding`
    encoder: str | None = None  # e.g. builtin:minilm for a second column `embedding_encoder`
    # auto: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16 / AMX / Arm BF16), else fp32; the
    # uncertainty math is fp32 whatever the model runs in
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_actors: int = rule(1, ge=1)  # max actors of the scoring pool (one per GPU on clusters)
    min_actors: int = rule(1, ge=1)
    num_gpus_per_actor: float = rule(0.0, ge=0)
    cpus_per_actor: float = rule(0.5, ge=0)  # fractional on CPU-only clusters (a whole CPU can deadlock reads)
    max_retries: int = rule(2, ge=0)  # retries of a failing batch before its rows are quarantined
    # auto: static on GPU, dynamic on CPU. static = a preallocated KV cache with fixed shapes (prompt width
    # rounded up to a multiple of 64, micro-batch padded to batch_size), which transformers compiles on
    # CUDA; dynamic = plain generate.
    generation: Literal["auto", "dynamic", "static"] = "auto"
    # auto: a pool of up to local_max_rows prompts on CPU is scored in the driver's own process (no Ray
    # start-up, one model load); larger pools, and GPUs, go to Ray Data actors. local / distributed force one.
    mode: Literal["auto", "local", "distributed"] = "auto"
    local_max_rows: int = rule(1000, ge=0)

    def _check(self) -> list[str]:
        if self.min_actors > self.num_actors:
            return [f"scoring.min_actors={self.min_actors} must be <= scoring.num_actors={self.num_actors}"]
        return []


@dataclass(frozen=True)
class SelectionConfig(_Section):
    """Which selector picks `budget` prompts from the scored pool (names and params: edsft.validate).

    `budget` is one size or a list of sizes (``[1000, 5000, 10000]``): one run then writes a subset per
    size, and the stages after select use the largest (see edsft.distributed.coresets)."""

    section_name: ClassVar[str] = "selection"

    name: str = rule("facility_location", nonempty="name a selector, e.g. facility_location")
    budget: int | tuple[int, ...] = rule(100, ge=1, unique=True, nonempty="give a budget, e.g. 100 or [100, 400]")
    seed: int = rule(0, ge=0)
    embedding: Literal["embedding", "embedding_encoder"] = "embedding"
    params: Mapping[str, Any] = field(default_factory=dict)  # selector hyperparameters
    mode: Literal["auto", "local", "distributed"] = "auto"
    shards: int = rule(4, ge=1)  # m in RandGreeDi / two-round k-center
    local_max_rows: int = rule(200_000, ge=1)  # auto: in-process below this many rows
    allow_budget_over_pool: bool = False  # True: cap budget at the pool size instead of failing
    cpus_per_task: float = rule(0.25, ge=0)  # Ray CPUs per distributed selection task (fractional: no deadlock in Tune)
    # Multi-round active learning (1 = the one-shot design): the budget is spent in `rounds` batches;
    # after each batch the model is finetuned and the remaining pool re-scored with it.
    rounds: int = rule(1, ge=1)
    round_budgets: tuple[int, ...] | None = rule(None, ge=1, hint="or null to split the budget evenly")
    round_training: Literal["restart", "continue"] = "restart"  # from the base model each round, or the last adapter

    def _check(self) -> list[str]:
        out = []
        if self.round_budgets is not None:
            if len(self.round_budgets) != self.rounds:
                out.append(
                    f"selection.round_budgets has {len(self.round_budgets)} entries but selection.rounds={self.rounds}: "
                    "give one batch size per round"
                )
            if sum(self.round_budgets) != self.max_budget:
                out.append(
                    f"selection.round_budgets={list(self.round_budgets)} adds up to {sum(self.round_budgets)}, not "
                    f"selection.budget={self.max_budget}: make the batches add up to the budget"
                )
        if self.rounds > 1 and len(self.budgets) > 1:
            out.append(
                f"selection.rounds={self.rounds} with several budgets {list(self.budgets)}: multi-round selection "
                "takes one budget (sweep.budgets sweeps several)"
            )
        if self.max_budget >= 1 and self.rounds > self.max_budget:
            out.append(
                f"selection.rounds={self.rounds} is more than selection.budget={self.max_budget}: each round picks >= 1 row"
            )
        return out

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The rows each round picks: round_budgets, or the budget split evenly (earlier rounds get the remainder)."""
        if self.round_budgets is not None:
            return tuple(self.round_budgets)
        q, r = divmod(self.max_budget, self.rounds)
        return tuple(q + (i < r) for i in range(self.rounds))

    @property
    def budgets(self) -> tuple[int, ...]:
        """Every budget, smallest first (one entry for a single budget)."""
        return (self.budget,) if isinstance(self.budget, int) else tuple(sorted(self.budget))

    @property
    def max_budget(self) -> int:
        """The budget the stages after select use: the largest."""
        return self.budgets[-1]


@dataclass(frozen=True)
class AnnotationConfig(_Section):
    """How selected prompts get their responses."""

    section_name: ClassVar[str] = "annotation"

    mode: Literal["oracle", "export", "import"] = "oracle"  # oracle: the pool's response column
    annotations_path: str | None = None  # JSONL of {row_id, response}, or the exported CSV filled in, for mode=import
    allow_missing: bool = False  # import: train on the annotated subset when some selected ids have no answer

    def _check(self) -> list[str]:
        if self.mode == "import" and not self.annotations_path:
            return ["annotation.mode='import' needs annotation.annotations_path: the JSONL of {row_id, response}"]
        return []


@dataclass(frozen=True)
class TrainingConfig(_Section):
    """LoRA (or full) SFT on Ray Train with DeepSpeed or DDP."""

    section_name: ClassVar[str] = "training"

    model: str | None = None  # None: the scoring model
    backend: Literal["deepspeed", "ddp"] = "deepspeed"
    # local: train in the calling process (the driver, or the sweep trial, which then reserves the
    # worker's resources itself), world size 1; distributed: a Ray Train worker group. auto: local
    # for one CPU worker (no controller and worker group to start: ~10 s of every small CPU trial).
    mode: Literal["auto", "local", "distributed"] = "auto"
    zero_stage: int = rule(2, ge=0, le=3)  # ignored by ddp, so that one config can switch backends
    num_workers: int = rule(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: Mapping[str, float] = rule(factory=lambda: {"CPU": 1}, ge=0)
    max_seq_len: int = rule(256, ge=8)
    packing: bool = False
    micro_batch_size: int = rule(8, ge=1)
    grad_accum: int = rule(1, ge=1)
    epochs: float = rule(3.0, ge=0)
    max_steps: int | None = rule(None, ge=1, hint="or null to train by epochs")  # set: overrides epochs
    lr: float = rule(2e-4, ge=0)
    weight_decay: float = rule(0.0, ge=0)
    warmup_ratio: float = rule(0.05, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = rule(1.0, ge=0)
    # auto: bf16 (bf16 base weights, fp32 LoRA/optimizer, autocast) on GPU and on CPUs with native bf16, else fp32
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    lora: bool = True
    lora_r: int = rule(16, ge=1)
    lora_alpha: int = rule(32, ge=1)
    # 0 as in peft's LoraConfig and torchtune's LoRA recipes: a dropout mask on the inputs of every LoRA
    # module (210 in SmolLM2-135M) made a bf16 CPU step 1.4x slower (217 vs 300 tokens/s, measured)
    lora_dropout: float = rule(0.0, ge=0, le=1)
    lora_target_modules: str | tuple[str, ...] = "all-linear"  # a peft shorthand or a list of module names
    seed: int = rule(0, ge=0)
    checkpoint_every: int = rule(0, ge=0)  # steps; 0: only at the end
    storage_path: str | None = None  # None: <output.dir>/train
    max_failures: int = rule(1, ge=-1)  # -1: retry forever
    merge_weights: bool = False
    log_every: int = rule(10, ge=1)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    run_name: str | None = None  # Ray Train run name; None: derived from the training config + data
    # newest checkpoints kept in storage; None keeps all
    checkpoints_to_keep: int | None = rule(2, ge=1, hint="or null to keep every checkpoint")

    def _check(self) -> list[str]:
        out = []
        if self.max_steps is None and self.epochs <= 0:
            out.append(f"training.epochs={self.epochs} must be > 0 when training.max_steps is null")
        if self.mode == "local" and self.num_workers > 1:
            out.append(
                f"training.mode='local' trains in one process but training.num_workers={self.num_workers}: "
                "set training.num_workers=1, or training.mode=distributed (or auto) for a Ray Train worker group"
            )
        return out

    @property
    def resolved_mode(self) -> str:
        """``mode`` with auto decided: local for one CPU worker, distributed otherwise (a GPU worker is
        placed by Ray Train on a GPU node; the driver may run on a head node without one)."""
        if self.mode != "auto":
            return self.mode
        return "local" if self.num_workers == 1 and not self.use_gpu else "distributed"


@dataclass(frozen=True)
class EvaluationConfig(_Section):
    """Held-out loss and generation metrics for the base and finetuned models."""

    section_name: ClassVar[str] = "evaluation"

    max_new_tokens: int = rule(24, ge=1)
    # rows per generation micro-batch (as scoring.batch_size; the loss pass takes at most 16 of them at a time)
    batch_size: int = rule(64, ge=1)
    max_examples: int | None = rule(None, ge=1, hint="or null to evaluate every held-out row")
    base_model: bool = True  # also evaluate the base model
    generate: bool = True  # exact match / ROUGE-L need generation; loss does not
    num_actors: int = rule(1, ge=1)
    mode: Literal["auto", "local", "distributed"] = "auto"  # distributed: Ray Data actors
    local_max_rows: int = rule(300, ge=0)  # auto: evaluate in-process up to this many rows
    cpus_per_actor: float = rule(0.5, ge=0)  # fractional on CPU-only clusters (a whole CPU can deadlock reads)
    num_gpus_per_actor: float = rule(0.0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # as scoring.dtype: bf16 where native
    # lm-evaluation-harness tasks (e.g. [arc_easy, hellaswag]) run on the base and finetuned model;
    # empty: none (lm-eval is the optional extra edsft[lm-eval]). Local task YAML: lm_eval_include_path.
    lm_eval_tasks: tuple[str, ...] = rule((), unique=True)
    lm_eval_include_path: str | None = None  # a folder of task YAML files, or null for lm-eval's registry only
    lm_eval_limit: int | None = rule(None, ge=1, hint="or null to run every example of each task")


@dataclass(frozen=True)
class SweepConfig(_Section):
    """Tune grid over selector x budget x seed (selector names, params and metric: edsft.validate)."""

    section_name: ClassVar[str] = "sweep"

    enabled: bool = False  # `edsft run`: sweep + report instead of a single select/train/evaluate
    selectors: tuple[str, ...] = rule(
        ("random", "facility_location", "uncertainty"),
        nonempty="name at least one selector, e.g. [random, facility_location]",
    )
    budgets: tuple[int, ...] = rule((50, 200), ge=1, unique=True, nonempty="give at least one budget, e.g. [50, 200]")
    # Budgets for random alone, on top of sweep.budgets: B / B_random inverts random's curve, so a
    # selector that beats random at its largest budget needs random measured beyond it (e.g. [128]
    # next to budgets [16, 64]); without them the ratio there is only a bound.
    random_budgets: tuple[int, ...] = rule((), ge=1, unique=True)
    seeds: tuple[int, ...] = rule((0,), ge=0, unique=True, nonempty="give at least one seed, e.g. [0]")
    params: Mapping[str, Any] = field(default_factory=dict)  # selector -> {param: value or [grid]}
    metric: str = "exact_match"
    max_concurrent_trials: int | None = rule(None, ge=1, hint="or null to fit the cluster's CPUs/GPUs")
    # the trial itself only drives its TorchTrainer (training.mode local: it is the worker and reserves its resources)
    cpus_per_trial: float = rule(0.001, ge=0)
    # retries of a failing trial inside one sweep (re-running the sweep resumes errored ones)
    max_failures: int = rule(0, ge=0)
    rounds: tuple[int, ...] = rule(
        (1,), ge=1, unique=True, nonempty="give at least one round count, e.g. [1]"
    )  # selection.rounds axis

    def _check(self) -> list[str]:
        both = sorted(set(self.random_budgets) & set(self.budgets))
        if both:
            return [
                f"sweep.random_budgets={list(self.random_budgets)} repeats {both} from sweep.budgets={list(self.budgets)}: "
                "random runs at every sweep.budgets entry already; list only its extra budgets"
            ]
        return []

    # A sweep.params entry for a selector the sweep leaves out is ignored (with a note): the default
    # config's params must not make a user's shorter sweep.selectors fail. edsft.validate still
    # rejects an entry whose name is no selector at all (a typo).


@dataclass(frozen=True)
class RayConfig(_Section):
    section_name: ClassVar[str] = "ray"

    address: str | None = None  # None: start a local cluster; "auto": join the running one
    num_cpus: int | None = rule(None, ge=1, hint="or null to use every CPU of this machine")  # local cluster only
    object_store_memory: int | None = rule(None, ge=1, hint="in bytes, or null for Ray's default")


@dataclass(frozen=True)
class StorageConfig(_Section):
    """Object store settings; credentials come only from the environment."""

    section_name: ClassVar[str] = "storage"

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:5000 for a local S3-compatible server
    region: str | None = None


@dataclass(frozen=True)
class OutputConfig(_Section):
    section_name: ClassVar[str] = "output"

    dir: str = rule("runs/quickstart", nonempty="name a local folder or an s3:// prefix, e.g. runs/quickstart")
    report_to: tuple[Literal["mlflow", "tensorboard", "wandb"], ...] = ()
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

    def replace(self, **dotted: Any) -> Config:
        """A copy with dotted overrides applied and validated: ``cfg.replace(**{"selection.budget": 5})``."""
        data = config_to_dict(self)
        for key, value in dotted.items():
            _set_dotted(data, key, value)
        return config_from_dict(data)

    @property
    def training_model(self) -> str:
        return self.training.model or self.scoring.model


def choices(key: str) -> tuple:
    """The allowed values of a ``Literal`` field, e.g. ``choices("scoring.generation")``: the one list."""
    section, _, name = key.partition(".")
    tp = _hints(_hints(Config)[section])[name]
    if typing.get_origin(tp) is not Literal:
        raise KeyError(f"{key} is not a field with a fixed set of values")
    return typing.get_args(tp)


# --------------------------------------------------------------------------------------------
# Types and rules, applied by _Section.__post_init__
# --------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations (they are strings under PEP 563)."""
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    """A type in the user's words, for "must be a string or a list of strings"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is tuple:
        plural = {str: "strings", int: "integers", float: "numbers"}.get(args[0])
        return f"a list of {plural}" if plural else "a list"
    if origin is collections.abc.Mapping:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any) -> tuple[Any, str | None]:
    """``(value as type tp, None)``, or ``(value, what it must be instead)``.

    YAML gives lists for tuples and ints for floats; ``nan`` / ``inf`` parse as floats but are no
    value any field can run with, so every float must be finite."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value, None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            converted, bad = _convert(value, arm)
            if bad is None:
                return converted, None
        return value, bad if len(arms) == 1 else "must be " + " or ".join(_describe(a) for a in arms)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value, None
        return value, f"is not one of {list(args)}: pick one of them"
    if tp is bool:
        return value, None if isinstance(value, bool) else "must be true or false"
    if tp is int:
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # 5.0 is 5; nan, inf no
        if isinstance(value, bool) or not whole:
            return value, "must be an integer"
        return int(value), None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, "must be a number"
        try:
            number = float(value)
        except OverflowError:  # an integer with hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            return value, "must be a finite number"
        return number, None
    if tp is str:
        return value, None if isinstance(value, str) else "must be a string"
    if origin is tuple:
        if value is None:
            return (), None
        if isinstance(value, (str, int, float)):  # `key=5` for a list of one
            value = [value]
        if not isinstance(value, (list, tuple)):
            return value, "must be a list"
        out = []
        for entry in value:
            converted, bad = _convert(entry, args[0])
            if bad is not None:
                return value, f"has entry {entry!r}, which {bad}"
            out.append(converted)
        return tuple(out), None
    if origin is collections.abc.Mapping:
        if value is None:
            return {}, None
        if not isinstance(value, Mapping):
            return value, "must be a mapping"
        out = {}
        for k, entry in value.items():
            converted, bad = _convert(entry, args[1])
            if bad is not None:
                return value, f"maps {k!r} to {entry!r}, which {bad}"
            out[k] = converted
        return out, None
    raise TypeError(f"config fields of type {tp} are not supported")  # a declaration bug, not user input


def _rule_problems(key: str, value: Any, meta: Mapping[str, Any]) -> list[str]:
    """The problems of a well-typed value with its field's ``rule(...)``."""
    if value is None:
        return []
    shown = f"{key}={_show(value)}"
    if "nonempty" in meta and isinstance(value, (str, tuple, Mapping)) and len(value) == 0:
        return [f"{shown} is empty: {meta['nonempty']}"]
    if isinstance(value, tuple):
        entries = [(f"{shown} has entry {v!r}, which", v) for v in value]
    elif isinstance(value, Mapping):
        entries = [(f"{shown} maps {k!r} to {v!r}, which", v) for k, v in value.items()]
    else:
        entries = [(shown, value)]
    hint = f", {meta['hint']}" if "hint" in meta else ""
    problems = []
    for subject, v in entries:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if "ge" in meta and v < meta["ge"]:
            problems.append(f"{subject} must be >= {meta['ge']:g}{hint}")
        if "le" in meta and v > meta["le"]:
            problems.append(f"{subject} must be <= {meta['le']:g}{hint}")
    if meta.get("unique") and isinstance(value, tuple):
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            problems.append(f"{shown} repeats {repeated}: list each value once")
    return problems


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML terms: lists, not tuples; null, not None."""
    return "null" if value is None else repr(list(value) if isinstance(value, tuple) else value)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _parse_scalar(text: str) -> Any:
    """`key=value` values are YAML: 5 -> int, [a, b] -> list, null -> None.

    YAML 1.1 reads 1e-4 (no dot) and nan as strings; anything float() accepts becomes a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
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


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from nested mappings; raises ConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError([f"config must be a mapping of sections, got {type(data).__name__}"])
    sections = _hints(Config)
    problems = [_unknown(key, list(sections), "section") for key in data if key not in sections]
    built = {}
    for sname, cls in sections.items():
        raw = data.get(sname) or {}
        if not isinstance(raw, Mapping):
            problems.append(f"{sname}={raw!r} must be a mapping of keys")
            raw = {}
        names = [f.name for f in dataclasses.fields(cls)]
        problems += [_unknown(f"{sname}.{k}", [f"{sname}.{n}" for n in names], "key") for k in raw if k not in names]
        try:
            built[sname] = cls(**{k: v for k, v in raw.items() if k in names})
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return Config(**built)


def did_you_mean(name: str, valid: typing.Iterable[str], what: str) -> str:
    """'did you mean X?' for a near miss, else the list of valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"valid {what}s: {', '.join(valid)}"


def _unknown(name: str, valid: list[str], what: str) -> str:
    return f"unknown {what} {name!r}: {did_you_mean(name, valid, what)}"


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


# Fields added after runs existed: at their default they stay out of the hash, so a run folder made
# before the field existed is still "up to date" (its stages and sweep trials are not recomputed).
# A new field whose default changes no result belongs here.
HASH_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {
    ("selection", "rounds"): 1,
    ("selection", "round_budgets"): None,
    ("selection", "round_training"): "restart",
    ("sweep", "rounds"): [1],
    ("sweep", "random_budgets"): [],
    ("scoring", "mode"): "auto",  # where a pool is scored (the scores agree up to bf16 batch-composition effects)
    ("scoring", "local_max_rows"): 1000,
}


def config_hash(cfg: Config | Mapping, sections: tuple[str, ...] | None = None, extra: Any = None) -> str:
    """A short stable hash of (parts of) the config; stages use it to skip recomputation."""
    data = config_to_dict(cfg) if not isinstance(cfg, Mapping) else dict(cfg)
    if sections is not None:
        data = {s: data[s] for s in sections}
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for (section, name), default in HASH_NEUTRAL_DEFAULTS.items():
        part = data.get(section)
        if isinstance(part, dict) and name in part and _plain(part[name]) == _plain(default):
            del part[name]
    blob = json.dumps({"cfg": data, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
