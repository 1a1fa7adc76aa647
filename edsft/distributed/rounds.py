"""Multi-round active learning: the budget spent in ``selection.rounds`` batches, the model retrained
and the rest of the pool re-scored after each.

Round r of R picks ``selection.batch_sizes[r - 1]`` rows among those no earlier round chose:

1. scores: round 1 uses the run's own ``scores.parquet`` (the base model's, as the one-shot design
   does). Round r > 1 re-scores the rows not chosen yet with the base model plus round r - 1's
   adapter (:func:`edsft.distributed.scoring.score_pool` with ``adapter`` and ``chosen``) into
   ``scores.parquet``; for selectors that start from the chosen set (``Selector.uses_chosen``:
   facility location, k-center) the chosen rows are embedded by the same model, in the same pass,
   into ``chosen.parquet``.
2. selection: the configured selector with that batch as its budget, on those scores, started from
   the chosen rows' embeddings (:func:`edsft.distributed.coresets.select_subset` with ``chosen``),
   in-process or map-reduce like the select stage. ``selection.parquet`` is the batch in pick order,
   with its ``round``.
3. unless r = R: annotation of the batch (``annotation.mode`` oracle or import) into
   ``annotated.parquet`` and finetuning into ``train/adapter`` (``selection.round_training``:
   ``restart`` trains from the base model on every row chosen so far, ``continue`` trains the last
   round's adapter further on the new batch only). The last round does not train: the pipeline's own
   annotate / train / evaluate stages make the final model from the union (``union_selection``).

Each round is one pipeline stage (``round<r>``, committed into ``rounds/<r>/``) with a resumable
staging folder: a killed round keeps its finished re-scoring (``rescoring.json``, its summary, says so;
the scoring's own blocks resume a half-finished one) and its training checkpoints; only selection, which is cheap and
seeded, runs again. The summary's ``compute_s`` splits the round's wall seconds into scoring,
selection and training (``gpu_s`` the same times the GPUs requested, when any were); a resumed round
counts the attempt that finished each part.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..annotation import annotate
from ..config import Config
from ..errors import UserError
from ..selection import get_selector
from ..storage import Store
from .coresets import SELECTION_SCHEMA, _split_params, select_subset
from .scoring import score_pool
from .train import train_sft

__all__ = ["run_round", "union_selection", "last_batch", "ROUND_SCHEMA", "round_config"]

# rounds/<r>/selection.parquet and the final selection.parquet of a multi-round run: the one-shot
# schema plus the round that picked each row (rank: pick order within the round / over all rounds)
ROUND_SCHEMA = SELECTION_SCHEMA.append(pa.field("round", pa.int64()))
# the round's re-scoring summary; written when the re-scoring finished, so a resumed attempt keeps it
RESCORING = "rescoring.json"


def round_config(cfg: Config, r: int) -> Config:
    """The config round ``r`` selects with: its batch as the (single) budget, one round."""
    batch = cfg.selection.batch_sizes[r - 1]
    return cfg.replace(**{"selection.budget": batch, "selection.rounds": 1, "selection.round_budgets": None})


def _ids(selections: Sequence[Store]) -> list[str]:
    return [r for s in selections for r in s.read_table(columns=["row_id"]).column("row_id").to_pylist()]


def _gpu_seconds(seconds: float, gpus: float) -> float | None:
    return round(seconds * gpus, 3) if gpus > 0 else None


def run_round(
    cfg: Config,
    r: int,
    *,
    pool: Store,
    scores: Store,
    earlier: Sequence[Store],
    annotated: Sequence[Store],
    adapter: Store | None,
    out: Store,
    progress: bool = True,
) -> dict:
    """Round ``r`` of ``cfg.selection.rounds`` (module docstring) into the folder ``out``.

    ``scores``: the base model's scores of the pool (round 1 selects on them); ``earlier``: the
    ``selection.parquet`` of rounds 1 .. r-1 and ``annotated`` their ``annotated.parquet``;
    ``adapter``: round r-1's ``train/adapter`` (None in round 1). Returns the round's summary."""
    sel = cfg.selection
    R, batch = sel.rounds, sel.batch_sizes[r - 1]
    if not 1 <= r <= R:
        raise ValueError(f"round {r} is not one of the {R} rounds of selection.rounds={R}")
    t_round = time.perf_counter()
    chosen_ids = _ids(earlier)
    if len(set(chosen_ids)) != len(chosen_ids):
        raise RuntimeError(f"rounds 1..{r - 1} picked {len(chosen_ids) - len(set(chosen_ids))} rows twice")
    selector = get_selector(sel.name, **_split_params(sel.name, sel.params or {})[0])
    compute: dict[str, float] = {}
    gpus: dict[str, float | None] = {}
    summary: dict = {"round": r, "rounds": R, "batch": batch, "chosen_before": len(chosen_ids), "selector": sel.name}

    # 1. scores: the base model's in round 1, the remaining rows re-scored with the last adapter after
    chosen_emb = None
    if r == 1:
        round_scores = scores
        summary["scores"] = scores.uri
    else:
        if adapter is None:
            raise ValueError(f"round {r} re-scores with round {r - 1}'s adapter: pass it (rounds/{r - 1}/train/adapter)")
        round_scores = out.child("scores.parquet")
        embed = out.child("chosen.parquet") if selector.uses_chosen else None
        marker = out.child(RESCORING)
        if marker.exists():  # an earlier attempt of this round finished re-scoring: keep it
            scored = marker.read_json()
        else:
            t0 = time.perf_counter()
            scored = score_pool(
                cfg,
                pool,
                round_scores,
                out.child("score_quarantine.jsonl"),
                progress=progress,
                adapter=adapter,
                chosen=chosen_ids,
                chosen_out=embed,
            )
            scored["seconds"] = round(time.perf_counter() - t0, 3)
            marker.write_json(scored)
        compute["scoring"] = scored["seconds"]
        gpus["scoring"] = _gpu_seconds(scored["seconds"], float(scored.get("gpus_per_actor") or 0) * scored.get("actors", 1))
        summary["rescored"] = {
            k: scored.get(k)
            for k in ("rows_in", "rows_scored", "rows_quarantined", "rows_embedded", "rows_resumed", "rows_per_s")
        }
        summary["scores"] = round_scores.uri
        if scored["rows_scored"] < batch and not sel.allow_budget_over_pool:
            raise UserError(
                f"round {r} of selection.rounds={R} has {scored['rows_scored']} rows left to pick from, fewer than its "
                f"batch of {batch}: lower selection.budget (or selection.round_budgets), or set "
                "selection.allow_budget_over_pool=true to take what is left"
            )
        if embed is not None:
            chosen_emb = _embeddings(embed, sel.embedding)

    # 2. this round's batch, among the rows not chosen yet, started from the chosen ones
    t0 = time.perf_counter()
    target = out.child("selection.parquet")
    picked = select_subset(round_config(cfg, r), round_scores, target, progress=progress, chosen=chosen_emb)
    table = target.read_table()
    if set(table.column("row_id").to_pylist()) & set(chosen_ids):
        raise RuntimeError(f"round {r} picked rows an earlier round chose: its scores must hold the remaining rows only")
    target.write_table(table.append_column("round", pa.array(np.full(table.num_rows, r, np.int64))).cast(ROUND_SCHEMA))
    compute["selection"] = round(time.perf_counter() - t0, 3)
    summary.update(
        picked=table.num_rows,
        pool_rows=picked["rows"],
        objective=picked.get("objective"),
        selection={k: v for k, v in picked.items() if k not in ("output", "params")},
        output=target.uri,
    )

    # 3. annotate the batch and finetune, unless this is the last round (the train stage does that)
    if r < R:
        ann = annotate(cfg, target, pool, out.child("annotated.parquet"), out)
        summary["annotated"] = ann.get("rows")
        init = None
        if sel.round_training == "continue" and r > 1:
            data, init = out.child("annotated.parquet"), adapter
        elif r == 1:
            data = out.child("annotated.parquet")
        else:  # restart: from the base model on every row chosen so far
            data = out.child("train_data.parquet")
            data.write_table(pa.concat_tables([a.read_table() for a in [*annotated, out.child("annotated.parquet")]]))
        t0 = time.perf_counter()
        trained = train_sft(cfg, data, out.child("train"), progress=progress, init_adapter=init)
        compute["training"] = round(
            trained.get("wall_time_s", 0.0) if trained.get("skipped") else time.perf_counter() - t0, 3
        )  # a run an earlier attempt finished: its own time
        tc = cfg.training
        per_worker = float(dict(tc.resources_per_worker).get("GPU", 1.0)) if tc.use_gpu else 0.0
        gpus["training"] = _gpu_seconds(compute["training"], per_worker * tc.num_workers)
        summary["train"] = {
            k: trained.get(k) for k in ("steps", "final_loss", "run_name", "init_adapter", "skipped", "examples_truncated")
        }
        summary["train"]["examples"] = len(data.read_table(columns=["row_id"]))
        summary["adapter"] = out.child("train", "adapter").uri
    summary["round_training"] = sel.round_training
    summary["compute_s"] = {k: v for k, v in compute.items() if v is not None}
    gpu = {k: v for k, v in gpus.items() if v is not None}
    if gpu:
        summary["gpu_s"] = gpu
    summary["wall_s"] = round(time.perf_counter() - t_round, 3)
    return summary


def _embeddings(folder: Store, column: str) -> np.ndarray | None:
    """The chosen rows' embeddings (in row_id order) from ``chosen.parquet``; None when none came back."""
    if not folder.parquet_files():
        return None
    t = folder.read_table().sort_by("row_id")
    if column not in t.column_names:
        raise UserError(
            f"selection.embedding={column!r} is not a column of the re-scored chosen rows {folder.uri!r}: "
            "set scoring.encoder for 'embedding_encoder'"
        )
    emb = t.column(column).combine_chunks()
    return emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(t), -1)


