"""Small pools for the ingestion tests (shared by the in-process and Ray tests)."""

from __future__ import annotations

import json


def _rows(n, start=0):
    return [
        {
            "instruction": f"Question number {i}?",
            "input": "ctx" if i % 3 == 0 else "",
            "output": f"answer {i}",
            "task": f"t{i % 4}",
        }
        for i in range(start, start + n)
    ]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _invariant(s):
    assert s["rows_read"] == s["rows_kept"] + s["rows_held_out"] + s["rows_quarantined"]
    assert s["rows_quarantined"] == sum(s["quarantine_by_reason"].values())


def _broken_jsonl(path):
    good = _rows(10)
    lines = [json.dumps(r).encode() for r in good[:5]]
    lines += [
        b'{"instruction": "half a row", ',  # 6 malformed_json
        b"",  # 7 blank: not a row
        b'{"instruction": "caf\xe9 latte", "output": "x"}',  # 8 not_utf8 (latin-1 byte)
        json.dumps({"instruction": "", "output": "x"}).encode(),  # 9 empty_prompt
        json.dumps({"output": "no prompt"}).encode(),  # 10 empty_prompt (missing)
        json.dumps({"instruction": 5, "output": "x"}).encode(),  # 11 wrong_type
        b"[1, 2, 3]",  # 12 wrong_type (not an object)
        json.dumps(good[0]).encode(),  # 13 duplicate_id (exact duplicate of line 1)
        json.dumps({"instruction": "x" * 5000, "output": "long"}).encode(),  # 14 prompt_too_long
        b"not json at all",  # 15 malformed_json
        b"   ",  # 16 blank
    ]
    lines += [json.dumps(r).encode() for r in good[5:]]  # 17-21
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path
