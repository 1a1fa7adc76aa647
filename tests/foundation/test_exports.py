"""Subsets out: trainer-ready JSONL (alpaca, messages, the pool's layout) + dataset_info.json, read back
with plain `json`; several budgets in one run, nested for greedy selectors, each equal to its own run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from _data import write_scores  # noqa: E402

from edsft.annotation import annotate  # noqa: E402
from edsft.config import Config, load_config  # noqa: E402
from edsft.exports import (  # noqa: E402
    CONTEXT_COLUMN,
    native_layout,
    records,
    response_of,
    subset_rows,
    write_subsets,
)
from edsft.storage import get_store  # noqa: E402

# prompts a JSON writer or a line splitter can get wrong
TRICKY = [
    "plain",
    "two\nlines",
    'a "quoted" \\ backslash',
    "=SUM(A1)",
    "tab\tand\u2028sep",
    "ünïcødé 日本",
    "  padded  ",
    "emoji 🙂",
]


def _json_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:  # plain json, one object a line, "\n" only
        return [json.loads(line) for line in f.read().split("\n") if line]


def _pool(folder: Path, ids, prompts, context=None) -> None:
    n = len(ids)
    cols = {
        "row_id": ids,
        "prompt": prompts,
        "response": [f"answer {i}: {p}" for i, p in enumerate(prompts)],
        "task": ["t" + str(i % 3) for i in range(n)],
        "source": ["x"] * n,
        "line": list(range(1, n + 1)),
    }
    if context is not None:
        cols[CONTEXT_COLUMN] = context
    t = pa.table(cols)
    (folder / "pool.parquet").mkdir(parents=True)
    pq.write_table(t.slice(0, n // 2), folder / "pool.parquet" / "part-00000.parquet")
    pq.write_table(t.slice(n // 2), folder / "pool.parquet" / "part-00001.parquet")


def _selection(folder: Path, ids) -> None:
    k = len(ids)
    pq.write_table(
        pa.table({"row_id": ids, "rank": list(range(k)), "gain": [1.0] * k, "selector": ["x"] * k, "shard": [0] * k}),
        folder / "selection.parquet",
    )


@pytest.fixture
def run(tmp_path):
    ids = [f"r{i}" for i in range(len(TRICKY))]
    _pool(tmp_path, ids, TRICKY)
    _selection(tmp_path, ["r5", "r0", "r3", "r1", "r4", "r7"])
    return get_store(tmp_path)


def _prompts(pool_dir, ids):
    t = pq.read_table(pool_dir).to_pydict()
    return [t["prompt"][t["row_id"].index(r)] for r in ids], [t["response"][t["row_id"].index(r)] for r in ids]


def test_prompt_only_subset_round_trips_through_json(run):
    sel = run.child("selection.parquet").read_table()
    rows = subset_rows(sel, run.child("pool.parquet"), with_response=False)
    assert "response" not in rows.column_names  # the select stage never reads the label
    out = write_subsets(
        run.child("subset"),
        {"b6": rows},
        "auto",
        {"prompt_field": "question", "response_field": "answer", "task_field": "category", "id_field": None},
    )
    ids = sel.column("row_id").to_pylist()
    prompts, _ = _prompts(run.child("pool.parquet").path, ids)
    alpaca = _json_lines(out["b6"]["alpaca"])
    messages = _json_lines(out["b6"]["messages"])
    native = _json_lines(out["b6"]["pool"])
    assert [r["row_id"] for r in alpaca] == [r["row_id"] for r in messages] == [r["row_id"] for r in native] == ids
    assert [r["instruction"] for r in alpaca] == prompts and {r["input"] for r in alpaca} == {r["output"] for r in alpaca} == {""}
    assert [r["messages"] for r in messages] == [[{"role": "user", "content": p}] for p in prompts]  # no assistant turn yet
    assert [r["question"] for r in native] == prompts and {r["answer"] for r in native} == {""}  # the pool's own names
    assert [r["category"] for r in native] == [f"t{int(r[1:]) % 3}" for r in ids]


def test_annotated_subset_round_trips_prompts_and_responses(run):
    cfg = load_config()
    s = annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    ids = run.child("selection.parquet").read_table().column("row_id").to_pylist()
    prompts, responses = _prompts(run.child("pool.parquet").path, ids)
    alpaca = _json_lines(s["formats"]["annotated"]["alpaca"])
    messages = _json_lines(s["formats"]["annotated"]["messages"])
    assert [(r["row_id"], r["instruction"], r["output"]) for r in alpaca] == list(zip(ids, prompts, responses))
    assert [r["messages"] for r in messages] == [
        [{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in zip(prompts, responses)
    ]
    # the same rows as annotated.parquet, which is what train reads
    t = run.child("annotated.parquet").read_table()
    assert t.column("prompt").to_pylist() == prompts and t.column("response").to_pylist() == responses


def test_export_mode_formats_filled_in_import_back(run, tmp_path):
    cfg = load_config(None, ["annotation.mode=export"])
    s = annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    assert run.child("to_annotate.csv").read_text().count("'=SUM(A1)") == 1  # the CSV's formula escaping stays
    files = s["formats"]["to_annotate"]
    assert [r["instruction"] for r in _json_lines(files["alpaca"])][3] == TRICKY[1]
    # annotators fill the alpaca file's output for half the rows and the messages file for the others
    alpaca, messages = _json_lines(files["alpaca"]), _json_lines(files["messages"])
    done = [dict(r, output=f"filled {r['row_id']}") for r in alpaca[:3]]
    done += [dict(r, messages=r["messages"] + [{"role": "assistant", "content": f"filled {r['row_id']}"}]) for r in messages[3:]]
    path = tmp_path / "done.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in done), encoding="utf-8")
    cfg = load_config(None, ["annotation.mode=import", f"annotation.annotations_path={path}"])
    annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    t = run.child("annotated.parquet").read_table()
    assert t.column("response").to_pylist() == [f"filled {r}" for r in t.column("row_id").to_pylist()]
    assert t.num_rows == 6


def test_a_context_column_exports_the_whole_conversation(tmp_path):
    ctx = [
        json.dumps(
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        ),
        None,
        "",
    ]
    _pool(tmp_path, ["a", "b", "c"], ["what now?", "flat one", "empty context"], context=ctx)
    _selection(tmp_path, ["a", "b", "c"])
    run = get_store(tmp_path)
    s = annotate(load_config(), run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    msgs = [r["messages"] for r in _json_lines(s["formats"]["annotated"]["messages"])]
    assert msgs[0] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "what now?"},
        {"role": "assistant", "content": "answer 0: what now?"},
    ]
    assert msgs[1] == [{"role": "user", "content": "flat one"}, {"role": "assistant", "content": "answer 1: flat one"}]
    alpaca = _json_lines(s["formats"]["annotated"]["alpaca"])
    assert alpaca[0]["system"] == "be brief" and alpaca[0]["history"] == [["hi", "hello"]]
    assert alpaca[0]["instruction"] == "what now?" and alpaca[0]["output"] == "answer 0: what now?"
    assert "system" not in alpaca[1] and "history" not in alpaca[1]
    info = json.loads(Path(s["formats"]["dataset_info"]).read_text())
    assert info["edsft_annotated_alpaca"]["columns"] == {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    }


def test_sharegpt_layout_for_a_sharegpt_pool_and_back():
    row = {
        "row_id": "a",
        "prompt": "q2",
        "response": "a2",
        "task": "t",
        CONTEXT_COLUMN: [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
        ],
    }
    assert native_layout("sharegpt") == "sharegpt" and native_layout("jsonl") == "pool"
    (rec,) = json.loads(json.dumps(records([row], "sharegpt")))
    assert rec == {
        "row_id": "a",
        "system": "sys",
        "task": "t",
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
        ],
    }
    assert response_of(rec) == "a2" and response_of(records([{**row, "response": None}], "sharegpt")[0]) is None


def test_dataset_info_names_existing_files_and_columns(run):
    s = annotate(load_config(), run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    folder = Path(s["formats"]["dataset_info"]).parent
    info = json.loads((folder / "dataset_info.json").read_text())
    assert set(info) == {"edsft_annotated_alpaca", "edsft_annotated_messages", "edsft_annotated_pool"}
    for name, entry in info.items():
        assert set(entry) <= {"file_name", "formatting", "columns", "tags"} and entry["formatting"] in ("alpaca", "sharegpt")
        recs = _json_lines(folder / entry["file_name"])  # LLaMA-Factory resolves file_name in dataset_dir
        assert len(recs) == 6
        for col in entry["columns"].values():
            assert all(col in r for r in recs), (name, col)
        if "tags" in entry:  # every turn's role is one the tags name
            tags = entry["tags"]
            roles = {tags["user_tag"], tags["assistant_tag"], tags["system_tag"]}
            for r in recs:
                turns = r[entry["columns"]["messages"]]
                assert all(set(t) == {tags["role_tag"], tags["content_tag"]} and t[tags["role_tag"]] in roles for t in turns)
                assert [t["role"] for t in turns][-2:] == ["user", "assistant"]


# ---- several budgets ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    return get_store(write_scores(tmp_path_factory.mktemp("scores") / "scores.parquet", n=300, d=8, centers=6, files=2))


def _select(scores, tmp_path, name, budget, **params):
    from edsft.distributed.coresets import select_subset

    cfg = Config().replace(
        **{"selection.name": name, "selection.budget": budget, "selection.mode": "local", "selection.params": params}
    )
    out = get_store(tmp_path / f"{name}-{budget}".replace(" ", "") / "selection.parquet")
    return select_subset(cfg, scores, out, progress=False), out


def _same(a: pa.Table, b: pa.Table) -> bool:
    """Equal selection tables (a NaN gain, e.g. k-center's first pick, equals a NaN gain)."""
    np.testing.assert_array_equal(a.column("gain").to_numpy(), b.column("gain").to_numpy())
    return a.schema == b.schema and a.drop_columns(["gain"]).equals(b.drop_columns(["gain"]))


@pytest.mark.parametrize(
    "name, params, nested",
    [("facility_location", {}, True), ("k_center", {}, True), ("uncertainty", {}, True), ("random", {}, False)],
)
def test_several_budgets_equal_single_budget_runs(scores, tmp_path, name, params, nested):
    summary, out = _select(scores, tmp_path, name, [40, 5, 15], **params)
    assert summary["one_pass"] is nested and summary["budget"] == 40
    folder = Path(out.path).with_suffix("")
    assert sorted(p.name for p in folder.iterdir()) == ["b15.parquet", "b40.parquet", "b5.parquet"]
    tables = {b: pq.read_table(folder / f"b{b}.parquet") for b in (5, 15, 40)}
    assert _same(pq.read_table(out.path), tables[40])  # selection.parquet is the largest: what annotate reads
    for b, t in tables.items():
        single, single_out = _select(scores, tmp_path, name, b, **params)
        assert _same(t, pq.read_table(single_out.path)), b
        assert summary["budgets"][str(b)]["objective"] == pytest.approx(single["objective"], nan_ok=True)
        assert summary["budgets"][str(b)]["budget"] == t.num_rows == b
    ids = {b: t.column("row_id").to_pylist() for b, t in tables.items()}
    if nested:  # greedy: each smaller subset is the larger one's first picks
        assert ids[5] == ids[15][:5] and ids[15] == ids[40][:15]


def test_single_budget_writes_only_selection_parquet(scores, tmp_path):
    from _data import read_pool

    from edsft.selection import select

    summary, out = _select(scores, tmp_path, "facility_location", 12)
    assert sorted(p.name for p in Path(out.path).parent.iterdir()) == ["selection.parquet"]
    assert "budgets" not in summary and "one_pass" not in summary and summary["budget"] == 12
    ids, _, S, X = read_pool(Path(scores.path))
    ref = select("facility_location", 12, embeddings=X, scores=S, seed=0)
    t = pq.read_table(out.path)
    assert t.column("row_id").to_pylist() == list(ids[ref.indices]) and summary["objective"] == pytest.approx(ref.objective)


def test_budget_over_pool_is_capped_once(scores, tmp_path):
    cfg = Config().replace(
        **{
            "selection.budget": [10, 400, 500],
            "selection.allow_budget_over_pool": True,
            "selection.name": "uncertainty",
            "selection.mode": "local",
        }
    )
    from edsft.distributed.coresets import select_subset

    s = select_subset(cfg, scores, get_store(tmp_path / "sel.parquet"), progress=False)
    assert list(s["budgets"]) == ["10", "300"] and s["budget"] == 300


def test_select_stage_commits_every_size_and_its_exports(scores, tmp_path):
    """The pipeline's select stage: selection/, subset/ committed with the inventory, pool prompts only."""
    from edsft.pipeline import Run, read_manifest, run_stage, why_not_done

    t = pq.read_table(scores.path)
    ids = t.column("row_id").to_pylist()
    _pool(tmp_path, ids, [f"prompt {i}" for i in range(len(ids))])
    (tmp_path / "scores.parquet").symlink_to(scores.path, target_is_directory=True)
    cfg = Config().replace(
        **{"output.dir": str(tmp_path), "selection.budget": [4, 9], "selection.name": "k_center", "ray.num_cpus": 2}
    )
    entry = run_stage(cfg, "select")
    inv = read_manifest(get_store(tmp_path))["stages"]["select"]["inventory"]
    assert set(inv) == {"selection.parquet", "selection", "subset"} and why_not_done(Run.open(cfg), "select") is None
    sub = tmp_path / "subset"
    assert sorted(p.name for p in sub.iterdir()) == [
        "b4.alpaca.jsonl",
        "b4.messages.jsonl",
        "b4.pool.jsonl",
        "b9.alpaca.jsonl",
        "b9.messages.jsonl",
        "b9.pool.jsonl",
        "dataset_info.json",
    ]
    sel9 = pq.read_table(tmp_path / "selection" / "b9.parquet").column("row_id").to_pylist()
    assert [r["row_id"] for r in _json_lines(sub / "b9.alpaca.jsonl")] == sel9
    assert [r["instruction"] for r in _json_lines(sub / "b4.alpaca.jsonl")] == [f"prompt {ids.index(r)}" for r in sel9[:4]]
    assert all(r["output"] == "" for r in _json_lines(sub / "b9.alpaca.jsonl"))  # responses come from annotate
    assert entry["summary"]["subset"]["dataset_info"] == str(sub / "dataset_info.json")
