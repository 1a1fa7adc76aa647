from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edsft.annotation import AnnotationError, annotate, escape_cell, unescape_cell
from edsft.cli import main
from edsft.config import load_config
from edsft.storage import get_store


def _make_run(folder, prompts, selected):
    pool = folder / "pool.parquet"
    pool.mkdir()
    n = len(prompts)
    ids = [f"r{i}" for i in range(n)]
    rows = {
        "row_id": ids,
        "prompt": prompts,
        "response": [f"a{i}" for i in range(n)],
        "task": ["t" + str(i % 2) for i in range(n)],
        "source": ["x"] * n,
        "line": list(range(1, n + 1)),
    }
    t = pa.table(rows)
    pq.write_table(t.slice(0, n // 2), pool / "part-00000.parquet")  # two parts: the join must stream both
    pq.write_table(t.slice(n // 2), pool / "part-00001.parquet")
    k = len(selected)
    sel = pa.table({"row_id": selected, "rank": list(range(k)), "gain": [1.0] * k, "selector": ["x"] * k, "shard": [0] * k})
    pq.write_table(sel, folder / "selection.parquet")
    return get_store(folder)


@pytest.fixture
def run(tmp_path):
    return _make_run(tmp_path, [f"p{i}" for i in range(10)], ["r7", "r2", "r9"])


def _import(run, path, *overrides):
    cfg = load_config(None, ["annotation.mode=import", f"annotation.annotations_path={path}", *overrides])
    return annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)


def _jsonl(run, name, recs, encoding="utf-8"):
    f = run.child(name)
    f.write_bytes("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs).encode(encoding))
    return f.path


def test_oracle_joins_responses_in_rank_order(run):
    cfg = load_config()
    s = annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    t = run.child("annotated.parquet").read_table()
    assert s["rows"] == 3
    assert t.column("row_id").to_pylist() == ["r7", "r2", "r9"]
    assert t.column("response").to_pylist() == ["a7", "a2", "a9"]
    assert t.column("rank").to_pylist() == [0, 1, 2]


def test_selection_from_another_run_is_a_clear_error(run):
    pq.write_table(pa.table({"row_id": ["zz"], "rank": [0]}), run.child("selection.parquet").path)
    with pytest.raises(AnnotationError, match="not in the pool"):
        annotate(load_config(), run.child("selection.parquet"), run.child("pool.parquet"), run.child("a.parquet"), run)


def test_export_then_import_reports_missing_and_unknown(run):
    cfg = load_config(None, ["annotation.mode=export"])
    s = annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    assert s["rows"] == 3 and not run.child("annotated.parquet").exists()
    exported = run.child("to_annotate.jsonl").read_jsonl()
    assert [r["row_id"] for r in exported] == ["r7", "r2", "r9"]
    assert all("response" in r and r["response"] == "" for r in exported)  # the label is not exported
    assert run.child("to_annotate.csv").read_text().splitlines()[0] == "row_id,prompt,task,response"

    done = run.child("done.jsonl")
    done.write_text(
        "\n".join(
            [
                json.dumps({"row_id": "r7", "response": "seven"}),
                json.dumps({"row_id": "nope", "response": "x"}),
                "{not json",
                json.dumps({"row_id": "r9", "response": "nine"}),
            ]
        )
        + "\n"
    )
    # one of three selected ids is missing: fine only when asked for (the default is an error, below)
    cfg = load_config(
        None, ["annotation.mode=import", f"annotation.annotations_path={done.path}", "annotation.allow_missing=true"]
    )
    s = annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    assert s["rows"] == 2 and s["missing_ids"] == 1 and s["missing_examples"] == ["r2"]
    assert s["unknown_ids"] == 1 and s["unknown_examples"] == ["nope"] and len(s["bad_lines"]) == 1
    t = run.child("annotated.parquet").read_table()
    assert t.column("response").to_pylist() == ["seven", "nine"]


def test_import_of_a_missing_file_is_a_clear_error(run, tmp_path):
    cfg = load_config(None, ["annotation.mode=import", f"annotation.annotations_path={tmp_path}/nope.jsonl"])
    with pytest.raises(AnnotationError, match="does not exist"):
        annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("a.parquet"), run)


def test_missing_ids_are_an_error_naming_how_many_and_which(tmp_path, capsys):
    # the case: 12 of 32 selected ids missing must not pass as "20 rows"
    run = _make_run(tmp_path, [f"p{i}" for i in range(40)], [f"r{i}" for i in range(32)])
    path = _jsonl(run, "done.jsonl", [{"row_id": f"r{i}", "response": f"x{i}"} for i in range(20)])
    with pytest.raises(AnnotationError, match=r"12 of the 32 selected row_ids have no usable annotation") as e:
        _import(run, path)
    assert "'r20'" in str(e.value) and "annotation.allow_missing=true" in str(e.value)
    assert not run.child("annotated.parquet").exists()
    s = _import(run, path, "annotation.allow_missing=true")
    assert s["rows"] == 20 and s["missing_ids"] == 12 and s["missing_examples"][:2] == ["r20", "r21"]
    # the console says it too: a partial import never passes for "20 rows"
    err = capsys.readouterr().err
    assert "20 of 32 selected ids annotated" in err and "12 missing (e.g. r20, r21, r22)" in err
    # with nothing usable at all, allow_missing does not help
    empty = _jsonl(run, "empty.jsonl", ["{broken"])
    with pytest.raises(AnnotationError, match="32 of the 32"):
        _import(run, empty, "annotation.allow_missing=true")


def test_duplicates_are_counted_and_conflicts_are_an_error_naming_the_lines(run, capsys):
    same = _jsonl(
        run,
        "same.jsonl",
        [
            {"row_id": "r7", "response": "seven"},
            {"row_id": "r2", "response": "two"},
            {"row_id": "r7", "response": "seven"},
            {"row_id": "r9", "response": "nine"},
        ],
    )
    s = _import(run, same)
    assert s["rows"] == 3 and s["duplicate_ids"] == 1 and s["duplicate_examples"] == ["r7"] and s["conflicting_ids"] == 0
    assert "1 repeated with the same response" in capsys.readouterr().err
    clash = _jsonl(
        run,
        "clash.jsonl",
        [
            {"row_id": "r7", "response": "seven"},
            {"row_id": "r2", "response": "two"},
            {"row_id": "r9", "response": "nine"},
            {"row_id": "r7", "response": "SEVEN"},
            {"row_id": "zz", "response": "a"},
            {"row_id": "zz", "response": "b"},
        ],
    )
    with pytest.raises(AnnotationError, match=r"^1 row_ids have different responses.*'r7' on lines \[1, 4\]\)"):
        _import(run, clash)  # zz is not selected: its two answers do not matter
    assert "1 with conflicting responses" in capsys.readouterr().err


def test_every_bad_line_is_counted_with_a_bounded_sample(run, capsys):
    good = [{"row_id": r, "response": "ok"} for r in ("r7", "r2", "r9")]
    bad = ["{not json"] * 20 + [
        json.dumps({"row_id": "r1"}),
        json.dumps({"row_id": "r1", "response": ""}),
        json.dumps({"row_id": "r1", "response": 3}),
        json.dumps(["r1", "x"]),
        json.dumps({"row_id": "r1", "response": "\ud800"}),
    ]  # a lone surrogate: valid JSON
    s = _import(run, _jsonl(run, "done.jsonl", good + bad))
    assert s["rows"] == 3 and s["bad_lines_total"] == 25 and len(s["bad_lines"]) == 10
    assert s["bad_lines"][0].startswith("line 4: not JSON")
    assert "25 bad lines" in capsys.readouterr().err
    tail = _import(run, _jsonl(run, "tail.jsonl", good + bad[20:]))  # each kind of bad line has its reason
    assert [b.split(": ", 1)[1] for b in tail["bad_lines"]] == [
        'expected an object with "row_id" and "response"',
        "empty response",
        "response must be a string, got int",
        'expected an object with "row_id" and "response"',
        "row_id or response is not valid Unicode (a lone surrogate)",
    ]


def test_a_bom_is_accepted_and_latin1_is_a_clear_error_with_file_and_line(run, capsys):
    recs = [{"row_id": "r7", "response": "sept"}, {"row_id": "r2", "response": "deux"}, {"row_id": "r9", "response": "neuf"}]
    s = _import(run, _jsonl(run, "bom.jsonl", recs, encoding="utf-8-sig"))
    assert s["rows"] == 3 and s["bad_lines_total"] == 0
    recs[2]["response"] = "café"
    latin = _jsonl(run, "latin.jsonl", [json.dumps(r, ensure_ascii=False) for r in recs], encoding="latin-1")
    with pytest.raises(AnnotationError, match=r"latin\.jsonl line 3 is not UTF-8 .*save the file as UTF-8"):
        _import(run, latin)
    # through the CLI: exit 2 (bad input), the message and no traceback
    code = main(["annotate", f"output.dir={run.path}", "annotation.mode=import", f"annotation.annotations_path={latin}"])
    err = capsys.readouterr().err
    assert code == 2 and "line 3 is not UTF-8" in err and "Traceback" not in err


TRICKY = [
    '=HYPERLINK("http://evil","click")',
    "+1+2",
    "-2",
    "@SUM(A1)",
    "\t=1",
    "\r=1",
    "'quoted",
    "'=x",
    "''",
    "plain, with comma",
    'say "hi"\nsecond line',
    "",
    "=",
    "a=b",
    "naïve 東京 👍",
]


def test_escape_cell_is_exactly_undone_and_leaves_no_formula_lead():
    for text in TRICKY:
        assert unescape_cell(escape_cell(text)) == text
        assert not escape_cell(text).startswith(("=", "+", "-", "@", "\t", "\r"))
    assert escape_cell("=1") == "'=1" and escape_cell("plain") == "plain"


def test_exported_csv_escapes_formulas_and_imports_back_exactly(tmp_path):
    run = _make_run(tmp_path, TRICKY, [f"r{i}" for i in range(len(TRICKY))][::-1])
    cfg = load_config(None, ["annotation.mode=export"])
    annotate(cfg, run.child("selection.parquet"), run.child("pool.parquet"), run.child("annotated.parquet"), run)
    raw = run.child("to_annotate.csv").read_text()
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    assert rows[0] == ["row_id", "prompt", "task", "response"]
    cells = [c for r in rows for c in r]
    assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells)  # no spreadsheet runs any cell
    prompts = {r[0]: unescape_cell(r[1]) for r in rows[1:]}
    assert prompts == {f"r{i}": p for i, p in enumerate(TRICKY)}  # the prompts round-trip exactly

    # annotators fill the response column (formula-looking answers escaped the way export does), save, import
    answers = {f"r{i}": ("=" + str(i) if i % 3 == 0 else f'answer {i}, with "quotes"\nand lines') for i in range(len(TRICKY))}
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(rows[0])
    for r in rows[1:]:
        w.writerow(r[:3] + [escape_cell(answers[unescape_cell(r[0])])])
    done = run.child("done.csv")
    done.write_bytes(buf.getvalue().encode("utf-8-sig"))  # as a spreadsheet's "CSV UTF-8" saves it
    s = _import(run, done.path)
    assert s["format"] == "csv" and s["rows"] == len(TRICKY) and s["bad_lines_total"] == 0 and s["missing_ids"] == 0
    t = run.child("annotated.parquet").read_table()
    assert dict(zip(t.column("row_id").to_pylist(), t.column("response").to_pylist())) == answers
    assert t.column("prompt").to_pylist() == TRICKY[::-1]  # prompts come from the pool, in rank order


def test_csv_bad_rows_are_counted_with_their_starting_line(run):
    text = 'row_id,prompt,task,response\nr7,"two\nline prompt",t1,seven\nr2,p2,t0\nr9,p9,t1,\nr2,p2,t0,two\n'
    done = run.child("done.csv")
    done.write_text(text)
    s = _import(run, done.path, "annotation.allow_missing=true")
    assert s["rows"] == 2 and s["bad_lines_total"] == 2 and s["missing_examples"] == ["r9"]
    assert s["bad_lines"] == ["line 4: 3 cells, the header has 4", "line 5: empty response"]
    done.write_text("id,answer\nr7,x\n")
    with pytest.raises(AnnotationError, match="line 1: the CSV header .* lacks row_id"):
        _import(run, done.path)
