"""Pool ingestion: any pool source -> ``pool.parquet/`` parts, ``eval.parquet`` and ``quarantine.jsonl``.

The pieces, each in its own module:

* :mod:`~edsft.pools.sources` - what ``pool.path`` names (files, ``builtin:tasks``,
  ``builtin:pydocs``, or a registered source): its inputs, records and eval split;
* :mod:`~edsft.pools.readers` - one file -> records with their line (JSONL, JSON, Parquet, CSV, Arrow);
* :mod:`~edsft.pools.records` - one record -> one row or a quarantine reason;
* :mod:`~edsft.pools.writer` - the rolling Parquet parts and quarantine streams of a worker;
* :mod:`~edsft.pools.finalize` - duplicates, eval.parquet, quarantine.jsonl, the checks;
* this module - the in-process driver. The Ray driver is ``edsft.distributed.ingest``: one task
  per input through the same :func:`ingest_input`, then the same :func:`finalize`.

Streaming and bounded memory: JSONL is read in chunks, Parquet by record batches, and rows go
out through ParquetWriters in parts of ``pool.rows_per_shard`` rows. JSON *arrays* are the one
exception: a ``.json`` file is parsed whole, one file at a time - shard big pools as JSONL or
Parquet. (A ``.json`` file that is really JSON Lines is detected and streamed.)

Bad rows never stop the run and are never dropped silently. Each goes to ``quarantine.jsonl`` as
``{"split", "source", "line", "reason", "detail", "raw"}`` where ``line`` is the 1-based line
for JSONL and the 0-based row index for Parquet, JSON arrays and built-in pools. Reasons:

    malformed_json   the line / file is not valid JSON
    not_utf8         the bytes are not UTF-8, or a string holds a lone surrogate ("\\ud800")
    wrong_type       the record is not an object, a field has the wrong type, a number is NaN/Infinity
    empty_prompt     the prompt field is missing, null, blank, or only zero-width/control characters
    missing_id       pool.id_field is set but the record has no id
    prompt_too_long  the prompt is longer than pool.max_prompt_chars
    duplicate_id     a row_id seen before (first kept); with content-hash ids an exact duplicate
    eval_overlap     an eval row whose row_id is also in the pool (would leak into training)
    unreadable_file  the file breaks off (truncated/fake .gz, corrupt Parquet): rows before are kept
    malformed_csv    a CSV record with more or fewer cells than the header
    no_user_turn     a conversation without a user turn (only system / assistant turns, or none)
    role_order       system turns after the first user turn, or user / assistant not alternating from a user turn
    empty_turn       a turn whose text is empty or only whitespace / invisible characters
    unknown_role     a turn's role is none of pool.tags' user / assistant / system tags (tool turns included)
    no_response      pool.require_response is set and the row has no response (a conversation ending on a user turn)

Record layouts (``pool.layout``, :func:`~edsft.pools.records.mapping_for`): flat fields, alpaca
(flat + ``system`` + ``history``), ShareGPT ``conversations`` and OpenAI ``messages``; ``auto``
tells each record by its shape. A conversation's row keeps its final user turn as ``prompt``, its
final assistant turn as ``response`` and the turns before (system included) as ``context`` (JSON).

Files under a pool folder that are not read (names starting with ``_`` or ``.``, unknown
extensions) are listed in the summary's ``skipped_files`` with the reason.

Invariant (tested): ``rows_read == rows_kept + rows_held_out + rows_quarantined`` where
``rows_held_out`` is only non-zero with ``pool.eval_fraction`` (rows moved to eval.parquet).
Blank lines of JSONL files are not rows. A failed ingest leaves no ``pool.parquet`` behind.

No torch, no ray.
"""

from __future__ import annotations

import logging
import time

from .. import console
from ..config import Config
from ..storage import Store
from .finalize import finalize, ingest_outputs, merge_results
from .records import REASONS, SCHEMA, PoolError, content_row_id
from .sources import Input, Listing, PoolSource, eval_split_of, open_source
from .writer import STAGING, Sink

