"""Score a whole pool on Ray Data: read prompts, a pool of model actors, Parquet shards out.

The label column is never read: ``read_parquet(columns=[row_id, prompt, task])`` projects it
away at the Parquet reader, so it does not even leave the object store. Each actor holds one
:class:`edsft.scoring.Scorer` (one per GPU on GPU clusters; fractional-CPU actors with one
torch thread on CPU-only clusters). Rows the scorer quarantines go to a JSONL file of
``{row_id, reason}``; ``rows_in == rows_scored + rows_quarantined`` always.

Resume. Spot GPU nodes get preempted, so scoring commits its output in blocks (one per Ray batch
an actor scores), and the score rows never pass through the driver:

1. the actor writes the block's good rows as one Parquet file under a fresh name into
   ``_<out>.blocks/incoming/`` (whole or not at all: a temporary name renamed locally, one PUT on
   S3) and returns only the block's tally (row count, tokens, dtype, its quarantined rows and the
   file's name), a few hundred bytes;
2. the driver, as each tally arrives, renames the file into ``out`` as ``part-<attempt>-<seq>``
   (a metadata operation; a server-side copy on S3) and then writes the block's JSON marker into
   ``_<out>.blocks/``. A block counts only once its marker exists.

So ``out`` only ever holds files the driver moved there, and a part counts only with its marker.
A re-run with the same scoring config and pool reads the markers, deletes every file in ``out``
no marker names (renamed before the kill could write the marker) and all of ``incoming/`` (written
by an actor whose tally never arrived: a kill, an actor Ray Data retried, or an actor of a killed
driver that outlived it), and sends only the rows of no marked block to the model
(``rows_resumed`` in the summary). Ray Data hands every input row to exactly one successful task
output, and the resumed rows are filtered out before the model, so the marked blocks are disjoint
and every row of the pool is in exactly one of them or in none; before the stage commits, the
driver checks that the blocks hold ``rows_in`` rows with as many distinct row ids (reading only the
parts' ``row_id`` column). The marker folder is removed when the whole pool is scored; a
folder left by another config or pool is discarded. ``block_callbacks`` are called after every
committed block (fault-injection hook). Because actors write, ``output.dir`` must be reachable from
every node that runs an actor (``s3://`` or a shared mount on a multi-node cluster), as for the
ingest tasks and Ray Train's checkpoints.

Why not Ray Data's own checkpointing (``DataContext.checkpoint_config`` with ``id_column=row_id``,
beta in Ray 2.60): it records the rows that reach one ``write_*`` sink, while a scored block has two
outputs that must commit together, its score rows and its quarantined rows with their reasons, plus
the tallies that ``rows_in == rows_scored + rows_quarantined`` and the summary are built from. The
quarantined rows would have to go into the scores files and be split out again by a second pass
over all scores, on the driver or in another Ray Data job, before the stage could commit. Its file
backend also keeps or deletes data files by name prefixes of its own, so the stage could not name
the exact files of the committed artifact, and it is a process-wide setting of the DataContext that
evaluation's and ingest's datasets would see too.

Multi-round selection re-scores with a finetuned model: ``adapter`` (the train stage's ``adapter/``
folder, local or s3://) is applied by every actor, and ``chosen`` names the rows earlier rounds chose.
They are not scored; with ``chosen_out`` they get their prompt embedding under the same model (one
forward pass, no generation: what diversity selectors start from), written as Parquet parts of
(row_id, task, embedding[, embedding_encoder]) into ``chosen_out``, in the same blocks (the actor writes both files, the driver commits both) and with the
same resume. Inside a Ray Tune trial (a placement group) the read tasks and actors are scheduled
outside the trial's tiny placement group, on the cluster's free CPUs/GPUs.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import sys
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ..config import Config, config_hash
from ..models import resolve_model
from ..scoring.scorer import INPUT_COLUMNS, Scorer
from ..scoring.uncertainty import SCORE_COLUMNS
from ..storage import Store, get_store
from .runtime import model_actor_plan
from .session import init_ray

__all__ = ["score_pool", "scores_schema", "block_callbacks", "write_block", "CHOSEN_COLUMNS"]

# chosen_out's columns: what diversity selectors read of the rows chosen in earlier rounds
CHOSEN_COLUMNS = ("row_id", "task", "embedding", "embedding_encoder")

# Called on the driver as ``cb(block=, rows=, part=)`` after each block is committed (part moved
# into out, marker on disk); an exception raised here stops scoring like a preempted node would.
block_callbacks: list[Callable[..., None]] = []


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
    """A Scorer that writes each scored batch itself and returns only its tally (module docstring).

    ``incoming`` (a URI, with the storage endpoint and region: the actor builds its own filesystem,
    credentials from its environment) is where its block files go; ``adapter_uri`` (multi-round
    re-scoring) is a LoRA adapter applied on top of the model."""

    def __init__(
        self, incoming: str, endpoint_url: str | None = None, region: str | None = None, adapter_uri: str | None = None, **kwargs
    ):
        if adapter_uri is not None:  # a local copy of the adapter (a no-op for a local folder)
            import tempfile

            store = get_store(adapter_uri, endpoint_url, region)
            kwargs["adapter"] = str(store.download_to(tempfile.mkdtemp(prefix="edsft-adapter-")))
        self.scorer = Scorer(**kwargs)
        self.incoming = get_store(incoming, endpoint_url, region)

    def table(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The scored batch as an Arrow table with a fixed schema (same types in every block)."""
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
        t = pa.table(cols, schema=schema).append_column("dtype", pa.array([self.scorer.dtype] * len(out["row_id"]), pa.string()))
        if "embed_only" in out:  # rows chosen before: routed to chosen_out when the block is committed
            t = t.append_column("embed_only", pa.array(out["embed_only"], pa.bool_()))
        return t

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tally = write_block(self.incoming, self.table(batch))
        return pa.table({"tally": pa.array([json.dumps(tally)], pa.string())})


