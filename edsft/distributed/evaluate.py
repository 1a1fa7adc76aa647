"""Evaluate the base and the finetuned model on the held-out split; write metrics.json.

Small eval sets (``evaluation.local_max_rows``) run in-process; bigger ones (or
``evaluation.mode: distributed``) run through a Ray Data actor pool like scoring: every actor
loads the model (and adapter) once and maps batches of rows to per-(row, variant) results.
On CPU-only clusters actors get fractional CPUs (``evaluation.cpus_per_actor``, 0.5): whole-CPU
actors on a 2-CPU cluster starve Ray Data's read tasks.

Rows are length-sorted before they are cut into batches (both modes), so micro batches carry little
padding; results are returned (and written) in the eval set's row order. ``metrics.json`` records
the dtype the models ran in (``evaluation.dtype: auto`` = bf16 where the hardware has it).
"""

from __future__ import annotations

import posixpath
import tempfile
import time
from pathlib import Path

import numpy as np

from edsft import console
from edsft.config import Config
from edsft.storage import Store, get_store
from edsft.training.data import load_examples
from edsft.training.evaluation import Evaluator, build_metrics
from edsft.training.lm_eval import run_lm_eval

__all__ = ["evaluate_models", "EvalWorker"]


def _as_store(x: Store | str, cfg: Config) -> Store:
    return x if isinstance(x, Store) else get_store(x, cfg.storage.endpoint_url, cfg.storage.region)


def _local_adapter(adapter: Store | None, scratch: Path) -> str | None:
    if adapter is None:
        return None
    if not adapter.child("adapter_config.json").exists():
        raise ValueError(
            f"adapter {adapter.uri!r} has no adapter_config.json: pass the train stage's out/adapter folder "
            "(full finetuning writes out/model, which is evaluated as its own model, not as an adapter)"
        )
    return str(adapter.download_to(scratch / "adapter"))


class EvalWorker:
    """Ray Data actor: one Evaluator per actor, batches of rows in, per-(row, variant) results out."""

    def __init__(self, model_spec: str, adapter_uri: str | None, settings: dict, storage: dict):
        import torch

        torch.set_num_threads(1)
        from edsft.storage import set_default_storage

        set_default_storage(storage.get("endpoint_url"), storage.get("region"))
        adapter = get_store(adapter_uri, storage.get("endpoint_url"), storage.get("region")) if adapter_uri else None
        self.scratch = Path(tempfile.mkdtemp(prefix="edsft-eval-"))
        settings = dict(settings)
        self.generate = bool(settings.pop("generate", True))
        self.evaluator = Evaluator(model_spec, _local_adapter(adapter, self.scratch), **settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in rows]
        results = self.evaluator.evaluate(rows, generate=self.generate)
        keys = ("row_id", "task", "variant", "loss_sum", "n_tokens", "prediction", "exact_match", "rouge_l")
        out = {k: [r.get(k) for r in results] for k in keys}
        out["dtype"] = [self.evaluator.dtype] * len(results)
        return out


def _length(row: dict) -> int:
    # characters stand in for tokens: the sort only has to group similar lengths
    return len(str(row["prompt"])) + len(str(row["response"]))


def _mode(cfg: Config, n: int) -> str:
    if cfg.evaluation.mode != "auto":
        return cfg.evaluation.mode
    return "local" if n <= cfg.evaluation.local_max_rows else "distributed"


