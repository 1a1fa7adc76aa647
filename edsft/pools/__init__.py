"""Pools: the built-in generated pools and ingestion of any pool into the run folder.

* :mod:`edsft.pools.builtin_tasks` - ``builtin:tasks``, 20 verifiable task families, long-tailed;
* :mod:`edsft.pools.builtin_pydocs` - ``builtin:pydocs``, Q/A pairs from Python's documentation;
* :mod:`edsft.pools.sources` - the :class:`PoolSource` component (files, built-ins, registered ones);
* :mod:`edsft.pools.readers`, :mod:`~edsft.pools.records`, :mod:`~edsft.pools.writer`,
  :mod:`~edsft.pools.finalize` - reading files, mapping records to rows, writing parts, the final pass;
* :mod:`edsft.pools.ingest` - the in-process driver -> ``pool.parquet/``, ``eval.parquet``,
  ``quarantine.jsonl``. The Ray driver is ``edsft.distributed.ingest``.

No torch and no ray here (a test enforces the layers).
"""

from .builtin_tasks import TASK_FAMILIES, iter_tasks
from .ingest import ingest_pool
from .readers import register_reader
from .records import SCHEMA, PoolError
from .sources import PoolSource, open_source, register_source

__all__ = [
    "TASK_FAMILIES",
    "iter_tasks",
    "ingest_pool",
    "PoolError",
    "SCHEMA",
    "PoolSource",
    "open_source",
    "register_source",
    "register_reader",
]
