"""The label-efficiency experiment (issue 13): which selector matches random with half the labels?

    python benchmarks/label_efficiency.py              # the CPU experiment (2 cores; see the estimate)
    python benchmarks/label_efficiency.py --gpu        # the same grid, full selector set, on a GPU
    python benchmarks/label_efficiency.py --tiny       # a couple of minutes: the harness end to end (tiny Llama)
    python benchmarks/label_efficiency.py --dry-run    # the plan, trial count and a time estimate; runs nothing
    python benchmarks/label_efficiency.py --pools tasks --seeds 0 1   # a subset
    python benchmarks/label_efficiency.py --coverage   # no training: family coverage of every selector's picks
    python benchmarks/label_efficiency.py --pools tasks --selectors facility_location typiclust \
        --budgets 32 64 128 256 512 1024 2048 --random-budgets 4096   # the learning regime (finished trials reused)

Design, fixed before any selector result is looked at:

* pools: ``builtin:tasks`` (5,000 prompts, 560 balanced eval prompts = 28 per family; exact match is
  the headline metric) and ``builtin:pydocs`` (the free-text pool: 3,140 prompts, 311 eval prompts;
  loss and ROUGE-L);
* budgets 32, 64, 128, 256, 512 (16x) for every selector, random also at 1,024 and 2,048 so every
  selector budget has a random-equivalent budget inside random's measured curve;
* seeds 0, 1, 2 for every (selector, budget); the seed drives selection, LoRA init and data order;
* one training recipe for every selector at a budget (on CPU without LoRA dropout, see build_config): ``RECIPE.epochs`` passes over the B examples,
  but never fewer than ``RECIPE.min_steps`` optimizer steps (at 32 labels two epochs are 4 steps, which
  teach the answer format of the easiest family and little else); run as ``training.max_steps``, the
  same for every selector at that budget;
* the report: B / B_random per budget with 95% bootstrap intervals over seeds and eval prompts
  (edsft.report); savings are claimed only where an interval excludes 1, a single seed gets no
  headline, and task-aware selectors (task_balanced reads the task labels) are reported apart from
  the headline.

Resumable: ingest and score are skipped when done with the same config; each budget is its own Tune
sweep in the same run folder (its recipe differs), and finished trials return their result.json when
re-run, so an interrupted run continues where it stopped. Across machines: every finished
trial (result, metrics, per-prompt predictions, manifest) goes to the committed archive
``benchmarks/results/label_efficiency_<mode>_<pool>_trials.parquet`` (after each budget, and on
``--publish-partial``); a run on a fresh machine re-ingests and re-scores, restores the archived trials
whose trial config and pool/score hashes match, and runs only the rest. Results and the ablation table
(selector x budget: mean and interval, ratio and interval) go to
``benchmarks/results/label_efficiency_<mode>_<pool>.md`` (+ ``_results.parquet``, ``_intervals.csv``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from edsft.config import Config, config_from_dict  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"

# Selectors that read the pool's task labels: reported, never the headline (it must work without them).
TASK_AWARE = ("task_balanced",)
# The label-free candidates for small budgets plus the paper's diversity baselines.
CPU_SELECTORS = ("random", "dedup", "typiclust", "probcover", "facility_location", "k_center")
GPU_SELECTORS = (
    "random",
    "dedup",
    "typiclust",
    "probcover",
    "facility_location",
    "k_center",
    "fl_uncertainty",
    "uncertain_k_center",
    "uncertainty",
    "task_balanced",
)
GPU_PARAMS = {"uncertainty": {"score": ["mean_entropy", "max_entropy", "least_confidence", "min_margin"]}}
# Measured on this 2-core machine in the experiment itself (2026-12-02, B=32 sweep, two trials side by
# side, one core each; the CPU fast paths of issue 12, no LoRA dropout): per trial 24 steps in 76-88 s
# with start-up, 560 eval prompts in 323-359 s. As serial throughput of the 2 cores:
CPU_S_PER_STEP = 1.6  # SmolLM2-135M + LoRA, micro batch 8, ~50 tokens per example (3.2 s per trial-step / 2)
CPU_EVAL_PROMPTS_PER_S = 3.3  # greedy generation of up to 16 new tokens plus the teacher-forced loss (2 x 1.65)


@dataclass(frozen=True)
class Recipe:
    """Epochs over the B examples with a floor on optimizer steps (one recipe for every selector)."""

    epochs: float = 2.0
    min_steps: int = 24

    def steps(self, budget: int, global_batch: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * budget / global_batch))


@dataclass(frozen=True)
class Plan:
    """One pool's experiment."""

    pool: str  # tasks | pydocs
    metric: str
    budgets: tuple[int, ...]
    random_budgets: tuple[int, ...]  # random only: beyond the largest selector budget
    seeds: tuple[int, ...]
    selectors: tuple[str, ...]
    params: dict = field(default_factory=dict)
    recipe: Recipe = Recipe()
    # issue 17: multi-round active learning beside the one-shot design. Every selector runs one-shot;
    # round_selectors also run at each R > 1 of rounds (same pool, budgets, seeds and recipe).
    rounds: tuple[int, ...] = (1,)
    round_selectors: tuple[str, ...] = ()


