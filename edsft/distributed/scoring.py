"""Score a whole pool on Ray Data: read prompts, a pool of model actors, Parquet shards out.

The label column is never read: ``read_parquet(columns=[row_id, prompt, task])`` projects it
away at the Parquet reader, so it does not even leave the object store. Each actor holds one
:class:`edsft.scoring.Scorer` (one per GPU on GPU clusters; fractional-CPU actors with one
torch thread on CPU-only clusters). Rows the scorer quarantines go to a JSONL file of
``{row_id, reason}``; ``rows_in == rows_scored + rows_quarantined`` always.
"""

from __future__ import annotations

import math
import posixpath
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ..config import Config
from ..models import resolve_model
from ..scoring.scorer import INPUT_COLUMNS, Scorer
from ..scoring.uncertainty import SCORE_COLUMNS
from ..storage import Store
from .runtime import model_actor_plan
from .session import init_ray

__all__ = ["score_pool", "scores_schema"]


def scores_schema(dim: int, encoder_dim: int | None = None, error: bool = False) -> pa.Schema:
    """The schema of the scores table: one row per scored prompt, keyed by row_id."""
    fields = [pa.field("row_id", pa.string()), pa.field("task", pa.string())]
    fields += [pa.field(c, pa.float32()) for c in SCORE_COLUMNS]
    fields += [
        pa.field("response_tokens", pa.int64()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("generated", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
    ]
    if encoder_dim:
        fields.append(pa.field("embedding_encoder", pa.list_(pa.float32(), encoder_dim)))
    if error:
        fields.append(pa.field("error", pa.string()))
    return pa.schema(fields)


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


class _ScoringActor:
    """A Scorer whose output is an Arrow table with a fixed schema (same types in every block)."""

    def __init__(self, **kwargs):
        self.scorer = Scorer(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        out = self.scorer(batch)
        enc = out.get("embedding_encoder")
        schema = scores_schema(out["embedding"].shape[1], None if enc is None else enc.shape[1], error=True)
        cols = {}
        for f in schema:
            v = out[f.name]
            if f.name in ("embedding", "embedding_encoder"):
                cols[f.name] = _fixed_list(v)
            elif f.type == pa.string():
                cols[f.name] = pa.array([None if x is None else str(x) for x in v], type=pa.string())
            else:
                cols[f.name] = pa.array(v, type=f.type)
        # the dtype the model ran in ('auto' resolved on this actor's hardware): tallied, not written
        return pa.table(cols, schema=schema).append_column(
            "dtype", pa.array([self.scorer.dtype] * len(out["row_id"]), pa.string())
        )


def _tally(t: pa.Table) -> pa.Table:
    bad = t.filter(pc.is_valid(t["error"]))
    return pa.table(
        {
            "rows": [t.num_rows],
            "prompt_tokens": [pc.sum(t["prompt_tokens"]).as_py() or 0],
            "response_tokens": [pc.sum(t["response_tokens"]).as_py() or 0],
            "bad_row_ids": [bad["row_id"].to_pylist()],
            "bad_reasons": [bad["error"].to_pylist()],
            "dtypes": [sorted(set(t["dtype"].to_pylist()))],
        }
    )


def _count_rows(pool: Store, files: list[str]) -> int:
    return sum(pq.read_metadata(f, filesystem=pool.fs).num_rows for f in files)


def score_pool(cfg: Config, pool: Store, out: Store, quarantine: Store | None = None, progress: bool = True) -> dict:
    """Score every prompt of ``pool`` with ``cfg.scoring``; write Parquet shards to ``out``.

    ``quarantine`` (a JSONL file; default ``<out>.quarantine.jsonl`` next to ``out``) receives
    ``{row_id, reason}`` for rows that could not be scored. Returns a summary: rows_in,
    rows_scored, rows_quarantined, wall_s, rows_per_s, tokens_per_s (prompt + generated tokens),
    generated_tokens_per_s, out.
    """
    sc = cfg.scoring
    files = pool.parquet_files()
    if not files:
        raise ValueError(f"pool={pool.uri!r} holds no Parquet file: run the pool stage first or point at pool.parquet")
    names = pq.read_schema(files[0], filesystem=pool.fs).names
    missing = [c for c in ("row_id", "prompt") if c not in names]
    if missing:
        raise ValueError(f"pool={pool.uri!r} lacks column(s) {missing} (has {names}): score a pool written by the pool stage")
    columns = [c for c in INPUT_COLUMNS if c in names]  # never the response (label) column
    if quarantine is None:  # <out>.quarantine.jsonl, next to the shards folder
        name = posixpath.basename(out.path.rstrip("/")) + ".quarantine.jsonl"
        quarantine = Store(
            out.fs,
            posixpath.join(posixpath.dirname(out.path.rstrip("/")), name),
            out.uri.rstrip("/").rsplit("/", 1)[0] + "/" + name,
        )

    start = time.perf_counter()
    init_ray(cfg)
    resolve_model(sc.model)  # build/convert a builtin once on the driver, so actors only load it
    plan = model_actor_plan(sc)
    rows_in = _count_rows(pool, files)

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress  # Ray Data's bars show rows/s and an ETA per operator
    # Actors sort each batch by length and run micro-batches of sc.batch_size: a few micro-batches
    # per Ray batch cut padding, but every actor must still get work on a small pool.
    ray_batch = max(1, min(sc.batch_size * 4, math.ceil(max(rows_in, 1) / plan.max_actors)))
    blocks = max(plan.max_actors * 2, math.ceil(max(rows_in, 1) / ray_batch))

    ds = ray.data.read_parquet(files, filesystem=pool.fs, columns=columns)
    ds = ds.repartition(blocks)  # one Parquet file is one block: split it so the actors share it
    ds = ds.map_batches(
        _ScoringActor,
        fn_constructor_kwargs=dict(
            model=sc.model,
            max_new_tokens=sc.max_new_tokens,
            max_prompt_tokens=sc.max_prompt_tokens,
            embedding_layer=sc.embedding_layer,
            encoder=sc.encoder,
            dtype=sc.dtype,
            device=plan.device,
            batch_size=sc.batch_size,
            max_retries=sc.max_retries,
            num_threads=plan.num_threads,
            generation=sc.generation,
        ),
        batch_size=ray_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )
    scored = ds.materialize()  # scored once, read twice (good rows and quarantine)

    # One cheap pass over the materialized blocks: per-batch counts and the quarantined rows.
    # (Ray's aggregate ops would start a shuffle: seconds of overhead for four numbers.)
    tallies = scored.map_batches(_tally, batch_format="pyarrow").take_all()
    bad = [(rid, why) for t in tallies for rid, why in zip(t["bad_row_ids"], t["bad_reasons"])]
    prompt_tokens = sum(int(t["prompt_tokens"]) for t in tallies)
    response_tokens = sum(int(t["response_tokens"]) for t in tallies)
    rows_scored = sum(int(t["rows"]) for t in tallies) - len(bad)
    if out.exists():
        out.remove()  # a rerun replaces the shards instead of mixing old and new ones
    dtypes = sorted({d for t in tallies for d in t["dtypes"]})
    scored.map_batches(
        lambda t: t.filter(pc.is_null(t["error"])).drop_columns(["error", "dtype"]), batch_format="pyarrow"
    ).write_parquet(out.path, filesystem=out.fs)
    quarantine.write_jsonl({"row_id": rid, "reason": why} for rid, why in bad)

    wall = time.perf_counter() - start
    summary = {
        "rows_in": rows_in,
        "rows_scored": rows_scored,
        "rows_quarantined": len(bad),
        "wall_s": round(wall, 3),
        "rows_per_s": round(rows_scored / wall, 3),
        "tokens_per_s": round((prompt_tokens + response_tokens) / wall, 1),
        "generated_tokens_per_s": round(response_tokens / wall, 1),
        "actors": plan.max_actors,
        "device": plan.device,
        "dtype": "/".join(dtypes) or None,
        "out": out.uri,
        "quarantine": quarantine.uri,
    }
    if rows_in != rows_scored + len(bad):
        raise RuntimeError(f"scoring lost rows: {rows_in} in, {rows_scored} scored, {len(bad)} quarantined")
    if progress:
        print(
            f"scoring: {rows_scored}/{rows_in} rows scored, {len(bad)} quarantined in {wall:.1f}s "
            f"({summary['rows_per_s']:.2f} rows/s, {summary['tokens_per_s']:.0f} tokens/s) -> {out.uri}",
            file=sys.stderr,
            flush=True,
        )
    return summary