def write_block(incoming: Store, t: pa.Table) -> dict:
    """Write a scored block's good rows as one Parquet file with a fresh name in ``incoming``
    (written whole) and return its tally, whose ``part`` names that file (None: no good row)."""
    tally = _tally(t)
    good = t.filter(pc.is_null(t["error"])).drop_columns(["error", "dtype"])
    tally["part"] = tally["chosen_part"] = None
    if "embed_only" in good.column_names:  # rows chosen before: their embedding goes to chosen_out
        flags = good["embed_only"]
        emb = good.filter(flags).select([c for c in good.column_names if c in CHOSEN_COLUMNS])
        good = good.filter(pc.invert(flags)).drop_columns(["embed_only"])
        if emb.num_rows:
            tally["chosen_part"] = f"{uuid.uuid4().hex}.parquet"
            incoming.child(tally["chosen_part"]).write_table(emb)
    if good.num_rows:
        tally["part"] = f"{uuid.uuid4().hex}.parquet"
        incoming.child(tally["part"]).write_table(good)
    return tally


def _tally(t: pa.Table) -> dict:
    """A block's marker: its row count, tokens, dtypes and quarantined rows (JSON-friendly)."""
    bad = t.filter(pc.is_valid(t["error"]))
    embedded = 0
    if "embed_only" in t.column_names:
        embedded = pc.sum(pc.and_(t["embed_only"], pc.is_null(t["error"]))).as_py() or 0
    return {
        "rows": t.num_rows,
        "embedded": embedded,
        "prompt_tokens": pc.sum(t["prompt_tokens"]).as_py() or 0,
        "response_tokens": pc.sum(t["response_tokens"]).as_py() or 0,
        "bad": [[r, why] for r, why in zip(bad["row_id"].to_pylist(), bad["error"].to_pylist())],
        "dtypes": sorted(set(t["dtype"].to_pylist())),
    }


