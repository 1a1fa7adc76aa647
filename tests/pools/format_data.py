"""Pools in each record layout and file format, with broken conversations, and what ingest must
make of them: ``(fixture writer, expected kept, expected quarantine reasons by line)``.

Every writer returns the path it wrote; the expectations are exact, so a fixture line that is
added or moved must update them.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return path


# ---- alpaca: instruction / input / output plus system and history -------------------------------
ALPACA = [
    {"instruction": "Capital of France?", "input": "", "output": "Paris"},  # 1 plain: exactly the flat row
    {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate French."},  # 2 system
    {
        "instruction": "And the plural?",
        "output": "cats",
        "system": "Be brief.",
        "history": [["Translate chat", "cat"], ["And chien?", "dog"]],
    },  # 3 two earlier pairs
    {"instruction": "Next?", "output": "x", "history": [["first", "   "]]},  # 4 empty_turn (blank earlier answer)
    {"instruction": "Next?", "output": "x", "history": "first then second"},  # 5 wrong_type (history not a list)
    {"instruction": "Next?", "output": "x", "history": [["only one"]]},  # 6 wrong_type (not a pair)
    {"instruction": "", "output": "x", "system": "s"},  # 7 empty_prompt
    {"instruction": "Unlabeled, with history", "history": [["q", "a"]]},  # 8 kept, response null
]
ALPACA_KEPT = [1, 2, 3, 8]
ALPACA_BAD = {4: "empty_turn", 5: "wrong_type", 6: "wrong_type", 7: "empty_prompt"}


def alpaca_jsonl(path):
    return _jsonl(path, ALPACA)


# ---- ShareGPT: conversations of {from, value} ---------------------------------------------------
def _sg(*turns):
    return {"conversations": [{"from": r, "value": v} for r, v in turns]}


SHAREGPT = [
    _sg(("human", "Hi, who are you?"), ("gpt", "An assistant.")),  # 0 single turn
    _sg(("system", "Answer in French."), ("human", "Hello"), ("gpt", "Bonjour"), ("human", "Thanks"), ("gpt", "Merci")),  # 1
    _sg(("human", "An open question")),  # 2 ends on the user: unlabeled, kept
    _sg(("gpt", "I talk alone")),  # 3 no_user_turn
    _sg(("human", "one"), ("human", "two"), ("gpt", "x")),  # 4 role_order (two users in a row)
    _sg(("gpt", "first"), ("human", "q"), ("gpt", "a")),  # 5 role_order (starts with the assistant)
    _sg(("human", "q"), ("system", "late system"), ("gpt", "a")),  # 6 role_order (system after a user turn)
    _sg(("human", "\u200b "), ("gpt", "a")),  # 7 empty_turn (zero-width + space)
    _sg(("human", "q"), ("bing", "a")),  # 8 unknown_role
    _sg(("human", "q"), ("function_call", "{}"), ("observation", "42"), ("gpt", "a")),  # 9 unknown_role (tool turns)
    {"conversations": 5},  # 10 wrong_type
    {"conversations": [["human", "q"]]},  # 11 wrong_type (a turn that is not an object)
    {"conversations": []},  # 12 no_user_turn (empty conversation)
    _sg(("human", "Hi, who are you?"), ("gpt", "An assistant.")),  # 13 duplicate_id of 0
]
SHAREGPT_KEPT = [0, 1, 2]
SHAREGPT_BAD = {
    3: "no_user_turn",
    4: "role_order",
    5: "role_order",
    6: "role_order",
    7: "empty_turn",
    8: "unknown_role",
    9: "unknown_role",
    10: "wrong_type",
    11: "wrong_type",
    12: "no_user_turn",
    13: "duplicate_id",
}


def sharegpt_json(path):
    path.write_text(json.dumps(SHAREGPT, ensure_ascii=False))
    return path


# ---- OpenAI messages: {role, content}; label required ------------------------------------------
def _msg(*turns, **extra):
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


MESSAGES = [
    _msg(
        ("system", "You are terse."), ("user", "2+2?"), ("assistant", "4"), ("user", "times 3?"), ("assistant", "12"), task="math"
    ),  # 1
    _msg(("user", "Name a colour"), ("assistant", "blue")),  # 2
    _msg(("user", "No answer yet")),  # 3 no_response (pool.require_response)
    _msg(("system", "s"), ("user", "q"), ("assistant", None)),  # 4 empty_turn (null content)
    _msg(("user", "q"), ("assistant", 7)),  # 5 wrong_type (content not text)
    _msg(("system", "only a system prompt")),  # 6 no_user_turn
    _msg(
        ("user", "x" * 3000), ("assistant", "a"), ("user", "y" * 1500), ("assistant", "b")
    ),  # 7 prompt_too_long (4500 > 4000 before the answer)
]
MESSAGES_KEPT = [1, 2]
MESSAGES_BAD = {3: "no_response", 4: "empty_turn", 5: "wrong_type", 6: "no_user_turn", 7: "prompt_too_long"}


def messages_jsonl(path):
    return _jsonl(path, MESSAGES)


# ---- the same conversations in the other file formats ------------------------------------------
def messages_parquet(path):
    """messages as a list<struct<role, content>> column (what `datasets` and pandas write)."""
    pq.write_table(pa.Table.from_pylist([MESSAGES[1], MESSAGES[2]]), path)
    return path


def messages_csv(path):
    """A CSV whose messages cell is JSON text; one cell is not JSON."""
    rows = [json.dumps(MESSAGES[1]["messages"]), "[not json", json.dumps(SHAREGPT[0]["conversations"])]
    lines = ["messages,task"] + ['"' + r.replace('"', '""') + '",chat' for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def sharegpt_feather(path):
    feather.write_feather(pa.Table.from_pylist(SHAREGPT[:3]), path)
    return path


# ---- flat CSV ------------------------------------------------------------------------------------
def flat_csv(path):
    path.write_bytes(
        b"id,instruction,input,output\n"
        b'007,"A prompt\nover two lines",,yes\n'  # 2: kept, id stays "007", the quoted newline kept
        b"8,Second,ctx,42\n"  # 4: kept, input joined
        b"\n"  # 5: blank, not a row
        b"9,caf\xe9,,x\n"  # 6: not_utf8 (latin-1 byte)
        b"10,too,many,cells,here\n"  # 7: malformed_csv
        b",no id,,x\n"  # 8: missing_id
        b"11,Third,,\n"  # 9: kept, no response
    )
    return path


FLAT_CSV_BAD = {6: "not_utf8", 7: "malformed_csv", 8: "missing_id"}


# ---- a `datasets` save_to_disk folder, as datasets 2.x/3.x writes it -----------------------------
def save_to_disk(folder, recs, shards=2):
    """Arrow *stream* files data-0000k-of-0000n.arrow + dataset_info.json + state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(recs)
    step = -(-len(recs) // shards)
    names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
    for k, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table.slice(k * step, step))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": n} for n in names], "_fingerprint": "abc", "_format_type": None, "_split": None})
    )
    return folder
