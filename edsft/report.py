"""The label-efficiency report: learning curves over budgets and the random-equivalent budget.

Reads a sweep's ``results.parquet`` (one row per trial: selector, params, rounds, budget, seed,
metrics, compute) and answers the paper's question: how many labels does random selection need to
match what a selector reaches with B labels? The ratio ``B / B_random`` is the headline (0.5: the same
generalisation as random at half the annotation cost). A curve is a (selector, rounds) pair: with
``sweep.rounds`` the multi-round variants ("uncertainty, 2 rounds") are compared with random like any
selector, and with their own one-shot design on compute (:func:`compute_summary`,
:func:`design_table`, :func:`plot_metric_vs_compute`).

Everything here is pandas/numpy/matplotlib (no torch, no ray) and the math is in small pure
functions (:func:`t_critical`, :func:`summarize`, :func:`random_equivalent_budget`,
:func:`label_efficiency`, :func:`headline`) so it can be tested on hand-made curves.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from .results import METRICS

__all__ = [
    "METRICS",
    "higher_is_better",
    "metric_label",
    "t_critical",
    "load_results",
    "summarize",
    "random_equivalent_budget",
    "label_efficiency",
    "headline",
    "equivalent_budgets",
    "per_example_results",
    "bootstrap_label_efficiency",
    "significance_headline",
    "interval_table",
    "plot_learning_curves",
    "plot_label_efficiency",
    "plot_metric_vs_compute",
    "compute_summary",
    "compute_table",
    "design_table",
    "markdown_table",
    "build_report",
]

_LOWER_IS_BETTER = {"loss"}
_LABELS = {
    "exact_match": "exact match (fraction of eval prompts)",
    "rouge_l": "ROUGE-L F1 (0-1)",
    "loss": "eval loss (nats / response token)",
}
_GROUP_COLS = ["selector", "params", "rounds", "budget"]
_COMPUTE_KINDS = ("scoring", "selection", "training", "evaluation")  # edsft.compute.KINDS (the result columns)


def higher_is_better(metric: str) -> bool:
    """Loss-like metrics go down when the model gets better; everything else goes up."""
    base = metric.removeprefix("base_")
    return not (base in _LOWER_IS_BETTER or base.endswith("loss") or base.endswith("perplexity"))


def metric_label(metric: str) -> str:
    """Axis label with units."""
    return _LABELS.get(metric.removeprefix("base_"), metric)


# --------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------

# Two-sided 95% Student-t critical values t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)


def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t critical value. Exact table for 95% and df <= 30; beyond, the
    Cornish-Fisher expansion around the normal quantile (error < 1e-4 for df > 30)."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1: a t-interval needs at least 2 seeds")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    if abs(confidence - 0.95) < 1e-12 and df <= len(_T975):
        return _T975[df - 1]
    z = _normal_quantile(0.5 + confidence / 2)
    # Cornish-Fisher terms (Abramowitz & Stegun 26.7.5).
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, refined by one Newton step)."""
    a = (
        -3.969683028665376e01,
        2.209460984245205e02,
        -2.759285104469687e02,
        1.383577518672690e02,
        -3.066479806614716e01,
        2.506628277459239e00,
    )
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
    c = (
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e00,
        -2.549732539343734e00,
        4.374664141464968e00,
        2.938163982698783e00,
    )
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    lo, hi = 0.02425, 1 - 0.02425
    if p < lo:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    elif p <= hi:
        q = p - 0.5
        r = q * q
        x = (
            (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
            * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
        )
    else:
        q = math.sqrt(-2 * math.log(1 - p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    e = 0.5 * math.erfc(-x / math.sqrt(2)) - p
    return x - e * math.sqrt(2 * math.pi) * math.exp(x * x / 2)


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def load_results(source: Any) -> pd.DataFrame:
    """A sweep's results as a DataFrame, from a Store, a path, or a DataFrame.

    Only finished trials count (``status`` TERMINATED when the column exists); ``params`` is
    kept as its JSON string so that hybrid(lambda_=0.3) and hybrid(lambda_=0.7) stay apart."""
    if isinstance(source, pd.DataFrame):
        df = source.copy()
    elif hasattr(source, "read_table"):
        df = source.read_table().to_pandas()
    else:
        df = pd.read_parquet(source)
    missing = [c for c in ("selector", "budget", "seed") if c not in df.columns]
    if missing:
        raise ValueError(f"results are missing columns {missing}: pass a sweep's results.parquet (run/sweep/results.parquet)")
    if "status" in df.columns:
        df = df[df["status"].isin(["TERMINATED", "DONE", "OK"])]
    if "params" not in df.columns:
        df["params"] = "{}"
    df["params"] = df["params"].fillna("{}").astype(str)
    df["budget"] = df["budget"].astype(int)
    return _with_rounds(df).reset_index(drop=True)


def _with_rounds(df: pd.DataFrame) -> pd.DataFrame:
    """Results from before ``sweep.rounds`` (or made by hand) are one-shot: rounds = 1."""
    if "rounds" in df.columns and df["rounds"].notna().all():
        return df.assign(rounds=df["rounds"].astype(int))
    rounds = df["rounds"].fillna(1) if "rounds" in df.columns else 1
    return df.assign(rounds=pd.Series(rounds, index=df.index).astype(int))


def _label(selector: str, params: str, rounds: int = 1) -> str:
    """Display name: the selector, plus its hyperparameters when any were swept, plus its round count
    when it is not the one-shot design ("uncertainty, 2 rounds")."""
    p = json.loads(params) if params else {}
    name = selector if not p else f"{selector}(" + ", ".join(f"{k}={v}" for k, v in sorted(p.items())) + ")"
    return name if int(rounds) == 1 else f"{name}, {int(rounds)} rounds"


def summarize(results: pd.DataFrame, metric: str, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and t-interval over seeds of ``metric`` per (selector, params, rounds, budget).

    Columns: selector, params, rounds, label, budget, n, mean, std, lo, hi. With one seed std/lo/hi are
    NaN (no interval can be drawn from one sample) - the plots then draw no band and say so."""
    if metric not in results.columns:
        raise ValueError(
            f"metric={metric!r} is not a column of the results: pick one of {sorted(c for c in results.columns if c in METRICS or c.startswith('base_'))}"
        )
    rows = []
    data = _with_rounds(results.dropna(subset=[metric]))
    for (selector, params, rounds, budget), g in data.groupby(_GROUP_COLS, sort=True):
        x = g[metric].to_numpy(dtype=float)
        n = len(x)
        mean = float(x.mean())
        if n >= 2:
            std = float(x.std(ddof=1))
            half = t_critical(n - 1, confidence) * std / math.sqrt(n)
            lo, hi = mean - half, mean + half
        else:
            std = lo = hi = float("nan")
        rows.append(
            dict(
                selector=selector,
                params=params,
                rounds=int(rounds),
                label=_label(selector, params, rounds),
                budget=int(budget),
                n=n,
                mean=mean,
                std=std,
                lo=lo,
                hi=hi,
            )
        )
    cols = ["selector", "params", "rounds", "label", "budget", "n", "mean", "std", "lo", "hi"]
    return pd.DataFrame(rows, columns=cols).sort_values(["label", "budget"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Label efficiency
# --------------------------------------------------------------------------------------------


def random_equivalent_budget(
    budgets: Iterable[float], values: Iterable[float], target: float, higher_better: bool = True
) -> tuple[float, str]:
    """The budget random needs to reach ``target``, from random's mean curve.

    Piecewise-linear interpolation in log-budget on the running best of the curve (random's
    curve can dip between budgets from seed noise; the running best asks "the smallest budget at
    which random has reached this", which is monotone and so invertible). Returns
    ``(budget, bound)``: bound is "" for an interpolated value, ">" when the target is above
    random's best (budget = random's largest budget: random needs more than that) and "<" when
    the target is below random's smallest-budget value (budget = random's smallest budget).
    """
    b = np.asarray(list(budgets), dtype=float)
    v = np.asarray(list(values), dtype=float)
    if b.size == 0 or b.size != v.size:
        raise ValueError(f"budgets ({b.size}) and values ({v.size}) must be non-empty and of equal length")
    if np.any(b <= 0):
        raise ValueError(f"budgets={b.tolist()} must all be > 0 (the interpolation is in log-budget)")
    if np.any(~np.isfinite(v)) or not math.isfinite(target):
        raise ValueError(f"values={v.tolist()} and target={target} must be finite")
    got, code = equivalent_budgets(b, v[None, :], np.array([target]), higher_better)
    return float(got[0]), _BOUNDS[int(code[0])]


_BOUNDS = {0: "", 1: ">", -1: "<"}


def equivalent_budgets(budgets, curves, targets, higher_better: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`random_equivalent_budget` for many curves at once (the bootstrap's inner loop).

    ``curves`` (R, len(budgets)): random's mean curve in each of R resamples; ``targets`` (R,).
    Returns (budget (R,), code (R,) int: 0 interpolated, 1 above random's best (budget = the largest
    budget), -1 below random's smallest-budget value (budget = the smallest budget)).
    """
    b = np.asarray(budgets, dtype=float)
    order = np.argsort(b)
    b = b[order]
    v = np.asarray(curves, dtype=float)[:, order]
    t = np.asarray(targets, dtype=float)
    if not higher_better:  # one code path: turn "lower is better" into "higher is better"
        v, t = -v, -t
    best = np.maximum.accumulate(v, axis=1)  # running best: "the smallest budget at which random has reached this"
    reached = best >= t[:, None]
    any_reached = reached.any(axis=1)
    i = np.where(any_reached, reached.argmax(axis=1), len(b) - 1)
    rows = np.arange(len(t))
    code = np.where(any_reached, 0, 1)
    first = any_reached & (i == 0)
    code = np.where(first & (v[:, 0] != t), -1, code)
    out = np.where(any_reached, b[np.maximum(i, 0)], b[-1])
    # best[i-1] < target <= best[i] = v[i]: the segment rises and the inverse is unique
    mid = any_reached & (i > 0)
    if mid.any():
        r, k = rows[mid], i[mid]
        lo, hi = best[r, k - 1], best[r, k]
        frac = (t[mid] - lo) / (hi - lo)
        out[mid] = np.exp(np.log(b[k - 1]) + frac * (np.log(b[k]) - np.log(b[k - 1])))
    return out, code


def label_efficiency(summary: pd.DataFrame, metric: str, reference: str = "random") -> pd.DataFrame:
    """For each (non-random) selector and budget B: random's equivalent budget and B / B_random.

    Columns: label, selector, params, budget, mean, random_budget, bound, ratio, ratio_bound.
    ``bound`` qualifies random_budget (">": random needs more than its largest budget, so the
    ratio is an upper bound, ratio_bound "<"; "<": random needs less than its smallest budget,
    ratio_bound ">"; "flat": random's curve does not change with the budget, ratio NaN)."""
    one_shot = summary["rounds"] == 1 if "rounds" in summary.columns else True
    ref = summary[(summary["selector"] == reference) & (summary["params"].isin(["{}", ""])) & one_shot]
    if ref.empty:
        ref = summary[(summary["selector"] == reference) & one_shot]
    if ref.empty:
        raise ValueError(
            f"no {reference!r} rows in the results: the sweep must include the {reference!r} selector (run_sweep adds it)"
        )
    ref = ref.sort_values("budget")
    hib = higher_is_better(metric)
    # random's curve flat (e.g. exact match 0 everywhere): no inverse, every budget "reaches" it
    flat = float(np.ptp(ref["mean"].to_numpy(dtype=float))) <= 1e-12 * max(1.0, float(ref["mean"].abs().max()))
    rows = []
    for _, r in summary[summary["label"] != ref["label"].iloc[0]].iterrows():
        row = dict(label=r["label"], selector=r["selector"], params=r["params"], budget=int(r["budget"]), mean=r["mean"])
        if flat:
            rows.append({**row, "random_budget": float("nan"), "bound": "flat", "ratio": float("nan"), "ratio_bound": ""})
            continue
        rb, bound = random_equivalent_budget(ref["budget"], ref["mean"], float(r["mean"]), hib)
        ratio_bound = {"": "", ">": "<", "<": ">"}[bound]
        rows.append({**row, "random_budget": rb, "bound": bound, "ratio": r["budget"] / rb, "ratio_bound": ratio_bound})
    cols = ["label", "selector", "params", "budget", "mean", "random_budget", "bound", "ratio", "ratio_bound"]
    return pd.DataFrame(rows, columns=cols).sort_values(["label", "budget"]).reset_index(drop=True)


def headline(eff: pd.DataFrame, metric: str) -> dict:
    """The best selector's label-efficiency ratio.

    Per selector: the geometric mean of B / B_random over the budgets where it is interpolated
    (censored budgets - beyond random's range - give only bounds and are counted, not averaged).
    The best selector has the smallest such ratio; a selector with only censored budgets is
    ranked by its bounds after all the others."""
    if eff.empty:
        return {"selector": None, "ratio": None, "text": f"no selector besides random: no label-efficiency ratio for {metric}"}
    per = []
    for label, g in eff.groupby("label"):
        exact = g[g["bound"] == ""]
        if len(exact):
            gm = float(np.exp(np.log(exact["ratio"].to_numpy(dtype=float)).mean()))
            per.append((0, gm, label, gm, len(exact), len(g), ""))
        else:  # only bounds: all "ratio < x" (better than random everywhere) beats all "ratio > x"
            lt = g[g["ratio_bound"] == "<"]
            if len(lt):
                per.append((0, float(lt["ratio"].max()), label, float(lt["ratio"].max()), 0, len(g), "<"))
            else:
                per.append((1, float(g["ratio"].min()), label, float(g["ratio"].min()), 0, len(g), ">"))
    per.sort()
    _, _, label, ratio, n_exact, n, bound = per[0]
    budgets = sorted(eff[eff["label"] == label]["budget"].unique().tolist())
    if bound:
        text = (
            f"{label} is the best selector on {metric}: random never reaches the same value inside the swept "
            f"budgets, so the ratio B / B_random is {bound} {ratio:.2f} (a bound, budgets {budgets})."
        )
    else:
        cost = "less" if ratio < 1 else "more"
        text = (
            f"{label} reaches random's {metric} with {ratio:.2f}x the labels (geometric mean of B / B_random over "
            f"{n_exact} of {n} budgets in {budgets}; {abs(1 - ratio) * 100:.0f}% {cost} annotation than random)."
        )
    return {
        "selector": label,
        "ratio": ratio,
        "bound": bound,
        "budgets_interpolated": n_exact,
        "budgets": budgets,
        "metric": metric,
        "text": text,
    }


# --------------------------------------------------------------------------------------------
# Bootstrap intervals of B / B_random, and the headline they allow
# --------------------------------------------------------------------------------------------

# A per-example results table (one row per finished trial and eval prompt, finetuned model):
EXAMPLE_COLUMNS = ("trial_id", "row_id", "task", "exact_match", "rouge_l", "loss_sum", "n_tokens")


def per_example_results(run, results: pd.DataFrame) -> pd.DataFrame | None:
    """Per-eval-prompt results of every finished trial, from the ``predictions.jsonl`` that evaluation
    writes next to each trial's metrics.json (finetuned rows only), or None when a trial has none
    (then the bootstrap resamples seeds only)."""
    frames = []
    for tid in results["trial_id"] if "trial_id" in results.columns else []:
        rows = [
            r
            for r in run.child("sweep", "trials", str(tid), "predictions.jsonl").read_jsonl()
            if r.get("variant", "finetuned") == "finetuned"
        ]
        if not rows:
            return None
        df = pd.DataFrame(rows)
        df["trial_id"] = tid
        frames.append(df[[c for c in EXAMPLE_COLUMNS if c in df.columns]])
    return pd.concat(frames, ignore_index=True) if frames else None


def _example_arrays(examples: pd.DataFrame, trial_ids: list, metric: str):
    """(tasks, num, den): per task, (n_trials, n_prompts_of_task) numerator and denominator arrays whose
    ratio, averaged over tasks, is the trial's macro metric (loss: token-weighted within a task, as
    evaluation computes it). Only eval prompts that every trial has are kept."""
    if metric == "loss":
        need = ["loss_sum", "n_tokens"]
    elif metric in ("exact_match", "rouge_l"):
        need = [metric]
    else:
        raise ValueError(f"metric={metric!r} has no per-example form: use exact_match, rouge_l or loss")
    ex = examples[examples["trial_id"].isin(trial_ids)].dropna(subset=need)
    common = set.intersection(*(set(g["row_id"]) for _, g in ex.groupby("trial_id"))) if len(ex) else set()
    ex = ex[ex["row_id"].isin(common)]
    if ex.empty or ex["trial_id"].nunique() != len(set(trial_ids)):
        return None
    ex = ex.assign(task=ex["task"].fillna("all").astype(str)).sort_values(["task", "row_id"])
    pos = {t: i for i, t in enumerate(trial_ids)}
    tasks, num, den = [], [], []
    for task, g in ex.groupby("task", sort=True):
        cols = {r: j for j, r in enumerate(sorted(g["row_id"].unique()))}
        N = np.zeros((len(trial_ids), len(cols)))
        D = np.zeros_like(N)
        ti = g["trial_id"].map(pos).to_numpy()
        ci = g["row_id"].map(cols).to_numpy()
        if metric == "loss":
            N[ti, ci] = g["loss_sum"].to_numpy(dtype=float)
            D[ti, ci] = g["n_tokens"].to_numpy(dtype=float)
        else:
            N[ti, ci] = g[metric].to_numpy(dtype=float)
            D[ti, ci] = 1.0
        tasks.append(task)
        num.append(N)
        den.append(D)
    return tasks, num, den


def _endpoint_bounds(code: np.ndarray, q: float) -> tuple[str, str]:
    """Which ends of a percentile interval are bounds rather than values: "<", ">" or "" for (lo, hi).

    A resample censored above random's curve (``code == 1``: random needs more than its largest
    budget) sits at B / B_max minus one ulp, below every uncensored ratio; one censored below
    (``code == -1``) at B / B_min plus one ulp, above them all. So the censored resamples are the
    lowest and the highest of the sorted ratios, and an endpoint whose quantile (linear, as
    ``np.quantile`` interpolates) draws on one of them is that bound, not a measured value: printing
    it as "1.00" would read as an interval touching 1 when it lies strictly below it."""
    n = len(code)
    below, above = int((code == 1).sum()), int((code == -1).sum())

    def mark(p: float) -> str:
        pos = p * (n - 1)
        if math.floor(pos) < below:
            return "<"
        if math.ceil(pos) >= n - above:
            return ">"
        return ""

    return mark(q), mark(1 - q)


def format_interval(r) -> str:
    """``[lo, hi]`` of a per-budget row (a Series, dict or itertuples row), each end with its bound mark."""
    get = r.get if hasattr(r, "get") else lambda k, d=None: getattr(r, k, d)
    marks = [get(k, "") for k in ("lo_bound", "hi_bound")]
    marks = ["" if not isinstance(m, str) else m for m in marks]  # NaN from a CSV written without them
    return f"[{marks[0]}{_ratio_end(get('lo'), marks[0])}, {marks[1]}{_ratio_end(get('hi'), marks[1])}]"


def _ratio_end(v: float, mark: str) -> str:
    """Two decimals, or three where two would print a measured value that is not 1 as "1.00" (an
    interval that excludes 1 by less than 0.005 must not read as if it touched it; a bound has its mark)."""
    text = f"{v:.2f}"
    return f"{v:.3f}" if text == "1.00" and v != 1.0 and not mark else text


def bootstrap_label_efficiency(
    results: pd.DataFrame,
    metric: str,
    examples: pd.DataFrame | None = None,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    reference: str = "random",
) -> dict:
    """B / B_random per (selector, budget) with a percentile bootstrap interval.

    Each of ``n_boot`` resamples draws (1) the eval prompts with replacement, within each task (the
    eval split is balanced by task and the metric is a macro average), the SAME draw for every trial
    (all trials answer the same prompts: the comparison is paired), and (2) independently for every
    (selector, budget) cell, its seeds with replacement; the cell's value is the mean over its drawn
    seeds of each trial's metric on the drawn prompts. Random's resampled curve is inverted at each
    selector's resampled value (:func:`equivalent_budgets`). Without ``examples`` (no per-prompt
    results) only seeds are resampled. A censored resample (outside random's range) counts at its
    bound: B / B_max ("random needs more than it was run with") or B / B_min, both conservative for a
    claim of savings.

    Returns {"per_budget": DataFrame(label, selector, params, budget, ratio, lo, hi, n_seeds,
    n_seeds_random, censored), "per_selector": DataFrame(label, ratio, lo, hi, n_budgets) - the
    geometric mean over budgets - , "resampled": "seeds and eval prompts" | "seeds", "n_boot",
    "confidence", "min_seeds"}.
    """
    res = _with_rounds(results.dropna(subset=[metric]).copy())
    res["label"] = [_label(a, b, r) for a, b, r in zip(res["selector"], res["params"], res["rounds"])]
    ref = res[(res["selector"] == reference) & res["params"].isin(["{}", ""]) & (res["rounds"] == 1)]
    if ref.empty:
        raise ValueError(
            f"no {reference!r} rows in the results: the sweep must include the {reference!r} selector (run_sweep adds it)"
        )
    ref_label = ref["label"].iloc[0]
    if "trial_id" not in res.columns:
        res["trial_id"] = [f"{l}-b{b}-s{s}" for l, b, s in zip(res["label"], res["budget"], res["seed"])]
    trial_ids = res["trial_id"].tolist()
    arrays = _example_arrays(examples, trial_ids, metric) if examples is not None and len(examples) else None
    rng = np.random.default_rng(seed)

    # trial values per resample: (n_trials, n_boot), and the point values (every prompt once)
    if arrays is not None:
        tasks, num, den = arrays
        vals = np.zeros((len(trial_ids), n_boot))
        point = np.zeros(len(trial_ids))
        for N, D in zip(num, den):
            W = rng.multinomial(N.shape[1], np.full(N.shape[1], 1.0 / N.shape[1]), size=n_boot).T.astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                vals += (N @ W) / (D @ W)
                point += N.sum(axis=1) / D.sum(axis=1)
        vals /= len(tasks)
        point /= len(tasks)
        resampled = "seeds and eval prompts"
    else:
        point = res[metric].to_numpy(dtype=float)
        vals = np.repeat(point[:, None], n_boot, axis=1)
        resampled = "seeds"

    cells = {}  # (label, budget) -> (selector, params, resampled cell means (n_boot,), point mean, n seeds)
    for (label, budget), g in res.groupby(["label", "budget"], sort=True):
        rows = res.index.get_indexer(g.index)
        pick = rows[rng.integers(len(rows), size=(n_boot, len(rows)))]  # seeds with replacement
        cells[(label, int(budget))] = (
            g["selector"].iloc[0],
            g["params"].iloc[0],
            vals[pick, np.arange(n_boot)[:, None]].mean(axis=1),
            float(point[rows].mean()),
            len(rows),
        )
    ref_budgets = sorted(b for (l, b) in cells if l == ref_label)
    ref_curves = np.stack([cells[(ref_label, b)][2] for b in ref_budgets], axis=1)
    ref_point = np.array([[cells[(ref_label, b)][3] for b in ref_budgets]])
    ref_seeds = min(cells[(ref_label, b)][4] for b in ref_budgets)
    hib = higher_is_better(metric)
    q = (1 - confidence) / 2
    # A flat random curve (e.g. exact match 0 at every budget) has no inverse: any budget "reaches" it,
    # and the running best would call every tie a win for random at its smallest budget. No ratio then.
    flat = bool(np.ptp(ref_point) <= 1e-12 * max(1.0, float(np.abs(ref_point).max())))
    per_budget, logs = [], {}
    for (label, budget), (selector, params, boot, mean, n_seeds) in cells.items():
        if label == ref_label:
            continue
        row = dict(
            label=label, selector=selector, params=params, budget=budget, mean=mean, n_seeds=n_seeds, n_seeds_random=ref_seeds
        )
        if flat:
            per_budget.append(
                {**row, "ratio": np.nan, "ratio_bound": "", "lo": np.nan, "hi": np.nan, "lo_bound": "", "hi_bound": ""}
                | {"censored": np.nan}
            )
            logs.setdefault(label, []).append(np.full(n_boot, np.nan))
            continue
        rb, code = equivalent_budgets(ref_budgets, ref_curves, boot, hib)
        # A censored resample lies strictly beyond its bound (random needs more than its largest budget,
        # or fewer than its smallest): one ulp off the bound, so that a bound of exactly 1 - the selector
        # beyond random's value at random's own largest or smallest budget - excludes 1 as it should.
        ratio_boot = budget / rb
        ratio_boot = np.where(
            code == 1, np.nextafter(ratio_boot, 0.0), np.where(code == -1, np.nextafter(ratio_boot, np.inf), ratio_boot)
        )
        rb0, code0 = equivalent_budgets(ref_budgets, ref_point, np.array([mean]), hib)
        logs.setdefault(label, []).append(np.log(ratio_boot))
        lo_bound, hi_bound = _endpoint_bounds(code, q)
        per_budget.append(
            {
                **row,
                "ratio": float(budget / rb0[0]),
                "ratio_bound": {0: "", 1: "<", -1: ">"}[int(code0[0])],
                "lo": float(np.quantile(ratio_boot, q)),
                "hi": float(np.quantile(ratio_boot, 1 - q)),
                "lo_bound": lo_bound,
                "hi_bound": hi_bound,
                "censored": float((code != 0).mean()),
            }
        )
    cols = [
        "label",
        "selector",
        "params",
        "budget",
        "mean",
        "ratio",
        "ratio_bound",
        "lo",
        "hi",
        "lo_bound",
        "hi_bound",
        "n_seeds",
        "n_seeds_random",
        "censored",
    ]
    per_budget = pd.DataFrame(per_budget, columns=cols).sort_values(["label", "budget"]).reset_index(drop=True)
    per_sel = []
    for label, ls in sorted(logs.items()):
        g = per_budget[per_budget["label"] == label]
        gm = np.exp(np.mean(ls, axis=0))
        per_sel.append(
            dict(
                label=label,
                ratio=float(np.exp(np.log(g["ratio"]).mean())),
                lo=float(np.quantile(gm, q)),
                hi=float(np.quantile(gm, 1 - q)),
                n_budgets=len(g),
            )
        )
    per_sel = pd.DataFrame(per_sel, columns=["label", "ratio", "lo", "hi", "n_budgets"])
    min_seeds = int(min([ref_seeds] + per_budget["n_seeds"].tolist()))
    return {
        "per_budget": per_budget,
        "per_selector": per_sel,
        "resampled": resampled,
        "n_boot": n_boot,
        "confidence": confidence,
        "min_seeds": min_seeds,
        "flat": flat,
        "random_curve": dict(zip(ref_budgets, ref_point[0].tolist())),
    }


def significance_headline(boot: dict, metric: str, eff: pd.DataFrame | None = None) -> dict:
    """The headline the intervals allow.

    - fewer than 2 seeds in some (selector, budget) cell or in random's curve: no headline (one seed
      has no spread to learn an interval from);
    - some selector's interval lies below 1 at one budget or more: the selector with the most such
      budgets (ties: the smaller geometric-mean ratio) and, at each of them, its ratio and interval;
      its other budgets are named as not significant (interval includes 1) or as significantly worse
      (interval above 1);
    - otherwise: no selector needs significantly fewer labels; the cells whose interval lies above 1
      are named as significantly worse, those whose interval includes 1 as not significant (with
      ratio and interval when there are at most 6 cells), and the closest selector's geometric mean.
    ``ratio`` is the geometric mean of B / B_random over the interpolated budgets (as :func:`headline`);
    ``worse_budgets`` maps each selector to the budgets where it needs significantly more labels.
    """
    pb, ps = boot["per_budget"], boot["per_selector"]
    conf = f"{boot['confidence'] * 100:.0f}%"
    how = f"{conf} bootstrap intervals over {boot['resampled']}, {boot['n_boot']} resamples"
    base = {"metric": metric, "resampled": boot["resampled"], "significant_budgets": [], "interval": None}
    if pb.empty:
        return {
            **base,
            "selector": None,
            "ratio": None,
            "text": f"no selector besides random: no label-efficiency ratio for {metric}",
        }
    if boot.get("flat"):
        curve = ", ".join(f"B={b}: {v:.3g}" for b, v in boot["random_curve"].items())
        return {
            **base,
            "selector": None,
            "ratio": None,
            "text": (
                f"no headline: random's {metric} does not change across its budgets ({curve}), so no budget is "
                f"'random's equivalent' of a selector's value; the metric carries no signal at these budgets."
            ),
        }
    if boot["min_seeds"] < 2:
        return {
            **base,
            "selector": None,
            "ratio": None,
            "text": (
                f"no headline: a single seed per selector and budget gives no interval, and without one a "
                f"difference from random on {metric} cannot be told from seed noise (run >= 2 seeds, e.g. sweep.seeds=[0, 1, 2])."
            ),
        }

    def point_ratio(label):
        if eff is not None and len(eff[eff["label"] == label]):
            exact = eff[(eff["label"] == label) & (eff["bound"] == "")]
            if len(exact):
                return float(np.exp(np.log(exact["ratio"].to_numpy(dtype=float)).mean()))
        return float(ps.set_index("label").loc[label, "ratio"])

    wins, worse = pb[pb["hi"] < 1.0], pb[pb["lo"] > 1.0]
    unclear = pb[(pb["lo"] <= 1.0) & (pb["hi"] >= 1.0)]
    worse_budgets = {label: [int(b) for b in g["budget"]] for label, g in worse.groupby("label", sort=True)}
    detail = len(pb) <= 6  # a small sweep (the demo) gets every cell's ratio and interval in the headline

    def cells(g: pd.DataFrame, values: bool, sep: str = ", ") -> str:
        """One selector's budgets: "B=16: 0.80x [0.50, 1.30], B=64: ..." with values, else "B=16, 64"."""
        g = g.sort_values("budget")
        if values:
            return sep.join(f"B={int(r.budget)}: {r.ratio_bound}{r.ratio:.2f}x {format_interval(r)}" for r in g.itertuples())
        return "B=" + ", ".join(str(int(b)) for b in g["budget"])

    def by_label(sub: pd.DataFrame, values: bool) -> str:
        return "; ".join(f"{label} at {cells(g, values)}" for label, g in sub.groupby("label", sort=True))

    def bound_note(shown: pd.DataFrame) -> str:
        marks = [c for c in ("ratio_bound", "lo_bound", "hi_bound") if c in shown.columns]
        if not any((shown[c].fillna("") != "").any() for c in marks):
            return ""
        return " ('<' / '>': a bound, the selector's value lies beyond random's measured curve)"

    # With two seeds a cell's seed resampling has three distinct draws and its spread is half the
    # seeds' sample variance: the intervals are narrower than the seed-to-seed spread warrants.
    few_seeds = (
        " Two seeds per cell: the bootstrap understates seed-to-seed spread, so read this as indicative and "
        "confirm with >= 3 seeds (sweep.seeds=[0, 1, 2])."
        if boot["min_seeds"] == 2
        else ""
    )

    if len(wins):
        counts = wins.groupby("label").size()
        label = min(counts.index, key=lambda l: (-counts[l], point_ratio(l)))
        w = wins[wins["label"] == label]
        tail = ""
        rest_ns, rest_worse = unclear[unclear["label"] == label], worse[worse["label"] == label]
        if len(rest_ns):
            tail += f"; at {cells(rest_ns, detail)} the difference from random is not significant"
        if len(rest_worse):
            tail += f"; at {cells(rest_worse, True)} it needs significantly more labels than random (interval above 1)"
        text = (
            f"{label} reaches random's {metric} with fewer labels at {len(w)} of {len(pb[pb['label'] == label])} budgets "
            f"(B / B_random, {how}, each excluding 1): {cells(w, True, '; ')}{tail}"
            f"{bound_note(pd.concat([w, rest_worse, rest_ns if detail else rest_ns.iloc[:0]]))}.{few_seeds}"
        )
        return {
            **base,
            "selector": label,
            "ratio": point_ratio(label),
            "significant_budgets": sorted(int(b) for b in w["budget"]),
            "worse_budgets": worse_budgets,
            "interval": [float(w["lo"].min()), float(w["hi"].max())],
            "text": text,
        }
    best = ps.sort_values("ratio").iloc[0]
    parts = []
    if len(worse):
        parts.append(f"significantly MORE labels than random (interval above 1): {by_label(worse, True)}")
    if len(unclear):
        parts.append(f"not significant (interval includes 1): {by_label(unclear, detail)}")
    n_gm = int(best["n_budgets"])
    gm = f"{best['ratio']:.2f}x [{best['lo']:.2f}, {best['hi']:.2f}] (geometric mean of B / B_random over {n_gm} budgets)"
    text = (
        f"no selector needs significantly fewer labels than random on {metric} at these budgets ({how}); "
        + "; ".join(parts)
        + bound_note(pd.concat([worse, unclear]) if detail else worse)
        + (
            ""
            if len(ps) == 1 and n_gm < 2  # one selector at one budget: the mean is the cell above
            else f". Overall {best['label']} is at {gm}"
            if len(ps) == 1
            else f". Closest to random: {best['label']} at {gm}"
        )
        + "."
        + few_seeds
    )
    return {**base, "selector": None, "ratio": None, "closest": best["label"], "worse_budgets": worse_budgets, "text": text}


def interval_table(boot: dict) -> str:
    """Markdown: B / B_random with its interval per selector and budget, plus the geometric mean."""
    pb, ps = boot["per_budget"], boot["per_selector"]
    budgets = sorted(pb["budget"].unique())
    lines = ["| selector | " + " | ".join(f"B={b}" for b in budgets) + " | geometric mean |", "|---" * (len(budgets) + 2) + "|"]
    for label, g in pb.groupby("label", sort=True):
        g = g.set_index("budget")
        cells = []
        for b in budgets:
            if b not in g.index:
                cells.append("-")
                continue
            r = g.loc[b]
            if not np.isfinite(r["ratio"]):
                cells.append("n/a")
                continue
            mark = " **<1**" if r["hi"] < 1 else " **>1**" if r["lo"] > 1 else ""
            cells.append(f"{r['ratio_bound']}{r['ratio']:.2f} {format_interval(r)}{mark}")
        s = ps.set_index("label").loc[label]
        gm = f"{s['ratio']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]" if np.isfinite(s["ratio"]) else "n/a (random's curve is flat)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gm} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    # Headless Agg unless a backend was chosen explicitly (a notebook's inline backend stays).
    if matplotlib.rcParams._get_backend_or_none() is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(summary: pd.DataFrame, metric: str, ax=None, reference: str = "random", base: float | None = None):
    """Metric vs budget per selector (and round count): mean over seeds with a 95% t-band and error
    bars (none for one seed). ``random`` is drawn black dashed with markers; a selector's multi-round
    curves share its colour with other line styles; log-scale x when budgets span more than 10x;
    ``base`` (the base model's value, no finetuning) is a grey dotted horizontal line."""
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    else:
        fig = ax.figure
    if summary.empty:
        raise ValueError(f"no finished trials with {metric!r}: nothing to plot")
    single_seed = int(summary["n"].max()) < 2
    for label, (style, is_ref) in _curve_styles(summary, reference).items():
        g = summary[summary["label"] == label].sort_values("budget")
        ax.plot(g["budget"], g["mean"], label=label, markersize=5, **style)
        if g["n"].min() >= 2:
            ax.fill_between(g["budget"], g["lo"], g["hi"], color=style["color"], alpha=0.12 if is_ref else 0.18, linewidth=0)
        # error bars too: a band has no width at a budget only this selector ran (e.g. random's extra budgets)
        ok = g[g["n"] >= 2]
        if len(ok):
            ax.errorbar(
                ok["budget"],
                ok["mean"],
                yerr=[ok["mean"] - ok["lo"], ok["hi"] - ok["mean"]],
                fmt="none",
                ecolor=style["color"],
                elinewidth=1.0,
                capsize=3,
                alpha=0.8,
                label="_nolegend_",
            )
    if base is not None and math.isfinite(base):
        ax.axhline(base, color="0.45", linestyle=":", linewidth=1.4, label="base model (no finetuning)")
    _budget_axis(ax, summary["budget"])
    ax.set_ylabel(metric_label(metric))
    seeds = int(summary["n"].max())
    band = "one seed: no interval" if single_seed else f"mean over {seeds} seeds, 95% t-interval"
    arrow = "higher is better" if higher_is_better(metric) else "lower is better"
    ax.set_title(f"{metric} vs annotation budget ({band}; {arrow})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


# Line styles of the multi-round curves (one round: a solid line; random's dashes are its own).
_ROUND_STYLES = [("-.", "^"), ((0, (1, 1.5)), "D"), ((0, (5, 1, 1, 1, 1, 1)), "v"), ((0, (3, 3)), "P")]


def _curve_styles(table: pd.DataFrame, reference: str = "random") -> dict[str, tuple[dict, bool]]:
    """{label: (matplotlib style, is_reference)} in drawing order (random first): random black dashed,
    every other selector (with its params) a tab10 colour, its multi-round variants the same colour
    with their own line style and marker."""
    colors = _pyplot().get_cmap("tab10").colors
    t = _with_rounds(table)
    info = t.drop_duplicates("label").set_index("label")
    labels = sorted(info.index, key=lambda s: (not s.startswith(reference), s))
    shade: dict[str, int] = {}
    out = {}
    for label in labels:
        r = info.loc[label]
        rounds = int(r["rounds"])
        is_ref = r["selector"] == reference and rounds == 1
        if is_ref:
            out[label] = (dict(color="black", linestyle="--", marker="o", linewidth=2.0, zorder=3), True)
            continue
        k = shade.setdefault(_label(r["selector"], r["params"]), len(shade))
        if rounds == 1:
            out[label] = (dict(color=colors[k % 10], linestyle="-", marker="s", linewidth=1.6), False)
        else:
            ls, mk = _ROUND_STYLES[sorted(set(t["rounds"]) - {1}).index(rounds) % len(_ROUND_STYLES)]
            out[label] = (dict(color=colors[k % 10], linestyle=ls, marker=mk, linewidth=1.6), False)
    return out


def plot_metric_vs_compute(results: pd.DataFrame, metric: str, ax=None, reference: str = "random"):
    """The metric against the compute it cost: per (selector, rounds), the mean over seeds of the metric
    and of ``compute_total_s`` (scoring, the parent's included, + selection + training + evaluation) at
    each budget, joined in budget order and labelled B=...; log-scale x (a multi-round design can cost
    several times its one-shot counterpart)."""
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    else:
        fig = ax.figure
    data = _with_rounds(results.dropna(subset=[metric, "compute_total_s"]))
    data = data[data["compute_total_s"] > 0]
    if data.empty:
        raise ValueError(f"no finished trials with {metric!r} and compute_total_s: nothing to plot")
    data = data.assign(label=[_label(a, b, r) for a, b, r in zip(data["selector"], data["params"], data["rounds"])])
    means = data.groupby(["label", "selector", "params", "rounds", "budget"], sort=True)[[metric, "compute_total_s"]].mean()
    means = means.reset_index()
    for label, (style, _) in _curve_styles(means, reference).items():
        g = means[means["label"] == label].sort_values("budget")
        ax.plot(g["compute_total_s"], g[metric], label=label, markersize=5, **style)
        for r in g.itertuples():
            ax.annotate(
                f"B={r.budget}", (r.compute_total_s, getattr(r, metric)), textcoords="offset points", xytext=(4, 3), fontsize=6
            )
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # seconds in plain numbers: 50, 100, 200
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("compute per trial (s, log scale: scoring + selection + training + evaluation)")
    ax.set_ylabel(metric_label(metric))
    arrow = "higher is better" if higher_is_better(metric) else "lower is better"
    ax.set_title(f"{metric} vs compute (mean over seeds at each budget; {arrow})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _budget_axis(ax, budgets: pd.Series) -> None:
    """x axis in labelled examples; log scale when the budgets span more than 10x, ticks at the
    swept budgets in plain numbers (not 10^2)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    b = sorted(set(int(x) for x in budgets))
    if b[-1] / max(b[0], 1) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(FixedLocator(b))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("annotation budget B (labelled examples)")


def plot_label_efficiency(eff: pd.DataFrame, metric: str, ax=None):
    """B / B_random per selector vs budget; 1 is parity with random, below 1 saves labels.
    Censored points (beyond random's swept range) are drawn hollow."""
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    else:
        fig = ax.figure
    colors = plt.get_cmap("tab10").colors
    for k, (label, g) in enumerate(eff.groupby("label", sort=True)):
        g = g.sort_values("budget")
        c = colors[k % 10]
        exact = g[g["bound"] == ""]
        cens = g[~g["bound"].isin(["", "flat"])]  # flat: no ratio to draw
        # Lines join interpolated points only: a bound is not a value and must not look like one.
        ax.plot(exact["budget"], exact["ratio"], color=c, linestyle="-", marker="s", markersize=5, label=label)
        ax.scatter(cens["budget"], cens["ratio"], facecolors="none", edgecolors=c, marker="s", s=36, zorder=3)
        for _, r in cens.iterrows():  # the arrow points where the true ratio lies
            ax.annotate(
                r["ratio_bound"], (r["budget"], r["ratio"]), textcoords="offset points", xytext=(6, -3), color=c, fontsize=8
            )
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1.2, label="random (parity)")
    if not eff.empty:
        _budget_axis(ax, eff["budget"])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("B / B_random (label-cost ratio)")
    ax.set_title(f"labels needed relative to random to reach the same {metric} (hollow: bound)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(summary: pd.DataFrame, eff: pd.DataFrame | None = None) -> str:
    """Rows: selector; columns: budgets; cells: mean [lo, hi] (n), plus B/B_random when given."""
    budgets = sorted(summary["budget"].unique())
    lines = ["| selector | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    ratio = {}
    if eff is not None:
        for _, r in eff.iterrows():
            ratio[(r["label"], r["budget"])] = (
                f"{r['ratio_bound']}{r['ratio']:.2f}x" if math.isfinite(r["ratio"]) else "no ratio (random's curve is flat)"
            )
    labels = sorted(summary["label"].unique(), key=lambda s: (s != "random", s))
    for label in labels:
        g = summary[summary["label"] == label].set_index("budget")
        cells = []
        for b in budgets:
            if b not in g.index:
                cells.append("-")
                continue
            r = g.loc[b]
            cell = _fmt(r["mean"])
            if r["n"] >= 2:
                cell += f" [{_fmt(r['lo'])}, {_fmt(r['hi'])}]"
            cell += f" (n={int(r['n'])})"
            if (label, b) in ratio:
                cell += f"; {ratio[(label, b)]}"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _efficiency_table(eff: pd.DataFrame) -> str:
    lines = ["| selector | B | mean | random needs | B / B_random |", "|---|---|---|---|---|"]
    for _, r in eff.iterrows():
        need = {
            "": f"{r['random_budget']:.0f}",
            ">": f"> {r['random_budget']:.0f} (above random's best)",
            "<": f"< {r['random_budget']:.0f} (below random's smallest budget)",
            "flat": "undefined (random's curve is flat)",
        }[r["bound"]]
        lines.append(f"| {r['label']} | {r['budget']} | {_fmt(r['mean'])} | {need} | {r['ratio_bound']}{r['ratio']:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Compute: what each design spent, and against its one-shot counterpart
# --------------------------------------------------------------------------------------------


def compute_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean compute over seeds per (selector, params, rounds, budget), from the results' compute
    columns (edsft.compute: seconds per kind, the parent's scoring included in every trial).

    Columns: label, selector, params, rounds, budget, n, compute_<kind>_s..., compute_total_s,
    gpu_total_s (NaN when the results have no GPU columns), vs_one_shot (compute_total_s / the same
    selector's and params' one-round compute_total_s at that budget; NaN without a one-round trial).
    Empty when no trial has a compute_total_s."""
    cols = [f"compute_{k}_s" for k in _COMPUTE_KINDS] + ["compute_total_s"]
    out_cols = ["label", "selector", "params", "rounds", "budget", "n", *cols, "gpu_total_s", "vs_one_shot"]
    if "compute_total_s" not in results.columns:
        return pd.DataFrame(columns=out_cols)
    data = _with_rounds(results.dropna(subset=["compute_total_s"]))
    if data.empty:
        return pd.DataFrame(columns=out_cols)
    data = data.assign(gpu_total_s=data["gpu_total_s"] if "gpu_total_s" in data.columns else np.nan)
    present = [c for c in cols if c in data.columns]
    g = data.groupby(["selector", "params", "rounds", "budget"], sort=True)
    out = g[present + ["gpu_total_s"]].mean().reset_index()
    out["n"] = g.size().to_numpy()
    out["label"] = [_label(a, b, r) for a, b, r in zip(out["selector"], out["params"], out["rounds"])]
    one = out[out["rounds"] == 1].set_index(["selector", "params", "budget"])["compute_total_s"]
    keys = list(zip(out["selector"], out["params"], out["budget"]))
    out["vs_one_shot"] = [t / one[k] if k in one.index and one[k] > 0 else np.nan for t, k in zip(out["compute_total_s"], keys)]
    for c in cols:
        if c not in out.columns:
            out[c] = np.nan
    return out[out_cols].sort_values(["budget", "label"], key=_random_first).reset_index(drop=True)


def _random_first(col: pd.Series) -> pd.Series:
    return col.map(lambda s: (not s.startswith("random"), s)) if col.name == "label" else col


def _seconds(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.1f}"


def compute_table(csum: pd.DataFrame) -> str:
    """Markdown: mean seconds per kind and in all, per selector (and rounds) and budget."""
    gpu = csum["gpu_total_s"].notna().any() and (csum["gpu_total_s"] > 0).any()
    head = ["selector", "B", "n", *_COMPUTE_KINDS, "total"] + (["GPU-seconds"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in csum.itertuples():
        cells = [r.label, str(r.budget), str(r.n), *(_seconds(getattr(r, f"compute_{k}_s")) for k in _COMPUTE_KINDS)]
        cells.append(_seconds(r.compute_total_s))
        if gpu:
            cells.append(_seconds(r.gpu_total_s))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def design_table(csum: pd.DataFrame, boot: dict | None, reference: str = "random") -> str:
    """Markdown, for each budget and each (selector, rounds): the labels saved against random
    (B / B_random with its bootstrap interval, from :func:`bootstrap_label_efficiency`) and the compute
    spent against one-shot (compute_total_s / the same selector's one-round compute_total_s)."""
    pb = boot["per_budget"].set_index(["label", "budget"]) if boot is not None and len(boot["per_budget"]) else None
    lines = [
        "| B | selector | rounds | B / B_random (labels vs random) | compute (s) | compute vs one-shot |",
        "|---|---|---|---|---|---|",
    ]
    for r in csum.itertuples():
        if r.selector == reference and r.rounds == 1:
            labels = "1 (the reference)"
        elif pb is not None and (r.label, r.budget) in pb.index:
            b = pb.loc[(r.label, r.budget)]
            mark = " **<1**" if b["hi"] < 1 else " **>1**" if b["lo"] > 1 else ""
            labels = f"{b['ratio_bound']}{b['ratio']:.2f} {format_interval(b)}{mark}" if np.isfinite(b["ratio"]) else "n/a"
        else:
            labels = "-"
        vs = (
            "1 (one-shot)"
            if r.rounds == 1
            else (f"{r.vs_one_shot:.2f}x" if np.isfinite(r.vs_one_shot) else "- (no one-round trial)")
        )
        name = _label(r.selector, r.params)  # the rounds have a column of their own
        lines.append(f"| {r.budget} | {name} | {r.rounds} | {labels} | {_seconds(r.compute_total_s)} | {vs} |")
    return "\n".join(lines)


def lm_eval_table(run, results: pd.DataFrame) -> str | None:
    """Markdown: lm-evaluation-harness scores (``evaluation.lm_eval_tasks``) per selector and budget,
    the mean over seeds of each task's metrics (stderr left out), with the base model's row first;
    read from each trial's metrics.json and the sweep's base_metrics.json. None when no trial has any."""
    rows = []
    base_file = run.child("sweep", "base_metrics.json")
    base = base_file.read_json().get("lm_eval", {}).get("base") if base_file.exists() else None
    if base:
        rows.append({"label": "base model", "budget": "-", **_lm_eval_flat(base)})
    for _, r in results.iterrows():
        metrics_file = run.child("sweep", "trials", str(r.get("trial_id")), "metrics.json")
        scores = (
            metrics_file.read_json().get("lm_eval", {}).get("finetuned") if "trial_id" in r and metrics_file.exists() else None
        )
        if scores:
            label = _label(r["selector"], r["params"], r.get("rounds", 1))
            rows.append({"label": label, "budget": int(r["budget"]), **_lm_eval_flat(scores)})
    if not rows:
        return None
    df = pd.DataFrame(rows)
    columns = [c for c in df.columns if c not in ("label", "budget")]
    means = df.groupby(["label", "budget"], sort=False)[columns].agg(["mean", "count"])
    lines = ["| selector | B | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for (label, budget), r in means.iterrows():
        cells = [f"{_fmt(r[(c, 'mean')])} (n={int(r[(c, 'count')])})" if r[(c, "count")] else "-" for c in columns]
        lines.append(f"| {label} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lm_eval_flat(scores: dict) -> dict:
    # {task: {metric: value}} -> {"task/metric": value}; stderrs and counts are not compared
    return {
        f"{task}/{m}": v
        for task, values in scores.items()
        for m, v in values.items()
        if not m.endswith("_stderr") and m != "sample_len" and isinstance(v, (int, float))
    }


# --------------------------------------------------------------------------------------------
# The report of a run folder
# --------------------------------------------------------------------------------------------


def build_report(run, metric: str | None = None, metrics: Iterable[str] | None = None, out=None) -> dict:
    """Write ``out`` (default ``run/report/``: report.md, one learning-curve PNG per metric, the label-efficiency
    plot and CSV) from ``run/sweep/results.parquet``; ``metric`` (default: the sweep's
    ``sweep.metric`` from the run manifest, else exact_match) drives the headline.
    Returns {"report": uri, "headline": {...}, "plots": [...], "trials": n}."""
    results_store = run.child("sweep", "results.parquet")
    if not results_store.exists():
        raise ValueError(f"{results_store.uri} does not exist: run `edsft sweep` on this run folder first")
    raw = results_store.read_table().to_pandas()
    results = load_results(raw)
    if results.empty:
        raise ValueError(
            f"{results_store.uri} has no finished trials (statuses: {sorted(raw.get('status', pd.Series()).unique())}): re-run the sweep"
        )
    manifest = {}
    if run.child("manifest.json").exists():
        manifest = run.child("manifest.json").read_json()
    config = manifest.get("config", {}) if isinstance(manifest, dict) else {}
    versions = manifest.get("versions", {}) if isinstance(manifest, dict) else {}
    metric = metric or config.get("sweep", {}).get("metric") or "exact_match"
    if metric not in results.columns:
        raise ValueError(
            f"metric={metric!r} is not in {results_store.uri}: pick one of {[m for m in METRICS if m in results.columns]}"
        )
    metrics = [m for m in (metrics or METRICS) if m in results.columns and results[m].notna().any()]
    if metric not in metrics:
        metrics = [metric] + metrics

    examples = per_example_results(run, results)  # per-eval-prompt results: the bootstrap resamples prompts too
    out = out if out is not None else run.child("report")
    plots = []
    sections = []
    head = None
    csum = compute_summary(results)
    multi_round = bool((results["rounds"] > 1).any())
    for m in metrics:
        boot = None
        summ = summarize(results, m)
        has_random = (summ["selector"] == "random").any()
        eff = label_efficiency(summ, m) if has_random else None
        base_col = f"base_{m}"
        base = float(results[base_col].mean()) if base_col in results.columns and results[base_col].notna().any() else None
        fig = plot_learning_curves(summ, m, base=base)
        name = f"learning_curve_{m}.png"
        out.child(name).write_bytes(_png_bytes(fig))
        plots.append(out.child(name).uri)
        block = [f"### {m}", "", f"![{m} vs budget]({name})", "", markdown_table(summ, eff), ""]
        if eff is not None and not eff.empty:
            eff_name = f"label_efficiency_{m}.png"
            out.child(eff_name).write_bytes(_png_bytes(plot_label_efficiency(eff, m)))
            plots.append(out.child(eff_name).uri)
            out.child(f"label_efficiency_{m}.csv").write_text(eff.to_csv(index=False))
            block += [
                f"Label efficiency on {m} (random's curve interpolated piecewise-linearly in log-budget, running best):",
                "",
                _efficiency_table(eff),
                "",
                f"![B / B_random]({eff_name})",
                "",
            ]
        if eff is not None and not eff.empty:
            boot = bootstrap_label_efficiency(results, m, examples)
            out.child(f"label_efficiency_intervals_{m}.csv").write_text(boot["per_budget"].to_csv(index=False))
            block += [
                f"B / B_random with {boot['confidence'] * 100:.0f}% bootstrap intervals ({boot['n_boot']} resamples of "
                f"{boot['resampled']}; **<1**: fewer labels than random, **>1**: more, interval excluding 1; "
                f"intervals are per cell, not adjusted for the number of selectors x budgets):",
                "",
                interval_table(boot),
                "",
            ]
        if multi_round and not csum.empty:
            vs_name = f"metric_vs_compute_{m}.png"
            out.child(vs_name).write_bytes(_png_bytes(plot_metric_vs_compute(results, m)))
            plots.append(out.child(vs_name).uri)
            block += [
                f"One-shot design against multi-round active learning on {m}: labels saved against random "
                f"(B / B_random, bootstrap interval as above) and compute spent against the same selector's one-round "
                f"design at that budget (mean compute_total_s over seeds, the shared scoring included):",
                "",
                design_table(csum, boot),
                "",
                f"![{m} vs compute]({vs_name})",
                "",
            ]
        if m == metric:
            if eff is None:
                head = {"selector": None, "ratio": None, "text": "random is not in the sweep: no ratio"}
            elif eff.empty:
                head = headline(eff, m)
            else:
                head = significance_headline(boot, m, eff)
            out.child(f"summary_{m}.csv").write_text(summ.to_csv(index=False))
        sections += block

    seeds = sorted(results["seed"].unique().tolist())
    budgets = sorted(results["budget"].unique().tolist())
    selectors = sorted({_label(s, p, r) for s, p, r in zip(results["selector"], results["params"], results["rounds"])})
    pool = config.get("pool", {})
    model = (config.get("training", {}) or {}).get("model") or (config.get("scoring", {}) or {}).get("model")
    statuses = raw["status"].value_counts().to_dict() if "status" in raw.columns else {}
    interval = (
        "curves: 95% t-interval over seeds; B / B_random: 95% bootstrap interval over "
        + ("seeds and eval prompts" if examples is not None else "seeds (no per-prompt results found)")
        if len(seeds) >= 2
        else "a single seed: no interval is drawn (one sample has no spread) and no headline"
    )
    lines = [
        "# Label-efficiency report",
        "",
        f"**Headline ({metric}).** {head['text']}",
        "",
        "| | |",
        "|---|---|",
        f"| run | `{run.uri}` |",
        f"| pool | `{pool.get('path', '?')}` (size {pool.get('size', '?')}) |",
        f"| model | `{model or '?'}` (LoRA: {config.get('training', {}).get('lora', '?')}) |",
        f"| selectors | {('; ' if multi_round else ', ').join(selectors)} |",  # labels of rounds hold a comma
        f"| budgets | {', '.join(str(b) for b in budgets)} |",
        f"| seeds | {', '.join(str(s) for s in seeds)} |",
        *(
            [f"| rounds | {', '.join(str(r) for r in sorted(results['rounds'].unique()))} (1: the one-shot design) |"]
            * multi_round
        ),
        f"| metric | {metric} ({metric_label(metric)}; {'higher' if higher_is_better(metric) else 'lower'} is better) |",
        f"| intervals | {interval} |",
        f"| trials | {len(results)} finished of {len(raw)} ({', '.join(f'{k}: {v}' for k, v in statuses.items())}) |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in versions.items()) or 'not recorded (no manifest.json)'} |",
        "",
        "## Results",
        "",
    ] + sections
    if not csum.empty:
        out.child("compute.csv").write_text(csum.to_csv(index=False))
        lines += [
            "## Compute",
            "",
            "Mean seconds per trial over seeds (n trials) spent scoring (the sweep's shared scoring of the pool, "
            "counted in every trial, plus any re-scoring between rounds), selecting, training and evaluating "
            "(edsft.compute; wall time of each committed stage):",
            "",
            compute_table(csum),
            "",
        ]
    lm_eval = lm_eval_table(run, results)
    if lm_eval is not None:
        lines += [
            "## Benchmarks (lm-evaluation-harness)",
            "",
            "Mean over seeds (n trials) of each task's metric, finetuned adapter per selector and budget; the base model once:",
            "",
            lm_eval,
            "",
        ]
    out.child("report.md").write_text("\n".join(lines) + "\n")
    return {"report": out.child("report.md").uri, "headline": head, "plots": plots, "trials": int(len(results)), "metric": metric}
