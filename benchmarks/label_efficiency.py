"""The label-efficiency experiment: selectors vs random across annotation budgets.

    python benchmarks/label_efficiency.py            # reduced CPU version (2 cores, ~25 min)
    python benchmarks/label_efficiency.py --gpu      # the full experiment (one or more GPUs)
    python benchmarks/label_efficiency.py --tiny     # seconds-scale check of the harness (tiny Llama)
    python benchmarks/label_efficiency.py --dry-run  # print the config and the trial count only

Full version: builtin:tasks pool of 20,000 prompts (+ its 280-prompt balanced eval split), budgets
1%, 2.5%, 5%, 10%, 20% of the pool, 7 selectors (random, uncertainty with mean_entropy and with
min_margin, k_center, facility_location, the facility-location + uncertainty hybrid and
task_balanced), 3 seeds, SmolLM2-135M-Instruct with LoRA: 7 x 5 x 3 = 105 Tune trials.

Reduced CPU version (the default), sized for 2 cores: a 400-prompt pool and a 28-prompt eval
split, budgets 2%, 5%, 10% (8, 20, 40 prompts), 2 selectors (random, facility_location), 1 seed,
DDP with 2 workers, at most 6 optimizer steps of 2 x 4 sequences of <= 96 tokens, 8 new tokens for
scoring and evaluation: 6 trials. One seed and 28 eval prompts give no interval and little power:
it exercises the whole experiment and shows the direction of the effect, not a significant one.

The run goes through the pipeline (ingest -> score -> sweep -> report, each skipped when already
done with the same config, so an interrupted run resumes), then copies the report, the plots and
results.parquet to ``benchmarks/results/label_efficiency_<mode>*``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from edsft.config import Config, config_from_dict  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"

# The selectors of the paper's comparison; `uncertainty` appears twice through its score grid.
FULL_SELECTORS = ["random", "uncertainty", "k_center", "facility_location", "fl_uncertainty", "task_balanced"]
FULL_PARAMS = {"uncertainty": {"score": ["mean_entropy", "min_margin"]}, "fl_uncertainty": {"score": "mean_entropy"}}


def _budgets(pool_size: int, fractions: list[float]) -> list[int]:
    return [max(1, round(pool_size * f)) for f in fractions]


def build_config(mode: str, out_dir: str) -> Config:
    """The experiment's config for ``mode`` in {gpu, cpu, tiny}."""
    if mode == "gpu":
        size = 20_000
        data = {
            "pool": {"path": "builtin:tasks", "size": size, "eval_size": 280},
            "scoring": {"model": "builtin:smollm2-135m", "max_new_tokens": 24, "batch_size": 64, "num_actors": 1,
                        "num_gpus_per_actor": 1.0, "cpus_per_actor": 2},
            "training": {"backend": "deepspeed", "zero_stage": 2, "num_workers": 1, "use_gpu": True,
                         "resources_per_worker": {"CPU": 4, "GPU": 1}, "max_seq_len": 256, "micro_batch_size": 16,
                         "epochs": 3, "lr": 2e-4},
            "evaluation": {"max_new_tokens": 24, "batch_size": 64},
            "sweep": {"selectors": FULL_SELECTORS, "params": FULL_PARAMS,
                      "budgets": _budgets(size, [0.01, 0.025, 0.05, 0.10, 0.20]), "seeds": [0, 1, 2]},
        }
    elif mode == "cpu":
        # Measured on the 2-core box: LoRA steps of SmolLM2-135M cost ~10 s each at 4 x 96 tokens
        # per worker, scoring ~1-2 prompts/s; this fits ~25 minutes.
        size = 400
        data = {
            "pool": {"path": "builtin:tasks", "size": size, "eval_size": 28},
            "scoring": {"model": "builtin:smollm2-135m", "max_new_tokens": 8, "batch_size": 16, "num_actors": 2,
                        "cpus_per_actor": 0.5},
            # 0.95 CPU a worker: the trial itself holds sweep.cpus_per_trial of the 2 CPUs.
            "training": {"backend": "ddp", "num_workers": 2, "resources_per_worker": {"CPU": 0.95},
                         "max_seq_len": 96, "micro_batch_size": 4, "epochs": 2, "max_steps": 6, "lr": 3e-4},
            "evaluation": {"max_new_tokens": 8, "batch_size": 14, "max_examples": 28},
            "sweep": {"selectors": ["random", "facility_location"],
                      "budgets": _budgets(size, [0.02, 0.05, 0.10]), "seeds": [0]},
        }
    elif mode == "tiny":
        size = 120
        data = {
            "pool": {"path": "builtin:tasks", "size": size, "eval_size": 28},
            "scoring": {"model": "builtin:tiny-llama", "max_new_tokens": 4, "batch_size": 32, "num_actors": 1,
                        "cpus_per_actor": 0.5},
            "training": {"backend": "ddp", "num_workers": 1, "resources_per_worker": {"CPU": 1}, "max_seq_len": 64,
                         "micro_batch_size": 8, "max_steps": 2},
            "evaluation": {"max_new_tokens": 4, "max_examples": 28},
            "sweep": {"selectors": ["random", "k_center"], "budgets": [8, 16], "seeds": [0]},
        }
    else:
        raise ValueError(f"mode={mode!r} is not one of ['gpu', 'cpu', 'tiny']")
    data["selection"] = {"name": "facility_location", "mode": "auto"}
    data["sweep"].update({"enabled": True, "metric": "exact_match"})
    data["output"] = {"dir": out_dir, "progress": mode != "tiny"}
    return config_from_dict(data)