# PoolError, SCHEMA, REASONS and content_row_id live in .records; they are named here too
# because callers have always imported them from this module.
__all__ = ["PoolError", "SCHEMA", "REASONS", "content_row_id", "ingest_pool", "ingest_input", "ingest_eval", "report_summary"]

log = logging.getLogger(__name__)


def _sink(cfg: Config, run: Store, prefix: str, split: str, hold_out: float = 0.0, folder: Store | None = None, bar=None) -> Sink:
    return Sink(run, prefix, split, cfg.pool.rows_per_shard, hold_out, cfg.pool.seed, folder, bar)


def ingest_input(
    cfg: Config,
    run: Store,
    source: PoolSource,
    inp: Input,
    prefix: str,
    split: str = "pool",
    folder: Store | None = None,
    bar=None,
) -> dict:
    """Parse one input of ``source`` into its own parts (the unit of work of the Ray version)."""
    hold_out = eval_split_of(cfg, source).fraction if split == "pool" else 0.0
    sink = _sink(cfg, run, prefix, split, hold_out, folder, bar)
    sink.consume(inp.origin, source.read(inp), source.mapping)
    return sink.close()


def ingest_eval(cfg: Config, run: Store, source: PoolSource) -> dict:
    """The eval split's own records (``pool.eval_path``, a built-in's eval split), into staging."""
    ev = eval_split_of(cfg, source).source
    if ev is None:
        return merge_results([])
    folder = run.child(STAGING, "eval")
    return merge_results(
        [ingest_input(cfg, run, ev, inp, f"{i:05d}-", "eval", folder) for i, inp in enumerate(ev.list_inputs().inputs)]
    )


def progress_bar(progress: bool, total: int | None, desc: str):
    if console.active() is not None:
        return console.bar(total, "rows")  # the run's progress line, not a bar in the log
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True, mininterval=1.0, smoothing=0.1)


def warn_ignored(cfg: Config) -> None:
    if cfg.pool.eval_path and cfg.pool.eval_fraction:
        log.warning("pool.eval_path is set: pool.eval_fraction=%g is ignored", cfg.pool.eval_fraction)


def ingest_pool(cfg: Config, run: Store, progress: bool = True) -> dict:
    """Ingest ``cfg.pool`` into the run folder ``run`` (in-process, input after input).

    Writes ``pool.parquet/part-*.parquet``, ``eval.parquet`` and ``quarantine.jsonl``; returns
    the summary ``{rows_read, rows_kept, rows_held_out, rows_quarantined, quarantine_by_reason,
    eval_rows, tasks, wall_s, files, skipped_files, ...}``. Raises :class:`PoolError` for a missing
    or empty pool and when more than ``pool.max_bad_fraction`` of the rows are bad; a failed
    ingest removes what it wrote.
    """
    t0 = time.perf_counter()
    source = open_source(cfg)
    warn_ignored(cfg)
    with ingest_outputs(run):
        listing: Listing = source.list_inputs()
        bar = progress_bar(progress, source.size_hint, f"ingest {source.name}")
        # One sink for all inputs: parts roll over at rows_per_shard rows whatever the file sizes.
        sink = _sink(cfg, run, "", "pool", eval_split_of(cfg, source).fraction, bar=bar)
        for inp in listing.inputs:
            sink.consume(inp.origin, source.read(inp), source.mapping)
        results = [sink.close()]
        if bar is not None:
            bar.close()
        summary = finalize(cfg, run, results, ingest_eval(cfg, run, source), t0, listing)
    report_summary(summary, progress)
    return summary


def report_summary(s: dict, echo: bool = True) -> str:
    """One line with the counts by reason; printed (progress on) and logged."""
    reasons = ", ".join(f"{r}={c}" for r, c in s["quarantine_by_reason"].items()) or "none"
    skipped = f", {len(s['skipped_files'])} file(s) skipped" if s.get("skipped_files") else ""
    line = (
        f"ingest: {s['rows_read']} rows read, {s['rows_kept']} kept, {s['rows_held_out']} held out, "
        f"{s['rows_quarantined']} quarantined ({reasons}), {s['eval_rows']} eval rows{skipped}, {s['wall_s']:.1f} s"
    )
    log.info(line)
    if echo:
        print(line, flush=True)
    return line