def plans(
    mode: str,
    pools=("tasks", "pydocs"),
    seeds=None,
    selectors=None,
    rounds=None,
    round_selectors=None,
    budgets=None,
    random_budgets=None,
) -> list[Plan]:
    if mode == "tiny":
        base = dict(
            budgets=(8, 16),
            random_budgets=(32,),
            seeds=(0, 1),
            selectors=("random", "dedup", "typiclust", "probcover"),
            recipe=Recipe(epochs=1.0, min_steps=2),
        )
    else:
        base = dict(
            budgets=(32, 64, 128, 256, 512),
            random_budgets=(1024, 2048),
            seeds=(0, 1, 2),
            selectors=GPU_SELECTORS if mode == "gpu" else CPU_SELECTORS,
            params=GPU_PARAMS if mode == "gpu" else {},
            recipe=Recipe(epochs=2.0, min_steps=24),
        )
    if seeds is not None:
        base["seeds"] = tuple(seeds)
    if budgets is not None:
        base["budgets"] = tuple(sorted(set(budgets)))
    # random-only budgets are those beyond the selectors' (random runs at every selector budget anyway)
    base["random_budgets"] = tuple(
        sorted(set(base["random_budgets"] if random_budgets is None else random_budgets) - set(base["budgets"]))
    )
    if base["random_budgets"] and max(base["random_budgets"]) < 2 * max(base["budgets"]):
        # a selector at the largest budget that saves half the labels matches random at twice it:
        # without random measured there, the best the report can say is "> max / B"
        print(
            f"[benchmark] note: random's largest budget {max(base['random_budgets'])} is under twice the largest "
            f"selector budget {max(base['budgets'])}: a 0.5x saving there cannot be measured",
            flush=True,
        )
    if rounds is not None:
        base["rounds"] = tuple(dict.fromkeys([1, *rounds]))
        # uncertainty re-scored by each round's model: the classic active learner (issue 17's pairing)
        base["round_selectors"] = tuple(round_selectors or ("uncertainty",))
    if selectors is not None:
        base["selectors"] = tuple(dict.fromkeys(["random", *selectors]))
        base["params"] = {k: v for k, v in base.get("params", {}).items() if k in base["selectors"]}
    metric = {"tasks": "exact_match", "pydocs": "loss"}
    out = []
    for p in pools:
        sel = base["selectors"]
        if p == "pydocs":  # no task families worth balancing: the task-aware selectors have nothing to use
            sel = tuple(s for s in sel if s not in TASK_AWARE)
        out.append(Plan(pool=p, metric=metric[p], **{**base, "selectors": sel}))
    return out


def build_config(mode: str, pool: str, out_dir: str, embedding: str = "embedding") -> Config:
    """The run's config (ingest, score and the sweeps' shared sections) for ``mode`` in {cpu, gpu, tiny}."""
    path = {"tasks": "builtin:tasks", "pydocs": "builtin:pydocs"}[pool]
    if mode == "tiny":
        data = {
            "pool": {"path": path, "size": 300, "eval_size": 40},
            "scoring": {
                "model": "builtin:tiny-llama",
                "max_new_tokens": 4,
                "batch_size": 32,
                "num_actors": 1,
                "cpus_per_actor": 0.5,
            },
            "training": {
                "backend": "ddp",
                "num_workers": 1,
                "resources_per_worker": {"CPU": 0.95},
                "max_seq_len": 64,
                "micro_batch_size": 8,
                "lr": 3e-4,
            },
            "evaluation": {"max_new_tokens": 4, "batch_size": 20},
        }
        if pool == "pydocs":  # the whole pydocs train split is scored: keep the eval split tiny
            data["pool"]["eval_size"] = 20
    elif mode == "gpu":
        data = {
            "pool": {"path": path, "size": 20_000, "eval_size": 560},
            "scoring": {
                "model": "builtin:smollm2-135m",
                "max_new_tokens": 24,
                "batch_size": 64,
                "num_actors": 1,
                "num_gpus_per_actor": 1.0,
                "cpus_per_actor": 2,
            },
            "training": {
                "backend": "deepspeed",
                "zero_stage": 2,
                "num_workers": 1,
                "use_gpu": True,
                "resources_per_worker": {"CPU": 4, "GPU": 1},
                "max_seq_len": 256,
                "micro_batch_size": 16,
                "lr": 2e-4,
            },
            "evaluation": {"max_new_tokens": 24, "batch_size": 64, "num_gpus_per_actor": 1.0},
        }
    elif mode == "cpu":
        data = {
            "pool": {"path": path, "size": 5_000, "eval_size": 560},
            "scoring": {
                "model": "builtin:smollm2-135m",
                "max_new_tokens": 16,
                "batch_size": 16,
                "num_actors": 2,
                "cpus_per_actor": 0.5,
                # MiniLM as a second embedding column (a minute on 5,000 prompts): the embedding ablation
                # needs no second scoring pass
                "encoder": "builtin:minilm",
            },
            # two trials side by side on two cores, one worker each
            "training": {
                "backend": "ddp",
                "num_workers": 1,
                "resources_per_worker": {"CPU": 0.95},
                "max_seq_len": 128,
                "micro_batch_size": 8,
                "lr": 3e-4,
                # no LoRA dropout (torchtune's LoRA recipes train without it): masking the inputs of
                # SmolLM2's 210 LoRA modules was a quarter of a CPU step (2.44 vs 1.83 s, profiled),
                # and at 4-256 optimizer steps there is little to regularise
                "lora_dropout": 0.0,
            },
            "evaluation": {"max_new_tokens": 16, "batch_size": 16},
        }
        if pool == "pydocs":
            # 64-row generation batches (today's default: 0.6-0.7x the time of 16 on CPU). builtin:tasks
            # keeps the 16 its archived trials ran with: in bf16 the batch a row is generated in moves
            # near-ties, so it is part of every trial's hash and changing it would re-run them all.
            data["scoring"]["batch_size"] = data["evaluation"]["batch_size"] = 64
    else:
        raise ValueError(f"mode={mode!r} is not one of ['cpu', 'gpu', 'tiny']")
    data["selection"] = {"name": "random", "mode": "local", "embedding": embedding}
    data["sweep"] = {"enabled": True}
    data["output"] = {"dir": out_dir, "progress": mode != "tiny"}
    return config_from_dict(data)


