"""lm-evaluation-harness benchmarks on the base model and the LoRA adapter, offline.

A local multiple-choice task (8 rows of JSONL, a task YAML with ``dataset_path: json``) runs on
builtin:tiny-llama and on a LoRA adapter made here; lm-eval's accuracy must equal the accuracy
computed by hand from the same models' log-likelihoods of each choice, which proves both that the
task ran as written and that the adapter (which changes the accuracy here) was applied.
Through the evaluate stage the scores land in metrics.json under ``lm_eval``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from edsft.config import Config
from edsft.errors import UserError
from edsft.models import load_model, load_tokenizer
from edsft.storage import get_store

# the report tests need no harness; CI installs it (Makefile: .[dev,metrics,lm-eval])
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install 'edsft[lm-eval]'")

MODEL = "builtin:tiny-llama"
ROWS = [
    ("The sky is", ["blue", "green", "loud"], 0),
    ("Two plus two is", ["seven", "four", "cat"], 1),
    ("Water is", ["dry", "square", "wet"], 2),
    ("Fire is", ["hot", "cold", "tall"], 0),
    ("The sun rises in the", ["west", "east", "north"], 1),
    ("Cats say", ["moo", "quack", "meow"], 2),
    ("Ice is", ["cold", "hot", "sweet"], 0),
    ("A week has seven", ["cars", "days", "trees"], 1),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # nothing here may reach a hub: the task's data is a local file read by `datasets`
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _task_folder(root: Path) -> Path:
    folder = root / "tasks"
    folder.mkdir()
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in ROWS))
    # data_files paths are read relative to the working directory, so the YAML names the file absolutely
    (folder / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    return folder


def _adapter(root: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)  # a seed whose adapter changes the accuracy on ROWS (0.125 -> 0.5): see the test
    model = load_model(MODEL, dtype="float32", device="cpu")
    # init_lora_weights=False: random A and B, so the adapter really moves the log-likelihoods
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "adapter"


def _choice_logprobs(model, tokenizer) -> list[list[float]]:
    """log p(" choice" | question) per row and choice, the way lm-eval scores multiple choice."""
    out = []
    for question, choices, _ in ROWS:
        ctx = tokenizer(question, add_special_tokens=False).input_ids
        row = []
        for choice in choices:
            whole = tokenizer(question + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
            cont = whole[len(ctx) :]
            row.append(sum(logits[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        out.append(row)
    return out


def _accuracy(logprobs: list[list[float]]) -> float:
    return sum(max(range(len(lp)), key=lp.__getitem__) == y for lp, (_, _, y) in zip(logprobs, ROWS)) / len(ROWS)


@needs_lm_eval
@pytest.mark.slow
def test_lm_eval_scores_base_and_adapter_in_metrics_json(tmp_path):
    from peft import PeftModel

    from edsft.distributed.evaluate import evaluate_models

    tasks, adapter = _task_folder(tmp_path), _adapter(tmp_path)
    cfg = Config().replace(
        **{
            "training.model": MODEL,
            "training.max_seq_len": 32,
            "evaluation.mode": "local",
            "evaluation.generate": False,
            "evaluation.dtype": "float32",
            "evaluation.lm_eval_tasks": ["tiny_mc"],
            "evaluation.lm_eval_include_path": str(tasks),
        }
    )
    eval_path = tmp_path / "eval.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"row_id": f"r{i}", "prompt": q, "response": c[y]} for i, (q, c, y) in enumerate(ROWS)]), eval_path
    )
    m = evaluate_models(cfg, str(eval_path), get_store(str(adapter)), get_store(str(tmp_path / "metrics.json")), progress=False)

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["lm_eval"] == m["lm_eval"] and set(m["lm_eval"]) == {"base", "finetuned"}
    base, tuned = m["lm_eval"]["base"]["tiny_mc"], m["lm_eval"]["finetuned"]["tiny_mc"]
    assert 0.0 <= base["acc"] <= 1.0 and 0.0 <= tuned["acc"] <= 1.0

    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL, dtype="float32", device="cpu")
    base_lp = _choice_logprobs(model, tokenizer)
    tuned_lp = _choice_logprobs(PeftModel.from_pretrained(model, str(adapter)).eval(), tokenizer)
    # the adapter changes the answers, so equal accuracies below could not come from the base model twice
    assert _accuracy(base_lp) != _accuracy(tuned_lp), (_accuracy(base_lp), _accuracy(tuned_lp))
    assert base["acc"] == pytest.approx(_accuracy(base_lp))
    assert tuned["acc"] == pytest.approx(_accuracy(tuned_lp))


def test_no_tasks_leaves_metrics_json_unchanged(tmp_path):
    from edsft.distributed.evaluate import evaluate_models

    cfg = Config().replace(
        **{"training.model": MODEL, "training.max_seq_len": 32, "evaluation.mode": "local", "evaluation.generate": False}
    )
    eval_path = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist([{"row_id": "r0", "prompt": "The sky is", "response": "blue"}]), eval_path)
    m = evaluate_models(cfg, str(eval_path), None, get_store(str(tmp_path / "metrics.json")), progress=False)
    assert "lm_eval" not in m and "lm_eval" not in json.loads((tmp_path / "metrics.json").read_text())


@needs_lm_eval
def test_unknown_task_and_missing_harness_are_user_errors(tmp_path, monkeypatch):
    from edsft.training.lm_eval import run_lm_eval

    tasks = _task_folder(tmp_path)
    with pytest.raises(UserError, match=r"lm_eval_tasks names \['no_such_task'\]"):
        run_lm_eval(MODEL, None, ["no_such_task"], tasks)
    with pytest.raises(UserError, match="lm_eval_include_path"):
        run_lm_eval(MODEL, None, ["tiny_mc"], tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what a missing install looks like to `import`
    with pytest.raises(UserError, match=r"pip install 'edsft\[lm-eval\]'"):
        run_lm_eval(MODEL, None, ["tiny_mc"], tasks)


def test_report_shows_the_benchmark_table(tmp_path):
    import pandas as pd

    from edsft import report as R

    run = get_store(str(tmp_path / "run"))
    trials = [
        ("t0", "random", 10, 0, 0.25),
        ("t1", "random", 10, 1, 0.75),
        ("t2", "k_center", 10, 0, 0.5),
        ("t3", "k_center", 10, 1, None),
    ]
    rows = []
    for tid, selector, budget, seed, acc in trials:
        rows.append(
            dict(
                trial_id=tid,
                selector=selector,
                params="{}",
                budget=budget,
                seed=seed,
                status="TERMINATED",
                exact_match=0.1 * seed,
            )
        )
        metrics = {"finetuned": {"exact_match": 0.1 * seed}}
        if acc is not None:  # t3 ran before lm_eval_tasks was set: it is left out, not counted as 0
            metrics["lm_eval"] = {"finetuned": {"tiny_mc": {"acc": acc, "acc_stderr": 0.1, "sample_len": 8.0}}}
        run.child("sweep", "trials", tid, "metrics.json").write_json(metrics)
    run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False))
    run.child("sweep", "base_metrics.json").write_json(
        {"base": {"exact_match": 0.0}, "lm_eval": {"base": {"tiny_mc": {"acc": 0.125}}}}
    )

    R.build_report(run)
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in md and "| selector | B | tiny_mc/acc |" in md
    assert "| base model | - | 0.125 (n=1) |" in md
    assert "| random | 10 | 0.500 (n=2) |" in md  # mean over seeds
    assert "| k_center | 10 | 0.500 (n=1) |" in md
    assert "stderr" not in md.split("## Benchmarks")[1]


def test_report_without_lm_eval_has_no_benchmark_section(tmp_path):
    import pandas as pd

    from edsft import report as R

    run = get_store(str(tmp_path / "run"))
    rows = [dict(trial_id="t0", selector="random", params="{}", budget=10, seed=0, status="TERMINATED", exact_match=0.2)]
    run.child("sweep", "trials", "t0", "metrics.json").write_json({"finetuned": {"exact_match": 0.2}})
    run.child("sweep", "results.parquet").write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False))
    R.build_report(run)
    assert "Benchmarks" not in (tmp_path / "run" / "report" / "report.md").read_text()
