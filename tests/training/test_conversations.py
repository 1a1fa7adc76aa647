"""Conversation rows (a pool row's ``context``: system + earlier turns) go through the model's chat
template whole: training targets only the final assistant turn, scoring and evaluation see the
whole conversation. On builtin:tiny-llama (ChatML template); numeric comparisons pin float32
('auto' is bf16 on CPUs that have it, where padding moves the last digits)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edsft.models import end_of_turn_ids, load_tokenizer
from edsft.scoring.scorer import Scorer
from edsft.training.data import IGNORE_INDEX, messages_for, prompt_text, tokenize_example, tokenize_examples
from edsft.training.evaluation import Evaluator

CONTEXT = json.dumps(
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "four"},
    ]
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-llama")


def _trained(ex):
    return [i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX]


def test_labels_only_on_the_last_assistant_turn(tok):
    end = end_of_turn_ids(tok)
    ex, flags = tokenize_example(tok, "And times 3?", "twelve", end, max_seq_len=256, context=CONTEXT)
    ids, trained = ex["input_ids"], _trained(ex)
    # the whole conversation is the input, rendered by the template
    full = tok.apply_chat_template(messages_for("And times 3?", "twelve", CONTEXT), tokenize=False)
    assert tok.decode(ids) == full and all(s in full for s in ("Be brief.", "What is 2+2?", "four"))
    # the loss covers one contiguous span: the final answer and its end-of-turn token, nothing earlier
    n_prompt = len(tok(prompt_text(tok, "And times 3?", CONTEXT), add_special_tokens=False)["input_ids"])
    assert trained == list(range(n_prompt, trained[-1] + 1))
    assert tok.decode([ids[i] for i in trained[:-1]]) == "twelve" and ids[trained[-1]] in end
    four = tok("four", add_special_tokens=False)["input_ids"]
    first_answer = next(i for i in range(len(ids)) if ids[i : i + len(four)] == four)
    assert first_answer < n_prompt and ex["labels"][first_answer] == IGNORE_INDEX
    # the same final turn without its context trains the same tokens on a shorter input
    bare, _ = tokenize_example(tok, "And times 3?", "twelve", end, max_seq_len=256)
    assert [bare["input_ids"][i] for i in _trained(bare)] == [ids[i] for i in trained] and len(bare["input_ids"]) < len(ids)
    # rows carry it as their context column; a row without one is the single-turn example
    rows = [
        {"row_id": "c", "prompt": "And times 3?", "response": "twelve", "context": CONTEXT},
        {"row_id": "b", "prompt": "And times 3?", "response": "twelve"},
    ]
    exs, stats = tokenize_examples(tok, rows, 256, end)
    assert exs[0]["input_ids"] == ids and exs[1]["input_ids"] == bare["input_ids"] and stats.kept == 2


def test_scoring_a_conversation_differs_from_its_bare_prompt():
    s = Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=4, max_prompt_tokens=64, batch_size=8, max_retries=1)
    batch = {
        "row_id": np.array(["bare", "conv"]),
        "prompt": np.array(["And times 3?"] * 2, dtype=object),
        "context": np.array([None, CONTEXT], dtype=object),
    }
    out = s(batch)
    assert list(out["error"]) == [None, None]
    conv_ids = s.tokenizer.apply_chat_template(
        messages_for("And times 3?", None, CONTEXT), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert out["prompt_tokens"][1] == len(conv_ids) > out["prompt_tokens"][0]
    assert not np.allclose(out["embedding"][0], out["embedding"][1])
    # a batch without a context column scores as before: the bare row's scores are unchanged
    alone = s({"row_id": np.array(["bare"]), "prompt": np.array(["And times 3?"], dtype=object)})
    assert alone["prompt_tokens"][0] == out["prompt_tokens"][0]
    np.testing.assert_allclose(alone["embedding"][0], out["embedding"][0], atol=1e-5)
    # a long history is cut from its oldest turns, never the final question: within max_prompt_tokens
    # (tiny-llama: 26 tokens a user turn, 1 an answer, 6 the question: two of the three pairs fit in 64)
    pairs = [[{"role": "user", "content": f"{k} " + "word " * 12}, {"role": "assistant", "content": "ok"}] for k in range(3)]
    long = json.dumps(pairs[0] + pairs[1] + pairs[2])
    cut = s(
        {
            "row_id": np.array(["long"]),
            "prompt": np.array(["And times 3?"], dtype=object),
            "context": np.array([long], dtype=object),
        }
    )
    kept = s.tokenizer.apply_chat_template(
        messages_for("And times 3?", None, json.dumps(pairs[1] + pairs[2])),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    assert cut["error"][0] is None and cut["prompt_tokens"][0] == len(kept)


def test_evaluation_sees_the_conversation():
    ev = Evaluator("builtin:tiny-llama", dtype="float32", max_seq_len=128, max_new_tokens=3, batch_size=4)
    rows = [
        {"row_id": "c", "prompt": "And times 3?", "response": "twelve", "context": CONTEXT, "task": "t"},
        {"row_id": "b", "prompt": "And times 3?", "response": "twelve", "task": "t"},
    ]
    conv, bare = ev.losses(rows, "base")
    assert conv["n_tokens"] == bare["n_tokens"] > 0  # the same answer tokens are scored ...
    assert conv["loss_sum"] != pytest.approx(bare["loss_sum"], rel=1e-4)  # ... after a different input
    results = ev.evaluate(rows)
    assert [r["row_id"] for r in results] == ["c", "b"] and all(isinstance(r["prediction"], str) for r in results)


@pytest.mark.slow
def test_a_conversation_pool_scores_on_ray_as_in_process(ray_cluster, tmp_path):
    """ingest (ShareGPT) -> pool.parquet with its context column -> score_pool on Ray Data: each row
    is scored as the in-process Scorer scores its prompt with its context."""
    from edsft.config import Config
    from edsft.distributed.scoring import score_pool
    from edsft.pools.ingest import ingest_pool
    from edsft.storage import get_store

    chats = [
        [("human", "Hi, who are you?"), ("gpt", "An assistant.")],
        [("system", "Answer in French."), ("human", "Hello"), ("gpt", "Bonjour"), ("human", "Thanks"), ("gpt", "Merci")],
        [("human", "An open question")],
    ]
    (tmp_path / "sg.json").write_text(json.dumps([{"conversations": [{"from": r, "value": v} for r, v in c]} for c in chats]))
    cfg = Config().replace(
        **{
            "pool.path": str(tmp_path / "sg.json"),
            "scoring.model": "builtin:tiny-llama",
            "scoring.max_new_tokens": 4,
            "scoring.batch_size": 4,
            "scoring.num_actors": 1,
            "scoring.cpus_per_actor": 0.5,
            "scoring.max_prompt_tokens": 64,
            "scoring.dtype": "float32",
        }
    )
    run = get_store(tmp_path / "run")
    ingest_pool(cfg, run, progress=False)
    pool = run.child("pool.parquet").read_table().to_pylist()
    assert [r["context"] is not None for r in pool] == [False, True, False]
    s = score_pool(cfg, run.child("pool.parquet"), run.child("scores.parquet"), progress=False)
    assert s["rows_scored"] == 3
    scores = {r["row_id"]: r for r in run.child("scores.parquet").read_table().to_pylist()}
    local = Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=4, max_prompt_tokens=64, batch_size=4, max_retries=1)
    out = local(
        {
            "row_id": np.array([r["row_id"] for r in pool]),
            "prompt": np.array([r["prompt"] for r in pool], dtype=object),
            "context": np.array([r["context"] for r in pool], dtype=object),
        }
    )
    for i, r in enumerate(pool):
        assert scores[r["row_id"]]["prompt_tokens"] == out["prompt_tokens"][i]
        np.testing.assert_allclose(scores[r["row_id"]]["embedding"], out["embedding"][i], atol=1e-4)


def test_a_conversation_pool_keeps_its_context_through_annotation_into_training_examples(tmp_path):
    """ingest (messages layout) -> annotate (oracle) -> load_examples: the earlier turns reach training."""
    from edsft.annotation import annotate
    from edsft.config import Config
    from edsft.pools.ingest import ingest_pool
    from edsft.storage import get_store
    from edsft.training.data import load_examples

    src = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
                {"role": "user", "content": f"follow-up {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(6)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config().replace(**{"pool.path": str(src), "pool.layout": "messages", "output.dir": str(tmp_path / "run")})
    run = get_store(str(tmp_path / "run"))
    ingest_pool(cfg, run, progress=False)
    pool = run.child("pool.parquet").read_table()
    import pyarrow as pa
    import pyarrow.parquet as pq

    sel = pa.table({"row_id": pool.column("row_id"), "rank": pa.array(range(pool.num_rows), pa.int64())})
    pq.write_table(sel, tmp_path / "selection.parquet")
    annotate(
        cfg,
        get_store(str(tmp_path / "selection.parquet")),
        run.child("pool.parquet"),
        get_store(str(tmp_path / "annotated.parquet")),
        get_store(str(tmp_path / "exports")),
    )
    got = {r["prompt"]: r for r in load_examples(get_store(str(tmp_path / "annotated.parquet")))}
    assert set(got) == {f"follow-up {i}" for i in range(6)}
    for i in range(6):
        turns = json.loads(got[f"follow-up {i}"]["context"])
        assert [t["content"] for t in turns] == ["Be brief.", f"q{i}", f"a{i}"] and got[f"follow-up {i}"][
            "response"
        ] == f"answer {i}"