def union_selection(cfg: Config, rounds: Sequence[Store], out: Store) -> dict:
    """The rounds' batches, in pick order (round 1 first), as one selection.parquet with each row's round
    (rank = its place in the union). What annotate, train and evaluate read, like a one-shot selection."""
    t0 = time.perf_counter()
    tables = [s.read_table() for s in rounds]
    union = pa.concat_tables(tables).cast(ROUND_SCHEMA)
    ids = union.column("row_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"the rounds picked {len(ids) - len(set(ids))} rows twice: re-run them with --force")
    union = union.set_column(union.schema.get_field_index("rank"), "rank", pa.array(np.arange(len(ids), dtype=np.int64)))
    out.write_table(union)
    batches = [t.num_rows for t in tables]
    return {
        "selector": cfg.selection.name,
        "rounds": len(rounds),
        "batches": batches,
        "budget": len(ids),
        "round_training": cfg.selection.round_training,
        "seed": cfg.selection.seed,
        "embedding": cfg.selection.embedding,
        "output": out.uri,
        "compute_s": {"selection": round(time.perf_counter() - t0, 3)},
    }


def last_batch(annotated: Store, selection: Store, out: Store) -> Store:
    """The annotated rows of the last round's batch (what ``round_training: continue`` trains on), in ``out``."""
    ids = pa.array(selection.read_table(columns=["row_id"]).column("row_id").to_pylist(), pa.string())
    t = annotated.read_table()
    out.write_table(t.filter(pc.is_in(t["row_id"], value_set=ids)))
    return out
