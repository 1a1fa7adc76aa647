"""Pools: the built-in generated pools and ingestion of any pool into the run folder.

* :mod:`edsft.pools.builtin_tasks` - ``builtin:tasks``, 20 verifiable task families, long-tailed;
* :mod:`edsft.pools.builtin_pydocs` - ``builtin:pydocs``, Q/A pairs from Python's documentation;
* :mod:`edsft.pools.ingest` - JSONL/JSON/Parquet (local, glob, folder, s3://) -> ``pool.parquet/``,
  ``eval.parquet``, ``quarantine.jsonl``. The Ray version is ``edsft.distributed.ingest``.

No torch and no ray here (a test enforces the layers).
"""

from .builtin_tasks import TASK_FAMILIES, iter_tasks
from .ingest import SCHEMA, PoolError, ingest_pool

__all__ = ["TASK_FAMILIES", "iter_tasks", "ingest_pool", "PoolError", "SCHEMA"]