def trial_count(cfg: Config) -> int:
    from edsft.distributed.sweep import expand_grid

    return len(expand_grid(cfg)[0])


def publish(run_dir: Path, mode: str, dest: Path = RESULTS_DIR) -> list[Path]:
    """Copy the report, plots and results of a finished run to ``benchmarks/results``."""
    dest.mkdir(parents=True, exist_ok=True)
    prefix = f"label_efficiency_{mode}"
    written = []
    report = run_dir / "report"
    for f in sorted(report.glob("*")):
        target = dest / (f"{prefix}.md" if f.name == "report.md" else f"{prefix}_{f.name}")
        if f.name == "report.md":  # plots sit next to the report under new names
            text = f.read_text()
            for p in report.glob("*.png"):
                text = text.replace(f"]({p.name})", f"]({prefix}_{p.name})")
            target.write_text(text)
        else:
            shutil.copyfile(f, target)
        written.append(target)
    res = run_dir / "sweep" / "results.parquet"
    shutil.copyfile(res, dest / f"{prefix}_results.parquet")
    written.append(dest / f"{prefix}_results.parquet")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--gpu", action="store_true", help="the full experiment (GPU cluster)")
    g.add_argument("--tiny", action="store_true", help="a seconds-scale check with the tiny Llama")
    ap.add_argument("--out", default=None, help="run folder (default runs/label_efficiency_<mode>; s3:// works)")
    ap.add_argument("--dry-run", action="store_true", help="print the config and the number of trials, run nothing")
    ap.add_argument("--no-publish", action="store_true", help="do not copy results to benchmarks/results")
    args = ap.parse_args(argv)
    mode = "gpu" if args.gpu else "tiny" if args.tiny else "cpu"
    out = args.out or str(ROOT / "runs" / f"label_efficiency_{mode}")
    cfg = build_config(mode, out)
    n = trial_count(cfg)
    print(f"[benchmark] mode={mode} pool={cfg.pool.size} budgets={list(cfg.sweep.budgets)} seeds={list(cfg.sweep.seeds)} "
          f"trials={n} run={out}", flush=True)
    if args.dry_run:
        from edsft.config import to_yaml

        print(to_yaml(cfg))
        return 0
    from edsft.pipeline import run_pipeline

    t0 = time.time()
    results = run_pipeline(cfg)
    wall = time.time() - t0
    report = results["report"].get("summary", {})
    print(f"[benchmark] done in {wall / 60:.1f} min: {json.dumps(report.get('headline', {}), default=str)}", flush=True)
    if not args.no_publish and not out.startswith("s3://"):
        for p in publish(Path(out), mode):
            print(f"[benchmark] wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
