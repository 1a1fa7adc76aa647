"""Selection benchmark: edsft vs apricot (facility location) and vs a textbook numpy k-center.

Same data (Gaussian blobs), same machine, same run. Every configuration runs in its own subprocess so
peak RSS (resource.getrusage) is that configuration's alone; wall time and CPU time (process_time,
all threads) are both reported because the machine may be shared. Writes a markdown table to
benchmarks/results/selection.md and the raw rows to benchmarks/results/selection.json.

    .venv/bin/python benchmarks/selection.py            # the full grid (~15 min cap)
    .venv/bin/python benchmarks/selection.py --quick    # small sizes only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def blobs(n: int, d: int, seed: int = 0, k: int = 50) -> np.ndarray:
    """Clustered float32 data, generated in chunks so 1M x 384 never needs a float64 copy."""
    r = np.random.default_rng(seed)
    centers = (r.normal(size=(k, d)) * 3).astype(np.float32)
    X = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        X[s : s + m] = centers[r.integers(k, size=m)] + r.standard_normal((m, d), dtype=np.float32)
    return X


def textbook_k_center(X: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """The plain loop from the papers: distances to the newest center, running min, argmax."""
    first = int(np.random.default_rng(seed).integers(len(X)))
    picks = [first]
    mind = np.linalg.norm(X - X[first], axis=1)
    for _ in range(budget - 1):
        j = int(np.argmax(mind))
        picks.append(j)
        mind = np.minimum(mind, np.linalg.norm(X - X[j], axis=1))
    return np.array(picks)


def fl_objective(X, idx) -> float:
    from edsft.selection import best_similarity

    return float(best_similarity(X, X[np.asarray(idx)], "cosine").sum())


def run_one(cfg: dict) -> dict:
    """One (method, size) cell; runs inside its own process."""
    import edsft.selection  # noqa: F401  (import time is not selection time)

    X = blobs(cfg["n"], cfg["d"])
    B, method = cfg["budget"], cfg["method"]
    if method.startswith("apricot"):
        from apricot import FacilityLocationSelection

        # numba compiles on first use: warm up on a tiny problem so compile time is not counted
        FacilityLocationSelection(5, metric="cosine", optimizer="lazy").fit(X[:100].astype(np.float64))
        FacilityLocationSelection(5, metric="precomputed", optimizer="naive").fit(np.ones((50, 50)))
    w0, c0 = time.perf_counter(), time.process_time()
    if method in ("edsft-fl-lazy", "edsft-fl-naive", "edsft-fl-stochastic", "edsft-fl-sparse-lazy"):
        from edsft.selection import select

        opt = method.split("-")[-1]
        extra = {"dense_max_n": 0} if "sparse" in method else {"dense_max_n": 10**9}
        res = select("facility_location", B, embeddings=X, metric="cosine", optimizer=opt, **extra)
        idx = res.indices
    elif method in ("apricot-lazy", "apricot-naive"):
        # apricot's own cosine similarity (its transform is 1 - (1 - cos)^2 ... see apricot.utils)
        from apricot import FacilityLocationSelection

        sel = FacilityLocationSelection(B, metric="cosine", optimizer=method.split("-")[1]).fit(X.astype(np.float64))
        idx = sel.ranking
    elif method in ("apricot-pre-lazy", "apricot-pre-naive"):
        # apricot's greedy on exactly edsft's similarity (clipped cosine, float64): same objective
        from apricot import FacilityLocationSelection

        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        K = np.maximum(Xn @ Xn.T, 0).astype(np.float64)
        sel = FacilityLocationSelection(B, metric="precomputed", optimizer=method.split("-")[2]).fit(K)
        del K
        idx = sel.ranking
    elif method == "edsft-kcenter":
        from edsft.selection import select

        idx = select("k_center", B, embeddings=X, metric="euclidean", seed=0).indices
    elif method == "numpy-kcenter":
        idx = textbook_k_center(X, B, seed=0)
    else:
        raise ValueError(method)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if "kcenter" in method:
        from edsft.selection import min_distance

        obj = float(min_distance(X, X[idx], "euclidean").max())
    else:
        obj = fl_objective(X, idx)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    return {**cfg, "wall_s": wall, "cpu_s": cpu, "peak_rss_gib": rss, "objective": obj, "n_picked": len(idx)}


def grid(quick: bool, headline: bool = False) -> list[dict]:
    """Cells in priority order (the time cap skips the tail): the headline comparison first."""
    fl, kc = "facility_location", "k_center"
    if headline:
        return [
            {"family": fl, "n": 20000, "d": 64, "budget": 1000, "method": m}
            for m in ("edsft-fl-lazy", "apricot-lazy", "edsft-fl-naive", "apricot-pre-lazy")
        ]
    if quick:
        return [
            {"family": fl, "n": 5000, "d": 64, "budget": 100, "method": m}
            for m in ("edsft-fl-lazy", "edsft-fl-naive", "apricot-lazy", "apricot-pre-lazy")
        ]
    cells = [
        {"family": fl, "n": 20000, "d": 64, "budget": 1000, "method": m}
        for m in ("edsft-fl-lazy", "edsft-fl-naive", "edsft-fl-stochastic", "apricot-lazy", "apricot-pre-lazy")
    ]
    cells += [{"family": kc, "n": 100_000, "d": 384, "budget": 1000, "method": m} for m in ("edsft-kcenter", "numpy-kcenter")]
    cells += [{"family": fl, "n": 100_000, "d": 64, "budget": 1000, "method": "edsft-fl-sparse-lazy"}]
    cells += [{"family": kc, "n": 1_000_000, "d": 384, "budget": 100, "method": "edsft-kcenter"}]
    cells += [{"family": fl, "n": 1_000_000, "d": 384, "budget": 100, "method": "edsft-fl-sparse-lazy"}]
    for n, d, B in ((5000, 64, 100), (5000, 64, 1000), (5000, 384, 1000), (20000, 384, 1000), (20000, 64, 100)):
        methods = ["edsft-fl-lazy", "edsft-fl-naive", "apricot-lazy", "apricot-pre-lazy"]
        if n <= 5000 and B <= 100:
            methods.append("apricot-naive")  # naive apricot is O(B n^2): only the smallest cell
        cells += [{"family": fl, "n": n, "d": d, "budget": B, "method": m} for m in methods]
    for n, d, B in ((5000, 64, 1000), (20000, 384, 1000)):
        cells += [{"family": kc, "n": n, "d": d, "budget": B, "method": m} for m in ("edsft-kcenter", "numpy-kcenter")]
    cells += [{"family": kc, "n": 1_000_000, "d": 384, "budget": 1000, "method": "edsft-kcenter"}]
    cells += [{"family": fl, "n": 1_000_000, "d": 384, "budget": 1000, "method": "edsft-fl-sparse-lazy"}]
    return cells


def machine() -> str:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, load average at start {load:.1f}"


def table(rows: list[dict]) -> str:
    """Markdown table; speed-ups are reference time / edsft time in the same (family, n, d, budget) cell."""
    refs = ("apricot-lazy", "apricot-pre-lazy", "numpy-kcenter")
    ref = {}
    for r in rows:
        if r["method"] in refs and r.get("wall_s") is not None:
            ref.setdefault((r["family"], r["n"], r["d"], r["budget"]), {})[r["method"]] = r
    out = [
        "| family | n | d | budget | method | wall s | cpu s | peak RSS GiB | objective | "
        "vs apricot-lazy: wall x, cpu x, objective ratio | vs apricot-pre-lazy: wall x, cpu x, objective ratio | "
        "vs numpy k-center: wall x, cpu x, radius ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['family']} | {r['n']} | {r['d']} | {r['budget']} | {r['method']} |"
        if r.get("wall_s") is None:
            out.append(f"{head} {r['status']} | | | | | | |")
            continue
        cols = []
        for m in refs:
            o = ref.get((r["family"], r["n"], r["d"], r["budget"]), {}).get(m)
            if o is None or o is r or r["method"] in refs:
                cols.append("")
            else:
                cols.append(
                    f"{o['wall_s'] / r['wall_s']:.1f}x, {o['cpu_s'] / r['cpu_s']:.1f}x, {r['objective'] / o['objective']:.5f}"
                )
        out.append(
            f"{head} {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_gib']:.2f} | {r['objective']:.6g} | "
            + " | ".join(cols)
            + " |"
        )
    return "\n".join(out)


def load_note(header: str) -> str:
    """What the load average at the start says about the wall times (it is printed in the header)."""
    try:
        load = float(header.split("load average at start ")[1].split(";")[0])
    except (IndexError, ValueError):
        return "Machine load unknown."
    if load < 1.5:
        return f"Quiet machine (load average {load:.1f} at start, nothing else scheduled): wall times are comparable."
    return (
        f"Shared machine (load average {load:.1f} at start): other jobs ran on the same cores, so wall times are "
        "noisy and inflated and cpu s is the fairer comparison."
    )


def render(header: str, rows: list[dict]) -> str:
    return (
        "# Selection benchmark\n\n"
        + header
        + "\n\n"
        + load_note(header)
        + " cpu s is the process CPU time over all threads. Each cell ran in its own process (peak RSS is that cell's). Objective: facility location = "
        "sum over the pool of the best clipped-cosine similarity to the picks (edsft's objective, higher is "
        "better) for every method's picks; k-center = covering radius (lower is better). apricot-lazy = "
        "apricot's own pipeline on the raw float64 data (its cosine transform and pairwise matrix); "
        "apricot-pre-lazy = apricot's lazy greedy on edsft's exact similarity passed as a precomputed float64 "
        "matrix (same objective; building that matrix is not timed for apricot, it is for edsft).\n\n" + table(rows) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--headline", action="store_true", help="only the n=20k, d=64, budget=1000 comparison")
    ap.add_argument("--table-from", help="re-render the markdown table from a results JSON")
    ap.add_argument("--one", help="internal: run one JSON cell and print the JSON result")
    ap.add_argument("--cell-timeout", type=float, default=420.0)
    ap.add_argument("--total-timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=str(RESULTS / "selection"))
    args = ap.parse_args()
    if args.table_from:  # re-render a finished run
        data = json.loads(Path(args.table_from).read_text())
        Path(args.out + ".md").write_text(render(data["machine"], data["rows"]))
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    started = time.perf_counter()
    header = f"machine: {machine()}; date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    print(header, flush=True)
    rows = []
    for cfg in grid(args.quick, args.headline):
        left = args.total_timeout - (time.perf_counter() - started)
        if left <= 5:
            rows.append({**cfg, "status": "skipped (total time cap)"})
            continue
        try:
            p = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(cfg)],
                capture_output=True,
                text=True,
                timeout=min(args.cell_timeout, left),
            )
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(line[-1][7:]) if line else {**cfg, "status": "failed: " + p.stderr.strip()[-200:]}
        except subprocess.TimeoutExpired:
            row = {**cfg, "status": f"timeout > {min(args.cell_timeout, left):.0f}s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    md = render(header, rows)
    Path(args.out + ".md").parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"machine": header, "rows": rows}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
