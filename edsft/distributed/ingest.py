"""Pool ingestion on Ray: one task per source file, then the same global pass as in-process.

Each task runs :func:`edsft.pools.ingest.ingest_source` on one file and writes its own parts
(``pool.parquet/part-<file>-<k>.parquet``) and quarantine lines into the run folder, local or
s3://; only small count dicts travel back. The driver then runs
:func:`edsft.pools.ingest.finalize` (duplicate ids over the row_id column, eval.parquet,
quarantine.jsonl, the bad-fraction check), so the outputs and the invariant are those of
:func:`edsft.pools.ingest.ingest_pool`; only part names differ. Part names sort in (file, line)
order, so reading the folder gives the rows in the same order as the in-process version.

Tasks take a fraction of a CPU (``cpus_per_task``): on a 2-CPU cluster whole-CPU tasks would
starve anything else that runs at the same time. Built-in pools are one generated source and
are ingested in-process.
"""

from __future__ import annotations

import time

import ray

from ..config import Config, config_from_dict, config_to_dict
from ..pools.ingest import Source, _bar, finalize, ingest_eval, ingest_pool, ingest_source, prepare_run, report_summary, resolve_sources
from ..storage import Store, get_store

__all__ = ["ingest_pool_ray"]


@ray.remote(max_retries=2)
def _ingest_file(cfg_dict: dict, run_uri: str, uri: str, fmt: str, index: int) -> dict:
    # Plain dicts and strings cross the process boundary; the worker rebuilds its filesystem
    # (credentials come from the worker's environment, the endpoint from the config).
    cfg = config_from_dict(cfg_dict)
    run = get_store(run_uri, cfg.storage.endpoint_url, cfg.storage.region)
    return ingest_source(cfg, run, Source(uri, fmt), prefix=f"{index:05d}-")


def ingest_pool_ray(cfg: Config, run: Store, progress: bool = True, cpus_per_task: float = 0.5) -> dict:
    """Ingest ``cfg.pool`` with one Ray task per file; same outputs and summary as ``ingest_pool``.

    Needs a running Ray cluster (``ray.init`` done by the caller). A retried task rewrites the
    same part names, so a retry never duplicates rows.
    """
    if cfg.pool.path.startswith("builtin:"):
        return ingest_pool(cfg, run, progress=progress)
    if not ray.is_initialized():
        raise RuntimeError("ingest_pool_ray needs a Ray cluster: call ray.init() first (or use edsft.pools.ingest.ingest_pool)")
    t0 = time.perf_counter()
    prepare_run(run)
    sources = resolve_sources(cfg.pool.path, cfg.pool.format, cfg.storage.endpoint_url, cfg.storage.region)
    cfg_dict = config_to_dict(cfg)
    task = _ingest_file.options(num_cpus=cpus_per_task)
    pending = {task.remote(cfg_dict, run.uri, s.uri, s.fmt, i): i for i, s in enumerate(sources)}
    results: dict[int, dict] = {}
    bar = _bar(progress, None, f"ingest {len(sources)} file(s) on Ray")
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            res = ray.get(ref)
            results[pending.pop(ref)] = res
            if bar is not None:
                bar.update(res["rows_read"])
    if bar is not None:
        bar.close()
    ordered = [results[i] for i in range(len(sources))]  # file order: the first copy of an id wins
    summary = finalize(cfg, run, ordered, ingest_eval(cfg, run), t0, [s.uri for s in sources])
    report_summary(summary, progress)
    return summary
