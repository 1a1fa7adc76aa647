"""Record layouts (alpaca, ShareGPT, OpenAI messages, renamed fields) and file sources (CSV, Arrow
IPC, `datasets` save_to_disk folders, hf://) ingest with exact kept / quarantined counts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import format_data as fd
import fsspec.implementations.dirfs
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pool_data import _invariant

from edsft.config import Config, ConfigError
from edsft.pipeline import Run
from edsft.pools import sources
from edsft.pools.fingerprint import fingerprint
from edsft.pools.ingest import ingest_pool
from edsft.pools.records import FieldMapping, content_row_id, mapping_for
from edsft.pools.sources import PoolError, list_files
from edsft.storage import get_store


def _ingest(tmp_path, path, name="run", **over):
    cfg = Config().replace(**{"pool.path": str(path), "pool.max_bad_fraction": 0.95, **over})
    run = get_store(tmp_path / name)
    s = ingest_pool(cfg, run, progress=False)
    _invariant(s)
    rows = run.child("pool.parquet").read_table().to_pylist()
    bad = {r["line"]: r["reason"] for r in run.child("quarantine.jsonl").read_jsonl()}
    return s, rows, bad


def _context(row):
    return json.loads(row["context"]) if row["context"] is not None else None


def test_alpaca_with_system_and_history(tmp_path):
    s, rows, bad = _ingest(tmp_path, fd.alpaca_jsonl(tmp_path / "a.jsonl"))
    assert [r["line"] for r in rows] == fd.ALPACA_KEPT and bad == fd.ALPACA_BAD
    plain, system, hist, unlabeled = rows
    # a record without system or history is exactly the flat row
    assert plain["context"] is None and plain["row_id"] == content_row_id("Capital of France?", "Paris")
    assert (system["prompt"], system["response"]) == ("Translate\n\nchat", "cat")
    assert _context(system) == [{"role": "system", "content": "You translate French."}]
    assert (hist["prompt"], hist["response"]) == ("And the plural?", "cats")
    assert _context(hist) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate chat"},
        {"role": "assistant", "content": "cat"},
        {"role": "user", "content": "And chien?"},
        {"role": "assistant", "content": "dog"},
    ]
    assert (
        hist["row_id"] == content_row_id("And the plural?", "cats", hist["context"]) != content_row_id("And the plural?", "cats")
    )
    assert unlabeled["response"] is None and _context(unlabeled) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    # layout=alpaca reads the same; layout=flat ignores system and history (the old behaviour)
    assert _ingest(tmp_path, tmp_path / "a.jsonl", "alpaca", **{"pool.layout": "alpaca"})[1] == rows
    s, flat, bad = _ingest(tmp_path, tmp_path / "a.jsonl", "flat", **{"pool.layout": "flat"})
    # lines 5 and 6 differ from line 4 only in their history: as flat rows they are exact duplicates
    assert [r["line"] for r in flat] == [1, 2, 3, 4, 8] and bad == {5: "duplicate_id", 6: "duplicate_id", 7: "empty_prompt"}
    assert all(r["context"] is None and r["row_id"] == content_row_id(r["prompt"], r["response"]) for r in flat)


def test_sharegpt_broken_conversations(tmp_path):
    s, rows, bad = _ingest(tmp_path, fd.sharegpt_json(tmp_path / "sg.json"))
    assert [r["line"] for r in rows] == fd.SHAREGPT_KEPT and bad == fd.SHAREGPT_BAD
    assert (s["rows_read"], s["rows_kept"], s["rows_quarantined"]) == (14, 3, 11)
    assert s["quarantine_by_reason"] == {
        "no_user_turn": 2,
        "role_order": 3,
        "empty_turn": 1,
        "unknown_role": 2,
        "wrong_type": 2,
        "duplicate_id": 1,
    }
    single, multi, open_q = rows
    assert (single["prompt"], single["response"], single["context"]) == ("Hi, who are you?", "An assistant.", None)
    assert single["row_id"] == content_row_id("Hi, who are you?", "An assistant.")
    assert (multi["prompt"], multi["response"]) == ("Thanks", "Merci")
    assert _context(multi) == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    assert (open_q["prompt"], open_q["response"]) == ("An open question", None)
    q = {r["line"]: r for r in get_store(tmp_path / "run").child("quarantine.jsonl").read_jsonl()}
    assert "tool turns are not supported" in q[9]["detail"] and "pool.tags" in q[8]["detail"]
    assert "turn 1 is user, expected assistant" in q[4]["detail"]
    # layout=sharegpt explicitly: the same rows
    assert _ingest(tmp_path, tmp_path / "sg.json", "sg", **{"pool.layout": "sharegpt"})[1] == rows


def test_messages_with_required_label(tmp_path):
    s, rows, bad = _ingest(tmp_path, fd.messages_jsonl(tmp_path / "m.jsonl"), **{"pool.require_response": True})
    assert [r["line"] for r in rows] == fd.MESSAGES_KEPT and bad == fd.MESSAGES_BAD
    multi = rows[0]
    assert (multi["prompt"], multi["response"], multi["task"]) == ("times 3?", "12", "math")
    assert [t["role"] for t in _context(multi)] == ["system", "user", "assistant"]
    # without require_response the conversation ending on a user turn is an unlabeled prompt
    s, rows, bad = _ingest(tmp_path, tmp_path / "m.jsonl", "open")
    assert [r["line"] for r in rows] == [1, 2, 3] and rows[2]["response"] is None and 3 not in bad
    # the same rule for flat rows
    (tmp_path / "f.jsonl").write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n')
    assert _ingest(tmp_path, tmp_path / "f.jsonl", "f", **{"pool.require_response": True})[2] == {2: "no_response"}


def test_renamed_fields_llama_factory_style(tmp_path):
    recs = [
        {
            "dialog": [{"speaker": "customer", "text": "My order?"}, {"speaker": "agent", "text": "Shipped."}],
            "sys": "Support desk.",
        },
        {"dialog": [{"speaker": "customer", "text": "Refund?"}, {"speaker": "bot", "text": "No."}]},  # unknown_role
    ]
    fd._jsonl(tmp_path / "r.jsonl", recs)
    over = {
        "pool.layout": "sharegpt",
        "pool.columns": {"messages": "dialog", "system": "sys"},
        "pool.tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent"},
    }
    s, rows, bad = _ingest(tmp_path, tmp_path / "r.jsonl", **over)
    assert [(r["prompt"], r["response"], _context(r)) for r in rows] == [
        ("My order?", "Shipped.", [{"role": "system", "content": "Support desk."}])
    ]
    assert bad == {2: "unknown_role"}
    # the same mapping is found by auto once the column is named
    assert _ingest(tmp_path, tmp_path / "r.jsonl", "auto", **{**over, "pool.layout": "auto"})[1] == rows
    # alpaca columns renamed: prompt / query / response / history
    fd._jsonl(tmp_path / "al.jsonl", [{"question": "Why?", "extra": "ctx", "answer": "Because.", "turns": [["a", "b"]]}])
    cols = {"prompt": "question", "query": "extra", "response": "answer", "history": "turns"}
    _, rows, _ = _ingest(tmp_path, tmp_path / "al.jsonl", "al", **{"pool.columns": cols})
    assert [(r["prompt"], r["response"], len(_context(r))) for r in rows] == [("Why?\n\nctx", "Because.", 2)]


def test_layout_config_errors():
    with pytest.raises(ConfigError, match=r"pool.columns: unknown key 'promt': did you mean 'prompt'\?"):
        Config().replace(**{"pool.columns": {"promt": "q"}})
    with pytest.raises(ConfigError, match="tool-use conversations are not supported"):
        Config().replace(**{"pool.columns": {"tools": "t"}})
    with pytest.raises(ConfigError, match="pool.layout='chatml' is not one of"):
        Config().replace(**{"pool.layout": "chatml"})
    assert isinstance(mapping_for(Config().replace(**{"pool.layout": "flat"}).pool), FieldMapping)


def test_flat_csv(tmp_path):
    s, rows, bad = _ingest(tmp_path, fd.flat_csv(tmp_path / "p.csv"), **{"pool.id_field": "id"})
    assert bad == fd.FLAT_CSV_BAD
    assert [(r["line"], r["row_id"], r["prompt"], r["response"]) for r in rows] == [
        (2, "007", "A prompt\nover two lines", "yes"),
        (4, "8", "Second\n\nctx", "42"),
        (9, "11", "Third", None),
    ]


def test_mixed_folder_auto(tmp_path):
    """One folder, every layout and file format; auto tells each record by its shape."""
    pool = tmp_path / "pool"
    pool.mkdir()
    fd.alpaca_jsonl(pool / "a.jsonl")
    fd.sharegpt_json(pool / "b.json")
    fd.messages_csv(pool / "c.csv")
    fd.messages_jsonl(pool / "d.jsonl")
    fd.messages_parquet(pool / "e.parquet")  # both rows repeat d.jsonl's lines 1-2
    fd.sharegpt_feather(pool / "f.feather")  # all three repeat b.json's rows 0-2
    s, rows, bad = _ingest(tmp_path, pool)
    assert s["rows_read"] == 8 + 14 + 3 + 7 + 2 + 3
    # c.csv: row 2 kept, row 3 malformed_json, row 4 repeats b.json's row 0; d.jsonl: line 2 repeats
    # c.csv's row 2 (files are read in name order; the task is no part of the content), line 3 is kept
    # (no label needed); e.parquet and f.feather repeat rows read before
    assert s["rows_kept"] == 4 + 3 + 1 + 2
    assert s["quarantine_by_reason"] == {
        "empty_turn": 3,
        "wrong_type": 5,
        "empty_prompt": 1,
        "no_user_turn": 3,
        "role_order": 3,
        "unknown_role": 2,
        "duplicate_id": 1 + 1 + 1 + 2 + 3,
        "malformed_json": 1,
        "prompt_too_long": 1,
    }
    by_file = {(r["source"].rsplit("/", 1)[1], r["line"]) for r in rows}
    assert ("c.csv", 2) in by_file and ("c.csv", 4) not in by_file


def test_ray_ingest_of_conversations(tmp_path, ray_cluster):
    from edsft.distributed.ingest import ingest_pool_ray

    pool = tmp_path / "pool"
    pool.mkdir()
    fd.alpaca_jsonl(pool / "a.jsonl")
    fd.sharegpt_json(pool / "b.json")
    fd.messages_jsonl(pool / "d.jsonl")
    cfg = Config().replace(**{"pool.path": str(pool), "pool.require_response": True, "pool.max_bad_fraction": 0.95})
    local = ingest_pool(cfg, get_store(tmp_path / "local"), progress=False)
    dist = ingest_pool_ray(cfg, get_store(tmp_path / "ray"), progress=False)
    for key in ("rows_read", "rows_kept", "rows_quarantined", "quarantine_by_reason"):
        assert dist[key] == local[key], key
    assert (dist["rows_read"], dist["rows_kept"]) == (8 + 14 + 7, 3 + 2 + 2)  # require_response drops the unlabeled ones
    table = lambda name: get_store(tmp_path / name).child("pool.parquet").read_table().drop(["source"])  # noqa: E731
    assert table("ray").equals(table("local")) and table("ray").column("context").null_count == 3


def test_arrow_file_and_save_to_disk(tmp_path):
    feather_s, feather_rows, _ = _ingest(tmp_path, fd.sharegpt_feather(tmp_path / "f.feather"), "feather")
    assert [(r["line"], r["prompt"]) for r in feather_rows] == [(0, "Hi, who are you?"), (1, "Thanks"), (2, "An open question")]
    arrow_typed = fd.MESSAGES[:4] + fd.MESSAGES[5:]  # not line 5: an int content cannot share a column with text
    saved = fd.save_to_disk(tmp_path / "saved", arrow_typed, shards=2)
    listing = list_files(str(saved))
    assert [i.origin.rsplit("/", 1)[1] for i in listing.inputs] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert {i.fmt for i in listing.inputs} == {"arrow"} and listing.skipped == []  # metadata files are not pools
    s, rows, bad = _ingest(tmp_path, saved, **{"pool.require_response": True})
    assert s["rows_read"] == 6 and len(rows) == 2
    q = sorted(
        (r["source"].rsplit("/", 1)[1], r["line"], r["reason"])
        for r in get_store(tmp_path / "run").child("quarantine.jsonl").read_jsonl()
    )
    # three records per file: rows 0-2 of the first, then rows 0-2 of the second (lines 4, 6, 7)
    assert q == [
        ("data-00000-of-00002.arrow", 2, "no_response"),
        ("data-00001-of-00002.arrow", 0, "empty_turn"),
        ("data-00001-of-00002.arrow", 1, "no_user_turn"),
        ("data-00001-of-00002.arrow", 2, "prompt_too_long"),
    ]
    # a DatasetDict folder reads its train split
    fd.save_to_disk(tmp_path / "dd" / "train", fd.MESSAGES[:2], shards=1)
    fd.save_to_disk(tmp_path / "dd" / "test", fd.MESSAGES[2:4], shards=1)
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    s, rows, _ = _ingest(tmp_path, tmp_path / "dd", "dd")
    assert s["files"] == [str(tmp_path / "dd" / "train" / "data-00000-of-00001.arrow")] and len(rows) == 2
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["test"]}')
    with pytest.raises(PoolError, match="without a 'train' split"):
        list_files(str(tmp_path / "dd"))


class _HubLikeFileSystem(fsspec.implementations.local.LocalFileSystem):
    """Local files described the way HfFileSystem.info() describes hub files: no mtime, the git
    ``blob_id``, and for LFS files (here .arrow and .parquet, as the hub's default .gitattributes
    has it) ``lfs`` with the content's sha256 and size, the blob being the LFS pointer."""

    def info(self, path, **kwargs):
        out = super().info(path, **kwargs)
        out.pop("mtime", None)
        if out["type"] == "file":
            data = Path(out["name"]).read_bytes()
            if out["name"].endswith((".arrow", ".parquet")):
                sha = hashlib.sha256(data).hexdigest()
                out["lfs"] = {"size": len(data), "sha256": sha, "pointer_size": 0}
                data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            out["blob_id"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return out


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """hf:// paths served from tmp_path/hub (datasets/<org>/<name>/...) by a local fsspec
    filesystem in place of HfFileSystem: the path resolution, listing and reading are edsft's."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(
        sources,
        "hf_filesystem",
        lambda: fsspec.implementations.dirfs.DirFileSystem(str(hub), _HubLikeFileSystem()),
    )
    return hub


def test_hf_paths(tmp_path, local_hub):
    repo = local_hub / "datasets" / "org" / "chat"
    (repo / "data").mkdir(parents=True)
    fd.sharegpt_json(repo / "data" / "train-0.json")
    fd.messages_jsonl(repo / "data" / "train-1.jsonl")
    (repo / "README.md").write_text("# a dataset card")
    fd.save_to_disk(repo / "saved", fd.MESSAGES[:2], shards=1)
    # one file
    s, rows, bad = _ingest(tmp_path, "hf://datasets/org/chat/data/train-0.json", "one")
    assert [r["line"] for r in rows] == fd.SHAREGPT_KEPT and bad == fd.SHAREGPT_BAD
    assert s["files"] == ["hf://datasets/org/chat/data/train-0.json"] and rows[0]["source"] == s["files"][0]
    # a glob, a folder (its README skipped with the reason), a save_to_disk folder
    s, _, _ = _ingest(tmp_path, "hf://datasets/org/chat/data/*.json*", "glob")
    assert (
        s["files"] == ["hf://datasets/org/chat/data/train-0.json", "hf://datasets/org/chat/data/train-1.jsonl"]
        and s["rows_read"] == 21
    )
    listing = list_files("hf://datasets/org/chat")
    assert [k.path for k in listing.skipped] == ["hf://datasets/org/chat/README.md"]
    s, rows, _ = _ingest(tmp_path, "hf://datasets/org/chat/saved", "saved")
    assert s["files"] == ["hf://datasets/org/chat/saved/data-00000-of-00001.arrow"] and len(rows) == 2
    # the fingerprint sees the hub files (adding one changes it)
    pool = Config().replace(**{"pool.path": "hf://datasets/org/chat/data"}).pool
    before = fingerprint(pool)
    fd.alpaca_jsonl(repo / "data" / "train-2.jsonl")
    assert before is not None and fingerprint(pool) != before
    with pytest.raises(PoolError, match="not a dataset on the hub"):
        list_files("hf://org/chat/data")
    with pytest.raises(PoolError, match="does not exist"):
        list_files("hf://datasets/org/missing/x.jsonl")


def test_a_same_size_hub_commit_changes_the_ingest_hash(tmp_path, local_hub):
    """Hub files have no mtime: a new commit of a file with the same size is seen by its content
    identity (the blob id, or the LFS sha256), and an unchanged file keeps the hash."""
    repo = local_hub / "datasets" / "org" / "chat" / "data"
    repo.mkdir(parents=True)
    (repo / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    pq.write_table(pa.table({"instruction": ["q"], "output": ["a"]}), repo / "b.parquet")

    def ingest_hash():
        cfg = Config().replace(**{"output.dir": str(tmp_path / "run"), "pool.path": "hf://datasets/org/chat/data"})
        return Run.open(cfg).hash("ingest")

    before = ingest_hash()
    assert ingest_hash() == before
    (repo / "a.jsonl").write_text('{"instruction": "q", "output": "b"}\n')  # a git blob, same size
    after_blob = ingest_hash()
    assert after_blob != before
    size = (repo / "b.parquet").stat().st_size
    pq.write_table(pa.table({"instruction": ["q"], "output": ["b"]}), repo / "b.parquet")  # an LFS file, same size
    assert (repo / "b.parquet").stat().st_size == size and ingest_hash() not in (before, after_blob)


def test_parquet_conversations_and_flat_parquet_unchanged(tmp_path):
    """A flat Parquet pool ingests to the same values as before conversations existed: the new
    context column is all null and row_ids are the flat content hashes."""
    recs = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "task": "t"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "flat.parquet")
    s, rows, _ = _ingest(tmp_path, tmp_path / "flat.parquet")
    assert [(r["row_id"], r["prompt"], r["response"], r["context"]) for r in rows] == [
        (content_row_id(f"q{i}", f"a{i}"), f"q{i}", f"a{i}", None) for i in range(5)
    ]


def test_context_turns_reads_what_batches_carry():
    from edsft.pools.records import context_turns

    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert context_turns(json.dumps(turns)) == turns == context_turns(turns)
    # a null context through a pandas batch (Ray Data's map_batches) arrives as NaN
    assert context_turns(None) == context_turns(float("nan")) == context_turns("") == []