class _Blocks:
    """The finished blocks of an interrupted scoring of ``out``: a marker JSON per block in
    ``_<out>.blocks/``, whose ``part`` (if it had good rows) is a committed Parquet file in ``out``;
    ``incoming/`` in that folder is where the actors write blocks that are not committed yet."""

    def __init__(self, out: Store, fingerprint: str, chosen_out: Store | None = None):
        self.out, self.chosen_out = out, chosen_out
        self.dir = _sibling(out, "_{}.blocks")
        self.incoming = self.dir.child("incoming")
        state = self.dir.child("_state.json")
        if not (state.exists() and state.read_json().get("fingerprint") == fingerprint):
            # no earlier attempt, or one with another config or pool: start from nothing
            self.dir.remove()
            out.remove()
            if chosen_out is not None:
                chosen_out.remove()
            state.write_json({"fingerprint": fingerprint})
        self.done = [self.dir.child(n).read_json() for n in self.dir.list() if n.endswith(".json") and n != "_state.json"]
        # parts no marker names were cut off by the kill (moved in before the marker was written),
        # and nothing in incoming/ was ever committed
        for folder, key in ((out, "part"), (chosen_out, "chosen_part")):
            keep = {b.get(key) for b in self.done if b.get(key)}
            for n in folder.list() if folder is not None else ():
                if n not in keep:
                    folder.child(n).remove()
        self.incoming.remove()
        self.attempt = uuid.uuid4().hex[:8]

    def row_ids(self) -> pa.Array:
        """Every row a finished block holds: scored (from its part), embedded (chosen part) or quarantined."""
        ids = [r for b in self.done for r, _ in b["bad"]]
        parts = [self.out.child(b["part"]) for b in self.done if b["part"]]
        parts += [self.chosen_out.child(b["chosen_part"]) for b in self.done if b.get("chosen_part")]
        scored = [p.read_table(columns=["row_id"])["row_id"].to_pylist() for p in parts]
        return pa.array(ids + [r for s in scored for r in s], pa.string())

    def commit(self, tally: dict, seq: int) -> dict:
        """Commit one block an actor wrote (:func:`write_block`): its file renamed into ``out``, then its marker."""
        tally = dict(tally)
        name = f"part-{self.attempt}-{seq:05d}"
        if tally["part"]:
            self.incoming.child(tally["part"]).move_to(self.out.child(f"{name}.parquet"))
            tally["part"] = f"{name}.parquet"
        if tally.get("chosen_part"):
            self.incoming.child(tally["chosen_part"]).move_to(self.chosen_out.child(f"{name}.parquet"))
            tally["chosen_part"] = f"{name}.parquet"
        self.dir.child(f"{name}.json").write_json(tally)
        self.done.append(tally)
        return tally

    def finish(self) -> None:
        self.dir.remove()


def _sibling(out: Store, pattern: str) -> Store:
    """The file or folder next to ``out`` named ``pattern`` filled with out's own name."""
    name = pattern.format(posixpath.basename(out.path.rstrip("/")))
    return Store(
        out.fs, posixpath.join(posixpath.dirname(out.path.rstrip("/")), name), out.uri.rstrip("/").rsplit("/", 1)[0] + "/" + name
    )


def _count_rows(pool: Store, files: list[str]) -> int:
    return sum(pq.read_metadata(f, filesystem=pool.fs).num_rows for f in files)


def _mode(cfg: Config, rows: int) -> str:
    """scoring.mode, with auto resolved: in this process for a small pool on CPU (no Ray start-up, no
    actor start-up, one model load), Ray Data actors otherwise."""
    sc = cfg.scoring
    if sc.mode != "auto":
        return sc.mode
    return "local" if rows <= sc.local_max_rows and sc.num_gpus_per_actor == 0 else "distributed"


def _read_pool(pool: Store, files: list[str], columns: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=pool.fs) for f in files])


