"""The pool source component: which source a pool.path opens, and a custom source registered here
(the worked example of "How to add a pool source"), ingested like any other."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from edsft.config import Config, PoolConfig
from edsft.pools import sources
from edsft.pools.ingest import content_row_id, ingest_pool
from edsft.pools.records import FieldMapping
from edsft.pools.sources import BuiltinPydocs, BuiltinTasks, EvalSplit, FileSource, Input, Listing, open_source, register_source
from edsft.storage import get_store


def test_open_source_by_pool_path(tmp_path):
    tasks = open_source(Config())
    assert isinstance(tasks, BuiltinTasks) and not tasks.parallel and tasks.size_hint == 2000
    assert [i.origin for i in tasks.list_inputs().inputs] == ["builtin:tasks"]
    ev = tasks.eval_split()
    assert ev.fraction == 0 and [i.origin for i in ev.source.list_inputs().inputs] == ["builtin:tasks/eval"]
    assert isinstance(open_source(Config().replace(**{"pool.path": "builtin:pydocs"})), BuiltinPydocs)
    files = open_source(Config().replace(**{"pool.path": str(tmp_path), "pool.eval_fraction": 0.1}))
    assert isinstance(files, FileSource) and files.parallel and files.eval_split() == EvalSplit(fraction=0.1)
    assert open_source(Config().replace(**{"pool.path": "s3://bucket/pool/"})).parallel


# ---------------------------------------------------------------------------------------------
# The worked example: prompts in a plain text file, one per line; every 4th line is the eval split
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextLines:
    """``lines://<path>``: one prompt per line of a UTF-8 text file, no responses."""

    path: str
    pool: PoolConfig
    split: str = "train"
    parallel = False  # one file; a parallel source must be registered where Ray workers import it
    size_hint = None

    @property
    def name(self) -> str:
        return f"lines://{self.path}"

    @property
    def mapping(self) -> FieldMapping:  # the records below are {"prompt": ...}
        return FieldMapping("prompt", None, None, None, None, self.pool.max_prompt_chars)

    def list_inputs(self) -> Listing:
        return Listing([Input(self.path if self.split == "train" else f"{self.path}#eval")])

    def read(self, inp: Input):
        with open(self.path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if (line % 4 == 0) == (self.split == "eval"):
                    yield line, {"prompt": text.rstrip("\n")}

    def eval_split(self) -> EvalSplit:
        return EvalSplit(source=replace(self, split="eval")) if self.split == "train" else EvalSplit()


@pytest.fixture
def lines_source():
    register_source("lines://", lambda cfg: TextLines(cfg.pool.path[len("lines://") :], cfg.pool))
    yield
    sources.SOURCES.pop("lines://")


def test_custom_source_is_ingested_like_any_other(tmp_path, lines_source):
    prompts = [f"prompt {i}" for i in range(1, 13)]
    prompts[4] = "   "  # line 5: quarantined like a blank prompt from any source
    prompts[9] = prompts[0]  # line 10: an exact duplicate of line 1
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    cfg = Config().replace(**{"pool.path": f"lines://{tmp_path / 'p.txt'}"})
    assert isinstance(open_source(cfg), TextLines)
    run = get_store(tmp_path / "run")
    s = ingest_pool(cfg, run, progress=False)
    assert (s["rows_read"], s["rows_kept"], s["quarantine_by_reason"]) == (9, 7, {"empty_prompt": 1, "duplicate_id": 1})
    assert s["files"] == [str(tmp_path / "p.txt")] and s["eval_rows"] == 3
    pool = run.child("pool.parquet").read_table().to_pylist()
    assert [r["line"] for r in pool] == [1, 2, 3, 6, 7, 9, 11]
    assert all(r["row_id"] == content_row_id(r["prompt"], None) and r["response"] is None for r in pool)
    ev = run.child("eval.parquet").read_table().to_pylist()
    assert [(r["line"], r["prompt"], r["source"]) for r in ev] == [
        (n, f"prompt {n}", f"{tmp_path / 'p.txt'}#eval") for n in (4, 8, 12)
    ]
    q = {(r["line"], r["reason"]) for r in run.child("quarantine.jsonl").read_jsonl()}
    assert q == {(5, "empty_prompt"), (10, "duplicate_id")}
    # pool.eval_path replaces the source's own eval split, for custom sources too
    (tmp_path / "e.jsonl").write_text('{"instruction": "held out", "output": "x"}\n')
    s = ingest_pool(cfg.replace(**{"pool.eval_path": str(tmp_path / "e.jsonl")}), get_store(tmp_path / "run2"), progress=False)
    assert s["eval_rows"] == 1 and s["rows_kept"] == 7


def test_a_failing_source_leaves_nothing_behind(tmp_path, lines_source):
    """Fault injection through the source component: a read that dies after some parts are written."""

    run_dir = tmp_path / "run"
    written: list[str] = []

    class Dies(TextLines):
        def read(self, inp):
            for i, (line, rec) in enumerate(super().read(inp)):
                if i == 30:
                    written.extend(p.name for p in (run_dir / "pool.parquet").iterdir())
                    raise RuntimeError("disk went away")
                yield line, rec

    register_source("lines://", lambda cfg: Dies(cfg.pool.path[len("lines://") :], cfg.pool))
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(100)))
    cfg = Config().replace(**{"pool.path": f"lines://{tmp_path / 'p.txt'}", "pool.rows_per_shard": 5})
    with pytest.raises(RuntimeError, match="disk went away"):
        ingest_pool(cfg, get_store(run_dir), progress=False)
    assert len(written) >= 5  # parts were on disk when it died
    assert not run_dir.exists() or not list(run_dir.iterdir())  # no parts, no staging, no partial quarantine
