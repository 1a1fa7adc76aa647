"""Pool ingestion on Ray: one task per input of a parallel pool source, then the same final pass.

Each task runs :func:`edsft.pools.ingest.ingest_input` on one input (a file) and writes its own
parts (``pool.parquet/part-<input>-<k>.parquet``) and quarantine lines into the run folder, local
or s3://; only small count dicts travel back. The driver then runs
:func:`edsft.pools.finalize.finalize` (duplicate ids over the row_id column, eval.parquet,
quarantine.jsonl, the bad-fraction check), so the outputs and the invariant are those of
:func:`edsft.pools.ingest.ingest_pool`; only part names differ. Part names sort in (input, line)
order, so reading the folder gives the rows in the same order as the in-process version.

Tasks take a fraction of a CPU (``cpus_per_task``): on a 2-CPU cluster whole-CPU tasks would
starve anything else that runs at the same time. A source that is not ``parallel`` (the built-in
pools: one generator) is ingested in-process. A user error inside a task (a
:class:`~edsft.errors.UserError`) reaches the caller as itself, not wrapped in a Ray traceback;
a failed ingest cancels the other tasks and removes what they wrote.
"""

from __future__ import annotations

import time

import ray

from ..config import Config, config_from_dict, config_to_dict
from ..errors import UserError
from ..pools.finalize import finalize, ingest_outputs
from ..pools.ingest import ingest_eval, ingest_input, ingest_pool, progress_bar, report_summary, warn_ignored
from ..pools.sources import Input, open_source
from ..storage import Store, get_store

__all__ = ["ingest_pool_ray"]


@ray.remote(max_retries=2)
def _ingest_input(cfg_dict: dict, run_uri: str, inp: Input, index: int) -> dict:
    # Plain dicts, strings and the small Input cross the process boundary; the worker rebuilds the
    # source and its filesystem (credentials from the worker's environment, endpoint from the config).
    cfg = config_from_dict(cfg_dict)
    run = get_store(run_uri, cfg.storage.endpoint_url, cfg.storage.region)
    return ingest_input(cfg, run, open_source(cfg), inp, prefix=f"{index:05d}-")


def _wait_all(pending: dict, bar=None) -> dict:
    results = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            try:
                res = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, UserError):  # bad input: the message, not a Ray traceback
                    raise e.cause from None
                raise
            results[pending.pop(ref)] = res
            if bar is not None:
                bar.update(res["rows_read"])
    return results


def ingest_pool_ray(cfg: Config, run: Store, progress: bool = True, cpus_per_task: float = 0.5) -> dict:
    """Ingest ``cfg.pool`` with one Ray task per input; same outputs and summary as ``ingest_pool``.

    Needs a running Ray cluster (``ray.init`` done by the caller). A retried task rewrites the
    same part names, so a retry never duplicates rows.
    """
    source = open_source(cfg)
    if not source.parallel:
        return ingest_pool(cfg, run, progress=progress)
    if not ray.is_initialized():
        raise RuntimeError("ingest_pool_ray needs a Ray cluster: call ray.init() first (or use edsft.pools.ingest.ingest_pool)")
    t0 = time.perf_counter()
    warn_ignored(cfg)
    with ingest_outputs(run):
        listing = source.list_inputs()
        cfg_dict = config_to_dict(cfg)
        task = _ingest_input.options(num_cpus=cpus_per_task)
        pending = {task.remote(cfg_dict, run.uri, inp, i): i for i, inp in enumerate(listing.inputs)}
        bar = progress_bar(progress, None, f"ingest {len(listing.inputs)} file(s) on Ray")
        try:
            results = _wait_all(pending, bar)
        except BaseException:
            # Stop the other tasks before the outputs are removed, so none writes a part afterwards.
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=60)
            raise
        finally:
            if bar is not None:
                bar.close()
        ordered = [results[i] for i in range(len(listing.inputs))]  # input order: the first copy of an id wins
        summary = finalize(cfg, run, ordered, ingest_eval(cfg, run, source), t0, listing)
    report_summary(summary, progress)
    return summary