def evaluate_models(
    cfg: Config, eval_data: Store | str, adapter: Store | str | None, out: Store | str, progress: bool = True
) -> dict:
    """Loss/perplexity and exact match/ROUGE-L for the base model and base + ``adapter``.

    ``out`` is the metrics.json file (or a folder, which then receives metrics.json);
    ``predictions.jsonl`` (per row and variant) is written next to it. Returns the metrics dict.
    """
    t0 = time.time()
    ev = cfg.evaluation
    data = _as_store(eval_data, cfg)
    adapter_store = _as_store(adapter, cfg) if adapter is not None else None
    out = _as_store(out, cfg)
    if not out.uri.endswith(".json"):
        out = out.child("metrics.json")
    folder = Store(out.fs, posixpath.dirname(out.path), out.uri.rsplit("/", 1)[0])

    rows = load_examples(data)
    if ev.max_examples is not None:
        rows = rows[: ev.max_examples]
    if not rows:
        raise ValueError(f"eval data {data.uri!r} has no rows: build the held-out split (pool.eval_path / eval_size) first")
    if not ev.base_model and adapter_store is None:
        raise ValueError(
            "evaluation.base_model=false and no adapter: nothing to evaluate; pass the trained adapter or enable base_model"
        )
    model_spec = cfg.training_model
    settings = {
        "max_seq_len": cfg.training.max_seq_len,
        "max_new_tokens": ev.max_new_tokens,
        "batch_size": ev.batch_size,
        "dtype": ev.dtype,
    }
    mode = _mode(cfg, len(rows))
    by_length = sorted(rows, key=_length)  # batches of similar length: little padding
    if mode == "local":
        with tempfile.TemporaryDirectory(prefix="edsft-eval-") as scratch:
            evaluator = Evaluator(model_spec, _local_adapter(adapter_store, Path(scratch)), **settings)
            variants = [v for v in evaluator.variants if ev.base_model or v != "base"]
            results = []
            from tqdm.auto import tqdm

            step = max(1, ev.batch_size)
            for start in tqdm(range(0, len(by_length), step), desc="evaluate", disable=not progress):
                results += evaluator.evaluate(by_length[start : start + step], generate=ev.generate, variants=variants)
                console.progress(min(start + step, len(by_length)), len(by_length), "rows")
            dtypes = {evaluator.dtype}
    else:
        results = _evaluate_distributed(cfg, by_length, model_spec, adapter_store, settings)
        dtypes = {r.pop("dtype") for r in results}
        if not ev.base_model:
            results = [r for r in results if r["variant"] != "base"]
    position = {}
    for i, r in enumerate(rows):
        position.setdefault(r.get("row_id"), i)
    results.sort(key=lambda r: (r["variant"] != "base", position.get(r["row_id"], 0)))  # the eval set's order

    metrics = build_metrics(results, settings={**settings, "generate": ev.generate, "mode": mode})
    metrics["settings"]["dtype"] = "/".join(sorted(dtypes))  # what 'auto' resolved to on the workers
    metrics.update(
        model=model_spec,
        adapter=adapter_store.uri if adapter_store is not None else None,
        eval_data=data.uri,
        wall_time_s=round(time.time() - t0, 3),
    )
    if ev.lm_eval_tasks:
        metrics["lm_eval"] = _lm_eval_scores(cfg, model_spec, adapter_store)
        metrics["wall_time_s"] = round(time.time() - t0, 3)
    folder.child("predictions.jsonl").write_jsonl(results)
    out.write_json(metrics)
    return metrics


def _lm_eval_scores(cfg: Config, model_spec: str, adapter: Store | None) -> dict:
    """``{variant: {task: {metric: value}}}`` from lm-evaluation-harness, for the same variants as above.

    Runs in the driver process: lm-eval batches and caches its own requests, and the benchmark
    sets it is pointed at here are small next to the held-out split.
    """
    ev = cfg.evaluation
    scores = {}
    with tempfile.TemporaryDirectory(prefix="edsft-lm-eval-") as scratch:
        variants = ([("base", None)] if ev.base_model else []) + (
            [("finetuned", _local_adapter(adapter, Path(scratch)))] if adapter is not None else []
        )
        for variant, adapter_dir in variants:
            console.note(f"lm-eval {variant}: {', '.join(ev.lm_eval_tasks)}")
            scores[variant] = run_lm_eval(
                model_spec,
                adapter_dir,
                ev.lm_eval_tasks,
                ev.lm_eval_include_path,
                ev.lm_eval_limit,
                dtype=ev.dtype,
                batch_size=ev.batch_size,
            )
    return scores


def _evaluate_distributed(cfg: Config, rows: list[dict], model_spec: str, adapter: Store | None, settings: dict) -> list[dict]:
    import ray

    ev = cfg.evaluation
    use_gpu = ev.num_gpus_per_actor > 0
    n_blocks = max(ev.num_actors * 2, min(len(rows) // max(ev.batch_size, 1), 64), 1)
    # One block per batch-ish so the actor pool stays busy. The blocks are cut here, not by
    # repartition(): its tasks ask for a whole CPU, and inside a sweep on a 2-CPU node (two trials
    # holding 0.001 CPU each, two 0.5-CPU eval actors) a whole CPU never frees up: the eval hangs.
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    worker_settings = dict(settings, generate=ev.generate)
    results = ds.map_batches(
        EvalWorker,
        fn_constructor_kwargs={
            "model_spec": model_spec,
            "adapter_uri": adapter.uri if adapter is not None else None,
            "settings": worker_settings,
            "storage": {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region},
        },
        batch_size=ev.batch_size,
        concurrency=(1, ev.num_actors),
        num_cpus=None if use_gpu else ev.cpus_per_actor,
        num_gpus=ev.num_gpus_per_actor if use_gpu else None,
        batch_format="numpy",
    ).take_all()
    return [{k: v for k, v in r.items() if v is not None} for r in results]
