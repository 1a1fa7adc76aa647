"""Standard benchmarks through lm-evaluation-harness (``evaluation.lm_eval_tasks``).

``run_lm_eval`` hands the base model (a hub id, a local folder, s3:// or builtin:, resolved by
``edsft.models.resolve_model`` to what ``from_pretrained`` reads) and, optionally, a LoRA adapter
folder to lm-eval's ``HFLM`` and returns ``{task: {metric: value}}``, the numbers people compare
across papers. Task definitions come from lm-eval's own registry or from YAML files in
``include_path`` (a local task can point ``dataset_path: json`` at local files, so nothing has to
reach a hub). lm-eval is an optional extra (``pip install 'edsft[lm-eval]'``): it is imported only
when tasks are configured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from edsft.errors import UserError
from edsft.models import dtype_name, load_tokenizer, resolve_dtype, resolve_model

__all__ = ["run_lm_eval"]


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError(
            f"evaluation.lm_eval_tasks is set but lm-evaluation-harness cannot be imported ({exc}): "
            "install it with `pip install 'edsft[lm-eval]'` (or `pip install lm-eval`), or set evaluation.lm_eval_tasks=[]"
        ) from exc
    return lm_eval, HFLM, TaskManager


def _metric_name(key: str) -> str:
    # lm-eval keys metrics as "<metric>,<filter>" (e.g. "acc,none"); the default filter adds nothing
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def run_lm_eval(
    model_spec: str,
    adapter_dir: str | Path | None,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """lm-eval scores of ``model_spec`` (+ the LoRA adapter in ``adapter_dir``) on ``tasks``.

    Returns ``{task: {metric: value}}`` with lm-eval's metric names (``acc``, ``acc_norm``, their
    ``*_stderr``, ...); a task group also reports its subtasks. ``limit`` caps the examples per task.
    """
    lm_eval, HFLM, TaskManager = _harness()
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(
            f"evaluation.lm_eval_include_path={str(include_path)!r} is not a folder: point it at the folder holding the task YAML files, or set it to null"
        )
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"evaluation.lm_eval_tasks names {unknown} which lm-eval does not know: use lm-eval task names "
            "(`lm-eval ls tasks`) or put their YAML in evaluation.lm_eval_include_path"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # HFLM loads the model itself from a path (peft= applies only then), so hand it the resolved
    # folder and the dtype edsft's own evaluation would pick; the tokenizer gets edsft's pad rule.
    lm = HFLM(
        pretrained=str(resolve_model(model_spec)),
        tokenizer=load_tokenizer(model_spec),
        peft=str(adapter_dir) if adapter_dir is not None else None,
        dtype=dtype_name(resolve_dtype(dtype, device)),
        device=device,
        batch_size=batch_size,
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        log_samples=False,
        # edsft seeds its own stages; fixed seeds here keep lm-eval's few-shot sampling repeatable
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    scores: dict[str, dict[str, float]] = {}
    for task, values in out["results"].items():
        row = {}
        for key, value in values.items():
            if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            value = float(value)
            row[_metric_name(key)] = value if math.isfinite(value) else None  # "N/A" stderr with one row
        scores[task] = row
    return scores