def global_batch(cfg: Config) -> int:
    t = cfg.training
    return t.micro_batch_size * t.grad_accum * t.num_workers


def sweeps(cfg: Config, plan: Plan) -> list[Config]:
    """One sweep per budget: the budget's recipe as training.max_steps, the same for every selector.

    With plan.rounds beyond 1, a second sweep per selector budget runs plan.round_selectors at every
    round count (its random trials are the first sweep's: same trial config, reused, not re-run)."""
    out = []
    gb = global_batch(cfg)
    multi = [r for r in plan.rounds if r != 1]
    for b in list(plan.budgets) + list(plan.random_budgets):
        sel = list(plan.selectors) if b in plan.budgets else ["random"]
        todo = [(sel, [1])]
        if multi and b in plan.budgets and plan.round_selectors:
            rsel = list(plan.round_selectors)
            # a round selector the one-shot sweep does not run gets its one-shot trial here
            todo.append((rsel, [1, *multi] if any(s not in sel for s in rsel) else multi))
        for selectors, rounds in todo:
            out.append(
                cfg.replace(
                    **{
                        "sweep.selectors": selectors,
                        "sweep.budgets": [b],
                        "sweep.seeds": list(plan.seeds),
                        "sweep.rounds": rounds,
                        "sweep.metric": plan.metric,
                        "sweep.params": {k: v for k, v in plan.params.items() if k in selectors},
                        "training.max_steps": plan.recipe.steps(b, gb),
                    }
                )
            )
    return out


def unique_trials(frames) -> object:
    """The sweeps' result tables as one, each trial once (a random trial appears in both of a budget's sweeps)."""
    import pandas as pd

    results = pd.concat(frames, ignore_index=True)
    return results.drop_duplicates("trial_id", keep="first").reset_index(drop=True)


def planned_trials(cfg: Config, plan: Plan) -> list[tuple[dict, Config]]:
    """Every planned trial once, as (trial spec, its sweep's config): a random trial that appears in
    both of a budget's sweeps (one-shot and rounds) is the same trial, run once."""
    from edsft.distributed.sweep import expand_grid

    out, seen = [], set()
    for c in sweeps(cfg, plan):
        for spec in expand_grid(c)[0]:
            if spec["name"] not in seen:
                seen.add(spec["name"])
                out.append((spec, c))
    return out


def trial_count(cfg: Config, plan: Plan) -> tuple[int, int]:
    """(trials, optimizer steps in all)."""
    trials = planned_trials(cfg, plan)
    # a multi-round trial trains once per round on the labels chosen so far (restart): on average
    # about (R + 1) / 2 times the one-shot steps
    steps = sum(c.training.max_steps * (s["rounds"] + 1) // 2 if s["rounds"] > 1 else c.training.max_steps for s, c in trials)
    return len(trials), steps


def estimate_hours(cfg: Config, plan: Plan, pool_rows: int, eval_rows: int) -> float:
    """CPU wall time from this machine's measured throughput (2 trials side by side on 2 cores do not
    run faster than one after another: both are compute-bound)."""
    n, steps = trial_count(cfg, plan)
    # each round after the first re-scores the rest of the pool with that round's model
    rescores = sum(s["rounds"] - 1 for s, _ in planned_trials(cfg, plan))
    prompts = (n + 1) * eval_rows + (1 + rescores) * pool_rows
    s = steps * CPU_S_PER_STEP + prompts / CPU_EVAL_PROMPTS_PER_S
    return s / 3600


def run_plan(
    mode: str, plan: Plan, out_root: Path, publish_dir: Path | None, embedding: str = "embedding", score_only: bool = False
) -> dict:
    import pyarrow as pa

    from edsft import report as R
    from edsft.distributed.sweep import run_sweep
    from edsft.pipeline import Run, run_stage, run_trial

    out = out_root / f"label_efficiency_{mode}_{plan.pool}"
    cfg = build_config(mode, plan.pool, str(out), embedding)
    t0 = time.time()
    run_stage(cfg, "ingest", skip_done=True)
    run_stage(cfg, "score", skip_done=True)
    if score_only:
        return {"wall_s": time.time() - t0}
    archive = archive_path(publish_dir or RESULTS_DIR, mode, plan.pool)
    restore_trials(cfg, plan, archive)  # trials finished on an earlier machine are not run again
    run = Run.open(cfg).store
    parts = []
    for c in sweeps(cfg, plan):  # a re-run computes only its unfinished trials
        s = run_sweep(c, run, progress=cfg.output.progress, trial_runner=run_trial)
        if publish_dir is not None:  # what finished is committed before the next budget starts
            archive_trials(cfg, plan, archive)
        b = c.sweep.budgets[0]
        multi = [r for r in c.sweep.rounds if r != 1]
        part = run.child("sweep", f"results_b{b}" + (f"_r{'-'.join(map(str, multi))}" if multi else "") + ".parquet")
        part.write_table(run.child("sweep", "results.parquet").read_table())
        parts.append(part.read_table().to_pandas())
        print(
            f"[benchmark] {plan.pool} B={b} rounds={list(c.sweep.rounds)}: {s['finished']}/{s['trials']} trials finished "
            f"({s['computed']} computed now), max_steps={c.training.max_steps}",
            flush=True,
        )
    results = unique_trials(parts)
    run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(results, preserve_index=False))
    rep = R.build_report(run, metric=plan.metric)
    wall = time.time() - t0
    tables = ablation(run, results, plan)
    print(f"[benchmark] {plan.pool}: {rep['headline']['text']}", flush=True)
    if publish_dir is not None:
        publish(run, results, tables, mode, plan, cfg, wall, publish_dir)
    return {"headline": rep["headline"], "label_free_headline": tables["headline"], "wall_s": wall, "trials": len(results)}


