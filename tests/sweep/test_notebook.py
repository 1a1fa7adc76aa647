"""The label-efficiency notebook executes end to end (nbclient, kernel python3) on a tiny results file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "label_efficiency.ipynb"


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


@pytest.mark.slow
def test_notebook_runs_on_tiny_results(tmp_path):
    rows = []
    for sel, shift in [("random", 0.0), ("k_center", 0.05)]:
        for b, base in [(8, 0.1), (16, 0.2), (32, 0.3)]:
            for seed in (0, 1):
                rows.append(
                    dict(
                        trial_id=f"{sel}-b{b}-s{seed}",
                        selector=sel,
                        params="{}",
                        budget=b,
                        seed=seed,
                        exact_match=base + shift + 0.01 * seed,
                        status="TERMINATED",
                    )
                )
    tiny = tmp_path / "results.parquet"
    pd.DataFrame(rows).to_parquet(tiny)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.source.startswith("RESULTS = ")  # the documented place to point the notebook at a sweep
    first.source = f"RESULTS = {json.dumps(str(tiny))}\nMETRIC = 'exact_match'"
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    text = _outputs_text(nb)
    assert "12 finished trials" in text and "k_center reaches random's exact_match" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # learning curves + label-efficiency plot


@pytest.mark.slow
def test_notebook_default_example_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    assert "fl_uncertainty(lambda_=0.5)" in _outputs_text(nb)