def _rows_to_score(t: pa.Table, resumed: pa.Array, chosen_ids: pa.Array | None, chosen_out: Store | None) -> pa.Table:
    """The rows of ``t`` that go to the model, in both scoring modes: none a finished block holds
    (``resumed``); rows chosen in earlier rounds (``chosen_ids``) left out, or, with ``chosen_out``,
    kept and flagged ``embed_only`` (embedded, not scored)."""
    if len(resumed):
        t = t.filter(pc.invert(pc.is_in(t["row_id"], value_set=resumed)))
    if chosen_ids is not None and chosen_out is None:
        t = t.filter(pc.invert(pc.is_in(t["row_id"], value_set=chosen_ids)))
    elif chosen_ids is not None:
        t = t.append_column("embed_only", pc.is_in(t["row_id"], value_set=chosen_ids))
    return t


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _score_in_process(
    pool: Store,
    files: list[str],
    columns: list[str],
    scorer_kwargs: dict,
    blocks_done: _Blocks,
    resumed: pa.Array,
    chosen_ids: pa.Array | None,
    chosen_out: Store | None,
    progress: bool,
) -> list[dict]:
    """scoring.mode local: the rows no finished block holds, scored by one :class:`_ScoringActor` in
    this process, in blocks of the same size as the distributed path's and committed the same way
    (write_block, then the marker), so resume and the checks after it do not know the difference."""
    from tqdm.auto import tqdm

    from .. import console

    t = _rows_to_score(_read_pool(pool, files, columns), resumed, chosen_ids, chosen_out)
    actor = _ScoringActor(**scorer_kwargs)
    step = scorer_kwargs["batch_size"] * 4  # a few micro-batches per block, as the actors get them
    new = []
    bar = tqdm(total=t.num_rows, desc="score", unit="row", disable=not progress)
    for seq, at in enumerate(range(0, t.num_rows, step)):
        chunk = t.slice(at, step)
        batch = {c: chunk[c].to_numpy(zero_copy_only=False) for c in chunk.column_names}
        tally = write_block(actor.incoming, actor.table(batch))
        new.append(blocks_done.commit(tally, seq))
        for cb in block_callbacks:
            cb(block=seq, rows=new[-1]["rows"], part=new[-1]["part"])
        bar.update(chunk.num_rows)
        console.progress(min(at + step, t.num_rows), t.num_rows, "rows")
    bar.close()
    return new