# --------------------------------------------------------------------------------------------
# The trial archive: finished trials committed with the results, so the experiment continues on
# another machine (a session's machine does not outlive it; a trial here takes minutes to hours)
# --------------------------------------------------------------------------------------------

# what an archived trial carries (result.json last: it is the trial's commit)
ARCHIVE_COLUMNS = ("trial_id", "trial_hash", "parent", "result", "metrics", "manifest", "predictions")
# per eval prompt: what the bootstrap resamples, plus the answer itself for a look (prompts and
# references are the pool's, rebuilt by ingest)
PREDICTION_KEYS = ("row_id", "variant", "task", "prediction", "exact_match", "rouge_l", "loss_sum", "n_tokens")
BASE_ID = "_base_metrics"


def archive_path(dest: Path, mode: str, pool: str) -> Path:
    return dest / f"label_efficiency_{mode}_{pool}_trials.parquet"


def _read_archive(path: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    if not path.exists():
        return {}
    return {r["trial_id"]: r for r in pq.read_table(path).to_pylist()}


def archive_trials(cfg: Config, plan: Plan, path: Path) -> dict:
    """Add every planned trial that has finished in the run folder (its stages committed for the run's
    current pool and scores) to the archive at ``path``, with the base model's metrics; trials already
    archived stay. Written to a temporary name and renamed: never half-written."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from edsft.distributed.sweep import finished_result, parent_commits, trial_config
    from edsft.pipeline import Run, trial_run, trial_stages, why_not_done

    run = Run.open(cfg)
    parent = parent_commits(run.store)
    rows = _read_archive(path)
    added = 0
    for spec, c in planned_trials(cfg, plan) if parent is not None else []:
        trial = run.store.child("sweep", "trials", spec["name"])
        tcfg = trial_config(c, spec, trial)
        rec = finished_result(trial, tcfg, parent)
        if rec is None and trial.child("result.json").exists():
            # a result.json from before it recorded the parent's hashes: archived only if every stage
            # of the trial is still committed against the run's current pool and scores
            child = trial_run(tcfg, run.store.uri)
            if all(why_not_done(child, name) is None for name in trial_stages(tcfg)):
                rec = {**trial.child("result.json").read_json(), "parent": parent}
        if rec is None:
            continue
        preds = [{k: r.get(k) for k in PREDICTION_KEYS if k in r} for r in trial.child("predictions.jsonl").read_jsonl()]
        added += spec["name"] not in rows
        rows[spec["name"]] = {
            "trial_id": spec["name"],
            "trial_hash": rec["trial_hash"],
            "parent": json.dumps(parent, sort_keys=True),
            "result": json.dumps(rec, default=str),
            "metrics": json.dumps(trial.child("metrics.json").read_json(), default=str),
            "manifest": json.dumps(trial.child("manifest.json").read_json(), default=str),
            "predictions": "\n".join(json.dumps(r, default=str) for r in preds),
        }
    base = run.store.child("sweep", "base_metrics.json")
    if base.exists():
        b = base.read_json()
        rows[BASE_ID] = {k: None for k in ARCHIVE_COLUMNS} | {
            "trial_id": BASE_ID,
            "trial_hash": b.get("config_hash"),
            "result": json.dumps(b, default=str),
        }
    if not rows:
        return {"archived": 0, "added": 0, "path": str(path)}
    table = pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=pa.schema([(c, pa.string()) for c in ARCHIVE_COLUMNS]))
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    n = sum(1 for k in rows if k != BASE_ID)
    print(f"[benchmark] archive {path.name}: {n} finished trials ({added} new)", flush=True)
    return {"archived": n, "added": added, "path": str(path)}


def restore_trials(cfg: Config, plan: Plan, path: Path) -> int:
    """Write the archived trials of this plan into the run folder, as the sweep's own finished trials:
    only those archived for this trial config and the run's current pool and scores, and only into a
    trial folder no trial has started in. The sweep then reuses them (edsft.distributed.sweep:
    finished_result) and the report reads them like any other. Returns how many were restored."""
    from edsft.distributed.sweep import parent_commits, trial_config, trial_hash
    from edsft.pipeline import Run

    rows = _read_archive(path)
    run = Run.open(cfg)
    base = rows.get(BASE_ID)
    target = run.store.child("sweep", "base_metrics.json")
    if base is not None and not target.exists():
        target.write_json(json.loads(base["result"]))  # the sweep checks its config hash itself
    parent = parent_commits(run.store)
    if parent is None:
        return 0
    restored = 0
    for spec, c in planned_trials(cfg, plan):
        row = rows.get(spec["name"])
        trial = run.store.child("sweep", "trials", spec["name"])
        if row is None or json.loads(row["parent"]) != parent or trial.child("events.jsonl").exists():
            continue
        if row["trial_hash"] != trial_hash(trial_config(c, spec, trial)):
            continue  # the recipe changed since: the trial runs again
        trial.child("metrics.json").write_json(json.loads(row["metrics"]))
        trial.child("manifest.json").write_json(json.loads(row["manifest"]))
        trial.child("predictions.jsonl").write_jsonl(json.loads(r) for r in row["predictions"].splitlines() if r)
        trial.child("events.jsonl").write_jsonl([{"event": "restored", "time": time.time(), "archive": path.name}])
        trial.child("result.json").write_json(json.loads(row["result"]))
        restored += 1
    if restored:
        print(f"[benchmark] restored {restored} finished trials from {path.name}", flush=True)
    return restored


def publish_partial(mode: str, plan: Plan, out_root: Path, publish_dir: Path, embedding: str = "embedding") -> dict:
    """Publish the trials that have finished so far (read from the trial folders, safe while the
    experiment runs: the run gets only archived trials that no trial folder holds), of the budgets
    whose every planned trial has finished, and add the finished trials to the trial archive. The
    table says how many of the planned trials it holds."""
    from edsft.distributed.sweep import trial_results
    from edsft.pipeline import Run

    out = out_root / f"label_efficiency_{mode}_{plan.pool}"
    cfg = build_config(mode, plan.pool, str(out), embedding)
    t0 = time.time()
    archive = archive_path(publish_dir, mode, plan.pool)
    restore_trials(cfg, plan, archive)  # only into trial folders no trial has started in
    archive_trials(cfg, plan, archive)
    run = Run.open(cfg).store
    results = unique_trials([trial_results(c, run).to_pandas() for c in sweeps(cfg, plan)])
    results = results[results["status"] == "TERMINATED"].reset_index(drop=True)
    # complete budgets only: a budget with some seeds or selectors still running would enter the
    # comparison with fewer seeds than the others (one seed: no interval at all)
    planned = {}
    for spec, _ in planned_trials(cfg, plan):
        planned.setdefault(spec["budget"], set()).add(spec["name"])
    done = set(results["trial_id"])
    complete = [b for b, names in planned.items() if names <= done]
    dropped = int((~results["budget"].isin(complete)).sum())
    results = results[results["budget"].isin(complete)].reset_index(drop=True)
    if dropped:
        print(f"[benchmark] {plan.pool}: {dropped} finished trial(s) of budgets still running left out", flush=True)
    if results.empty:
        print(f"[benchmark] {plan.pool}: no trial has finished yet", flush=True)
        return {"trials": 0}
    tables = ablation(run, results, plan)
    # every planned trial finished (e.g. over several machines): the full report, not a partial one
    partial = len(results) < sum(len(names) for names in planned.values())
    print(
        f"[benchmark] {plan.pool} ({'partial, ' if partial else ''}{len(results)} trials): {tables['headline']['text']}",
        flush=True,
    )
    publish(run, results, tables, mode, plan, cfg, time.time() - t0, publish_dir, partial=partial, from_trials=True)
    return {"trials": len(results), "label_free_headline": tables["headline"]}


def ablation(run, results, plan: Plan) -> dict:
    """The ablation table (selector x budget: mean [t-interval], B / B_random [bootstrap interval]) and
    the headline among the label-free selectors only."""
    from edsft import report as R

    res = R.load_results(results)
    examples = R.per_example_results(run.store if hasattr(run, "store") else run, res)
    out = {"metrics": {}}
    metrics = [plan.metric] + [m for m in R.METRICS if m != plan.metric and m in res.columns and res[m].notna().any()]
    for m in metrics:
        summ = R.summarize(res, m)
        eff = R.label_efficiency(summ, m)
        boot = R.bootstrap_label_efficiency(res, m, examples)
        out["metrics"][m] = {"summary": summ, "eff": eff, "boot": boot}
    free = res[~res["selector"].isin(TASK_AWARE)]
    eff_free = R.label_efficiency(R.summarize(free, plan.metric), plan.metric)
    boot_free = R.bootstrap_label_efficiency(free, plan.metric, examples)
    out["headline"] = R.significance_headline(boot_free, plan.metric, eff_free)
    pb = out["metrics"][plan.metric]["boot"]["per_budget"]
    worse = pb[pb["lo"] > 1]
    out["worse"] = {label: g["budget"].tolist() for label, g in worse.groupby("label")}
    return out


def publish(
    run,
    results,
    tables,
    mode: str,
    plan: Plan,
    cfg: Config,
    wall: float,
    dest: Path,
    partial: bool = False,
    from_trials: bool = False,
) -> list[Path]:
    """benchmarks/results/label_efficiency_<mode>_<pool>{.md, _results.parquet, _intervals.csv}.
    ``from_trials``: published from the finished trials' folders (--publish-partial), so the time
    stated is the trials' own wall time summed, not this call's."""
    import os
    import platform

    from edsft import report as R

    dest.mkdir(parents=True, exist_ok=True)
    prefix = dest / f"label_efficiency_{mode}_{plan.pool}"
    results.to_parquet(f"{prefix}_results.parquet", index=False)
    main = tables["metrics"][plan.metric]
    main["boot"]["per_budget"].to_csv(f"{prefix}_intervals.csv", index=False)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    n, steps = trial_count(cfg, plan)
    lines = [
        f"# Label efficiency: {cfg.pool.path} ({mode}{', PARTIAL' if partial else ''})",
        "",
        *(
            [
                f"**Partial: {len(results)} of {n} planned trials have finished**; the experiment is still running "
                "(resumable). Budgets whose random-equivalent lies beyond random's finished curve have no ratio yet.",
                "",
            ]
            if partial
            else []
        ),
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        + (
            f"trial wall time so far {results['wall_s'].sum() / 3600:.1f} h."
            if partial
            else f"trial wall time {results['wall_s'].sum() / 3600:.1f} h (every trial's own, summed)."
            if from_trials
            else f"wall {wall / 60:.1f} min."
        ),
        "",
        f"**Headline (label-free selectors, {plan.metric}).** {tables['headline']['text']}",
        "",
        "| | |",
        "|---|---|",
        f"| pool | `{cfg.pool.path}`, {cfg.pool.size if plan.pool == 'tasks' else 'all'} prompts, {cfg.pool.eval_size} eval prompts (balanced by task) |",
        f"| model | `{cfg.scoring.model}`, LoRA r={cfg.training.lora_r}, dropout {cfg.training.lora_dropout:g} |",
        f"| selectors | {', '.join(plan.selectors)} (task-aware, not in the headline: {', '.join(s for s in plan.selectors if s in TASK_AWARE) or 'none'}) |",
        f"| embedding | `selection.embedding: {cfg.selection.embedding}` ("
        + (
            "MiniLM sentence embeddings"
            if cfg.selection.embedding == "embedding_encoder"
            else "the scoring model's mean-pooled hidden state"
        )
        + ", what the diversity selectors read; `--embedding`) |",
        f"| budgets | {', '.join(map(str, plan.budgets))}; random also {', '.join(map(str, plan.random_budgets))} |",
        f"| seeds | {', '.join(map(str, plan.seeds))} |",
        *(
            [
                f"| rounds | one-shot for every selector; {', '.join(plan.round_selectors)} also at R = {', '.join(str(r) for r in plan.rounds if r != 1)} (restart training each round) |"
            ]
            if len(plan.rounds) > 1
            else []
        ),
        f"| recipe | {plan.recipe.epochs:g} epochs, at least {plan.recipe.min_steps} optimizer steps, global batch {global_batch(cfg)}, lr {cfg.training.lr:g}: "
        + ", ".join(f"B={c.sweep.budgets[0]}: {c.training.max_steps}" for c in sweeps(cfg, plan))
        + " steps |",
        f"| trials | {len(results)} ({n} planned, {steps} optimizer steps) |",
        f"| intervals | means: 95% t over seeds; B / B_random: 95% bootstrap over {main['boot']['resampled']} ({main['boot']['n_boot']} resamples), per cell, not adjusted for multiplicity |",
        "",
    ]
    if tables["worse"]:
        lines += [
            "Significantly MORE labels than random (interval above 1): "
            + "; ".join(f"{k} at B={', '.join(map(str, v))}" for k, v in sorted(tables["worse"].items())),
            "",
        ]
    if len(plan.rounds) > 1:  # issue 17: labels saved against random and compute spent against one-shot
        csum = R.compute_summary(R.load_results(results))
        lines += [
            f"## One-shot design vs {', '.join(str(r) for r in plan.rounds if r != 1)}-round active learning ({plan.metric})",
            "",
            "Labels: B / B_random [95% bootstrap interval]; compute: mean seconds per trial (scoring of the pool "
            "included; each later round re-scores the rest of it) and that over the same selector's one-shot trial.",
            "",
            R.design_table(csum, main["boot"]),
            "",
        ]
    figures = []
    for m, t in tables["metrics"].items():
        # the learning curves with their intervals: where people would rather look than read
        png = Path(f"{prefix}_{m}.png")
        fig = R.plot_learning_curves(t["summary"], m)
        import matplotlib.pyplot as plt  # after the plot chose its backend (Agg when headless)

        fig.savefig(png, bbox_inches="tight")
        plt.close(fig)
        figures.append(png)
        lines += [
            f"## {m} ({R.metric_label(m)}; {'higher' if R.higher_is_better(m) else 'lower'} is better)",
            "",
            f"![{m} vs budget, mean and 95% t-interval over seeds]({png.name})",
            "",
            "Mean [95% t-interval] (seeds); B / B_random at the mean:",
            "",
            R.markdown_table(t["summary"], t["eff"]),
            "",
            "B / B_random [95% bootstrap interval]:",
            "",
            R.interval_table(t["boot"]),
            "",
        ]
    Path(f"{prefix}.md").write_text("\n".join(lines) + "\n")
    written = [Path(f"{prefix}.md"), Path(f"{prefix}_results.parquet"), Path(f"{prefix}_intervals.csv"), *figures]
    for p in written:
        print(f"[benchmark] wrote {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}", flush=True)
    return written


# --------------------------------------------------------------------------------------------
# Why diversity loses at small budgets: family coverage vs frequency of the picked sets (no training)
# --------------------------------------------------------------------------------------------

COVERAGE_SELECTORS = ("random", "dedup", "typiclust", "probcover", "facility_location", "k_center")


def pool_embeddings(n: int, cache: Path, kinds=("minilm", "smollm2_last"), chunk: int = 250):
    """builtin:tasks rows (prompt as ingest builds it) and their embeddings: MiniLM sentence embeddings
    and SmolLM2's mean-pooled last-layer prompt embedding (the scorer's own; one new token generated).
    Cached per kind and per chunk of rows under ``cache`` (npy), so an interrupted run keeps its
    progress. Returns (tasks, {kind: float32 (n, d)}) for the kinds that are complete."""
    import numpy as np

    from edsft.pools.builtin_tasks import iter_tasks

    rows = [r for chunk_ in iter_tasks(n, seed=0, split="train") for r in chunk_]
    prompts = [f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"] for r in rows]
    tasks = np.array([r["task"] for r in rows])
    cache.mkdir(parents=True, exist_ok=True)
    embs = {}
    for kind in kinds:
        model = None
        parts = []
        for s in range(0, n, chunk):
            f = cache / f"{kind}_{n}_{s}.npy"
            if not f.exists():
                if model is None:
                    if kind == "minilm":
                        from edsft.scoring.scorer import load_encoder

                        enc = load_encoder("builtin:minilm")
                        model = lambda p: enc.encode(p, batch_size=64, normalize_embeddings=True)  # noqa: E731, B023 - used in this iteration
                    else:
                        from edsft.scoring.scorer import Scorer

                        sc = Scorer("builtin:smollm2-135m", max_new_tokens=1, batch_size=32, device="cpu")
                        model = lambda p: sc({"row_id": np.arange(len(p)), "prompt": np.array(p, dtype=object)})["embedding"]  # noqa: E731, B023 - used in this iteration
                np.save(f, np.asarray(model(prompts[s : s + chunk]), dtype=np.float32))
                print(f"[coverage] {kind}: rows {s}-{min(n, s + chunk)} embedded", flush=True)
            parts.append(np.load(f))
        embs[kind] = np.concatenate(parts)
    return tasks, embs


def coverage_stats(tasks, picks, pool_freq: dict) -> dict:
    """Families covered, families with >= 3 picks, share of the picks in the 3 most frequent families
    (pool share for comparison), total-variation distance of the picked family mix to the pool's."""
    import numpy as np

    fam, cnt = np.unique(tasks[picks], return_counts=True)
    got = dict(zip(fam.tolist(), cnt.tolist()))
    top3 = sorted(pool_freq, key=lambda f: -pool_freq[f])[:3]
    share = {f: got.get(f, 0) / len(picks) for f in pool_freq}
    return {
        "covered": len(got),
        "ge3": sum(c >= 3 for c in got.values()),
        "top3": sum(share[f] for f in top3),
        "tv": 0.5 * sum(abs(share[f] - pool_freq[f]) for f in pool_freq),
    }