def score_pool(
    cfg: Config,
    pool: Store,
    out: Store,
    quarantine: Store | None = None,
    progress: bool = True,
    *,
    adapter: Store | None = None,
    chosen: Sequence[str] | None = None,
    chosen_out: Store | None = None,
) -> dict:
    """Score every prompt of ``pool`` with ``cfg.scoring``; write Parquet shards to ``out``.

    ``quarantine`` (a JSONL file; default ``<out>.quarantine.jsonl`` next to ``out``) receives
    ``{row_id, reason}`` for rows that could not be scored. An interrupted call resumes: rows
    in blocks it finished are not scored again (module docstring). Returns a summary: rows_in,
    rows_scored, rows_quarantined (of the whole pool), rows_resumed and blocks_resumed (taken from
    an interrupted attempt), rows_this_attempt (sent to the model now), wall_s, rows_per_s,
    tokens_per_s (prompt + generated tokens), generated_tokens_per_s (this attempt's), out.

    ``adapter``: a LoRA adapter folder applied to ``scoring.model``. ``chosen``: row_ids that are not
    scored (chosen in earlier rounds); with ``chosen_out`` (a folder) they are embedded there instead
    (module docstring), and the summary adds rows_chosen and rows_embedded.
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
        quarantine = _sibling(out, "{}.quarantine.jsonl")

    start = time.perf_counter()
    rows_in = _count_rows(pool, files)
    mode = _mode(cfg, rows_in)
    if mode == "distributed":
        init_ray(cfg)
    resolve_model(sc.model)  # build/convert a builtin once on the driver, so actors only load it
    plan = model_actor_plan(sc) if mode == "distributed" else None
    identity: dict = {"pool": pool.uri, "files": files}
    chosen_ids = None
    if chosen is not None:
        chosen_ids = pa.array(sorted(set(map(str, chosen))), pa.string())
        in_pool = sum(
            pc.sum(pc.is_in(pq.read_table(f, columns=["row_id"], filesystem=pool.fs)["row_id"], value_set=chosen_ids)).as_py()
            or 0
            for f in files
        )
        if chosen_out is None:
            rows_in -= in_pool  # not sent to the model at all
        identity["chosen"] = hashlib.sha256("\n".join(chosen_ids.to_pylist()).encode()).hexdigest()[:16]
        identity["embed_chosen"] = chosen_out is not None
    if adapter is not None:
        if not adapter.child("adapter_config.json").exists():
            raise ValueError(f"adapter {adapter.uri!r} has no adapter_config.json: pass the train stage's out/adapter folder")
        weights = adapter.child("adapter_model.safetensors")
        identity["adapter"] = hashlib.sha256(weights.read_bytes() if weights.exists() else b"").hexdigest()[:16]
    blocks_done = _Blocks(out, config_hash(cfg, ("scoring",), extra=identity), chosen_out)
    resumed = blocks_done.row_ids()
    rows_resumed, blocks_resumed = len(resumed), len(blocks_done.done)
    todo = rows_in - rows_resumed

    scorer_kwargs = dict(
        incoming=blocks_done.incoming.uri,
        endpoint_url=cfg.storage.endpoint_url,
        region=cfg.storage.region,
        adapter_uri=adapter.uri if adapter is not None else None,
        model=sc.model,
        max_new_tokens=sc.max_new_tokens,
        max_prompt_tokens=sc.max_prompt_tokens,
        embedding_layer=sc.embedding_layer,
        encoder=sc.encoder,
        dtype=sc.dtype,
        batch_size=sc.batch_size,
        max_retries=sc.max_retries,
        generation=sc.generation,
    )
    new = []
    if todo > 0 and mode == "local":
        new = _score_in_process(pool, files, columns, scorer_kwargs, blocks_done, resumed, chosen_ids, chosen_out, progress)
    elif todo > 0:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = progress  # Ray Data's bars show rows/s and an ETA per operator
        # Actors sort each batch by length and run micro-batches of sc.batch_size: a few micro-batches
        # per Ray batch cut padding, but every actor must still get work on a small pool.
        ray_batch = max(1, min(sc.batch_size * 4, math.ceil(todo / plan.max_actors)))
        blocks = max(plan.max_actors * 2, math.ceil(todo / ray_batch))

        # in a Tune trial (a placement group of a sliver of a CPU): schedule outside it, on the cluster
        remote = {}
        in_trial = ray.util.get_current_placement_group() is not None
        if in_trial:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            remote["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=None)

        def rows_to_score(t: pa.Table) -> pa.Table:
            return _rows_to_score(t, resumed, chosen_ids, chosen_out)

        if in_trial:
            # Inside a sweep trial (a multi-round trial re-scoring the rest of the pool) the rows are read
            # here and handed over as blocks (from_items: no Ray task at all). Ray Data's read, filter and
            # repartition tasks each want a whole CPU (the V2 reader's file listing and the V1 reader's
            # sampling take no resource arguments), and on a 2-CPU node with two trials running (their
            # slivers plus the other trial's actors) a whole CPU never frees up: the round hung.
            t = rows_to_score(_read_pool(pool, files, columns))
            ds = ray.data.from_items(t.to_pylist(), override_num_blocks=max(1, min(blocks, t.num_rows)))
        else:
            ds = ray.data.read_parquet(files, filesystem=pool.fs, columns=columns)
            if rows_resumed or chosen_ids is not None:
                ds = ds.map_batches(rows_to_score, batch_format="pyarrow")
            ds = ds.repartition(blocks)  # one Parquet file is one block: split it so the actors share it
        ds = ds.map_batches(
            _ScoringActor,
            fn_constructor_kwargs=dict(scorer_kwargs, device=plan.device, num_threads=plan.num_threads),
            batch_size=ray_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            **remote,
        )
        # Streamed: each block is committed as its tally arrives, so a kill loses only the blocks in
        # flight. Ray Data may bundle several tallies into one batch.
        seq = 0
        for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for tally in t["tally"].to_pylist():
                new.append(blocks_done.commit(json.loads(tally), seq))
                for cb in block_callbacks:
                    cb(block=seq, rows=new[-1]["rows"], part=new[-1]["part"])
                seq += 1

    everything = blocks_done.done
    bad = [(rid, why) for b in everything for rid, why in b["bad"]]
    rows_embedded = sum(b.get("embedded", 0) for b in everything)
    rows_scored = sum(b["rows"] for b in everything) - len(bad) - rows_embedded
    rows_now = sum(b["rows"] for b in new)
    prompt_tokens = sum(b["prompt_tokens"] for b in new)
    response_tokens = sum(b["response_tokens"] for b in new)
    dtypes = sorted({d for b in everything for d in b["dtypes"]})
    if rows_in != rows_scored + rows_embedded + len(bad):
        raise RuntimeError(
            f"scoring lost rows: {rows_in} in, {rows_scored} scored, {rows_embedded} embedded, {len(bad)} quarantined"
        )
    distinct = pc.count_distinct(blocks_done.row_ids()).as_py()  # the row_id columns of the parts, not the scores
    if distinct != rows_in:
        raise RuntimeError(f"scoring holds {rows_in - distinct} row(s) twice: {rows_in} rows in {len(everything)} blocks")
    if not out.exists():
        out.mkdir()  # a pool whose every row was quarantined still gives a (empty) scores folder
    if chosen_out is not None and not chosen_out.exists():
        chosen_out.mkdir()
    quarantine.write_jsonl({"row_id": rid, "reason": why} for rid, why in bad)
    blocks_done.finish()  # last: a kill before this resumes from the blocks, after it nothing is left to do

    wall = time.perf_counter() - start
    summary = {
        "rows_in": rows_in,
        "rows_scored": rows_scored,
        "rows_quarantined": len(bad),
        "rows_resumed": rows_resumed,  # held by blocks an interrupted attempt finished: not scored again
        "blocks_resumed": blocks_resumed,
        "rows_this_attempt": rows_now,  # sent to the model in this attempt
        "wall_s": round(wall, 3),
        "rows_per_s": round(rows_now / wall, 3),
        "tokens_per_s": round((prompt_tokens + response_tokens) / wall, 1),
        "generated_tokens_per_s": round(response_tokens / wall, 1),
        "mode": mode,
        "actors": plan.max_actors if plan else 0,  # 0: scored in this process (scoring.mode local)
        "threads": plan.num_threads if plan else _torch_threads(),  # torch threads per actor (or of this process)
        "gpus_per_actor": plan.num_gpus if plan else 0.0,
        "device": plan.device if plan else _local_device(),
        "dtype": "/".join(dtypes) or None,
        "out": out.uri,
        "quarantine": quarantine.uri,
    }
    if chosen is not None:
        summary["rows_chosen"] = len(chosen_ids)
        summary["rows_embedded"] = rows_embedded
    if adapter is not None:
        summary["adapter"] = adapter.uri
    if progress:
        print(
            f"scoring: {rows_scored}/{rows_in} rows scored ({rows_resumed} resumed), {len(bad)} quarantined in {wall:.1f}s "
            f"({summary['rows_per_s']:.2f} rows/s, {summary['tokens_per_s']:.0f} tokens/s) -> {out.uri}",
            file=sys.stderr,
            flush=True,
        )
    return summary