def coverage_analysis(
    n: int = 5000,
    budgets=(32, 64, 128, 256, 512),
    seeds=(0, 1, 2),
    out: Path | None = None,
    cache: Path = ROOT / "runs" / "label_efficiency_coverage",
    kinds=("minilm", "smollm2_last"),
) -> str:
    """Family coverage vs frequency of every selector's picks on builtin:tasks, per embedding (mean over
    seeds; deterministic selectors still vary with the seed where they are randomized). Also the picks'
    density: median distance to the 20 nearest pool rows, relative to the pool's median (1 = typical,
    > 1 = outliers). Writes a markdown table; selection never reads the task labels, this analysis does."""
    import os

    import numpy as np

    from edsft.selection import select, typicality

    t0 = time.time()
    load0 = os.getloadavg()
    tasks, embs = pool_embeddings(n, cache, kinds)
    fam, cnt = np.unique(tasks, return_counts=True)
    pool_freq = dict(zip(fam.tolist(), (cnt / cnt.sum()).tolist()))
    top3 = sorted(pool_freq, key=lambda f: -pool_freq[f])[:3]
    lines = [
        f"# Why diversity loses at small budgets: family coverage of the picks (builtin:tasks, {n} prompts)",
        "",
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start {load0[0]:.1f}. No training: "
        "the picked sets only. Task labels are read by this analysis, never by the selectors.",
        "",
        f"Pool: {len(fam)} families; the 3 most frequent ({', '.join(top3)}) hold {sum(pool_freq[f] for f in top3):.0%} of it; "
        f"the rarest holds {min(pool_freq.values()):.1%}.",
        "",
        "Cell: families covered / families with >= 3 picks / share of picks in the top-3 families / total-variation "
        "distance of the picked family mix to the pool's / density of the picks (median 20-NN distance over the pool's "
        "median: > 1 = sparser than a typical prompt). Mean over seeds " + ", ".join(map(str, seeds)) + ".",
        "",
    ]
    for name, X in embs.items():
        typ = typicality(X, 20)
        pool_med = float(np.median(1 / typ))
        lines += [
            f"## embedding: {name} (d={X.shape[1]})",
            "",
            "| selector | " + " | ".join(f"B={b}" for b in budgets) + " | s (B=512) |",
            "|---" * (len(budgets) + 2) + "|",
        ]
        for sel in COVERAGE_SELECTORS:
            cells, secs = [], float("nan")
            for b in budgets:
                st = []
                for sd in seeds:
                    t1 = time.time()
                    idx = select(sel, b, embeddings=X, seed=sd).indices
                    secs = time.time() - t1
                    st.append({**coverage_stats(tasks, idx, pool_freq), "density": float(np.median(1 / typ[idx])) / pool_med})
                m = {k: np.mean([x[k] for x in st]) for k in st[0]}
                cells.append(f"{m['covered']:.1f} / {m['ge3']:.1f} / {m['top3']:.0%} / {m['tv']:.2f} / {m['density']:.2f}")
            lines.append(f"| {sel} | " + " | ".join(cells) + f" | {secs:.1f} |")
        lines.append("")
    lines.append(
        f"Wall {(time.time() - t0) / 60:.1f} min (embeddings cached in {cache.relative_to(ROOT) if cache.is_relative_to(ROOT) else cache}); "
        f"load average at the end {os.getloadavg()[0]:.1f}."
    )
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--gpu", action="store_true", help="the full selector set on a GPU")
    g.add_argument("--tiny", action="store_true", help="a couple of minutes: the harness end to end with the tiny Llama")
    ap.add_argument("--pools", nargs="+", choices=["tasks", "pydocs"], default=["tasks", "pydocs"])
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="override the seeds (>= 2 for a headline)")
    ap.add_argument("--selectors", nargs="+", default=None, help="override the selectors (random is always added)")
    ap.add_argument("--budgets", nargs="+", type=int, default=None, help="override the budgets every selector runs at")
    ap.add_argument(
        "--random-budgets",
        nargs="+",
        type=int,
        default=None,
        help="override the budgets only random runs at (keep >= 2x the largest --budgets: a 0.5x saving needs it)",
    )
    ap.add_argument("--out", default=None, help="parent folder of the run folders (default runs/)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, the trial count and a time estimate only")
    ap.add_argument("--coverage", action="store_true", help="no training: family coverage vs frequency of every selector's picks")
    ap.add_argument(
        "--embeddings",
        nargs="+",
        choices=["minilm", "smollm2_last"],
        default=["minilm", "smollm2_last"],
        help="--coverage: which embeddings (SmolLM2 costs ~10x MiniLM on CPU)",
    )
    ap.add_argument(
        "--embedding",
        choices=["embedding", "embedding_encoder"],
        default="embedding",
        help="what the diversity selectors read: the scoring model's mean-pooled hidden state or the MiniLM encoder's",
    )
    ap.add_argument(
        "--rounds",
        nargs="+",
        type=int,
        default=None,
        help="issue 17: also run --round-selectors with this many active-learning rounds (e.g. 2 4; 1 is always run)",
    )
    ap.add_argument(
        "--round-selectors",
        nargs="+",
        default=None,
        help="the selectors that get --rounds (default: uncertainty; name the best one-shot selector too)",
    )
    ap.add_argument("--score-only", action="store_true", help="ingest and score only (the sweeps can start later)")
    ap.add_argument(
        "--publish-partial",
        action="store_true",
        help="publish the trials finished so far (safe while the experiment runs in another process)",
    )
    ap.add_argument("--no-publish", action="store_true", help="do not write benchmarks/results")
    ap.add_argument("--publish-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    mode = "gpu" if args.gpu else "tiny" if args.tiny else "cpu"
    if args.coverage:
        dest = None if args.no_publish else Path(args.publish_dir) / "label_efficiency_coverage.md"
        print(coverage_analysis(out=dest, kinds=tuple(args.embeddings)))
        return 0
    out_root = Path(args.out or ROOT / "runs")
    summary = {}
    for plan in plans(
        mode, args.pools, args.seeds, args.selectors, args.rounds, args.round_selectors, args.budgets, args.random_budgets
    ):
        cfg = build_config(mode, plan.pool, str(out_root / f"label_efficiency_{mode}_{plan.pool}"), args.embedding)
        n, steps = trial_count(cfg, plan)
        rows = cfg.pool.size if plan.pool == "tasks" else 3140
        est = (
            f", about {estimate_hours(cfg, plan, rows, cfg.pool.eval_size):.1f} h on 2 CPU cores at the measured speed"
            if mode == "cpu"
            else ""
        )
        print(
            f"[benchmark] mode={mode} pool={cfg.pool.path} selectors={list(plan.selectors)} budgets={list(plan.budgets)} "
            f"(+ random {list(plan.random_budgets)}) seeds={list(plan.seeds)}"
            + (f" rounds={list(plan.rounds)} for {list(plan.round_selectors)}" if len(plan.rounds) > 1 else "")
            + f": {n} trials, {steps} optimizer steps{est}",
            flush=True,
        )
        if args.dry_run:
            continue
        if args.publish_partial:
            summary[plan.pool] = publish_partial(mode, plan, out_root, Path(args.publish_dir), args.embedding)
            continue
        res = run_plan(mode, plan, out_root, None if args.no_publish else Path(args.publish_dir), args.embedding, args.score_only)
        if not args.score_only:
            summary[plan.pool] = res
    if summary and not args.publish_partial:
        print(
            json.dumps(
                {
                    k: {"headline": v["label_free_headline"]["text"], "wall_min": round(v["wall_s"] / 60, 1)}
                    for k, v in summary.items()
                },
                indent=1,
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
