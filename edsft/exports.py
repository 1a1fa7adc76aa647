"""Subsets out: the selected (or annotated) rows as files other trainers read as they are.

Every subset is written, one JSON object a line with its ``row_id`` (and ``task``), as

* ``alpaca``:   ``instruction`` (the prompt), ``input`` (""), ``output`` (the response; "" before
  annotation), plus ``system`` and ``history`` ([[user, assistant], ...]) when a row has a context;
* ``messages``: ``messages``, the OpenAI chat list (system, earlier turns, the prompt as the last user
  turn, the response as the final assistant turn, which is left out before annotation);
* the pool's own layout: a flat pool's own field names (``pool.prompt_field``, ``pool.response_field``,
  ``pool.task_field``, ``pool.id_field``), or ``sharegpt`` (``conversations`` of ``from``/``value``);

plus ``dataset_info.json``, LLaMA-Factory's registry (``file_name``, ``formatting``, ``columns``,
``tags``): with ``dataset_dir`` set to the folder, ``dataset: edsft_<name>_alpaca`` trains as is. The
``messages`` file is also what TRL's SFTTrainer and axolotl's ``chat_template`` datasets read.

A row is a conversation (:func:`conversation`): the pool's context column (earlier turns and the system
prompt, when the pool came as a chat), then the prompt, then the response when there is one. That is
the only place the layouts depend on how a pool stores its context; every writer is a view of it.

Pure pyarrow/json: no torch, no ray (config layer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UserError
from .storage import Store

__all__ = [
    "CONTEXT_COLUMN",
    "LAYOUTS",
    "SubsetError",
    "conversation",
    "records",
    "response_of",
    "subset_rows",
    "pool_rows",
    "in_rank_order",
    "write_subsets",
    "native_layout",
    "pool_fields",
]

# The pool column with a row's turns before its prompt, as a list of {"role", "content"} (or its JSON
# text): the system prompt and earlier user/assistant turns of a chat pool. Flat pools have none.
CONTEXT_COLUMN = "context"
LAYOUTS = ("alpaca", "messages", "sharegpt", "pool")
_SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


class SubsetError(UserError):
    """A subset that cannot be exported (exit code 2 in the CLI)."""


# ---- one row as a conversation ----------------------------------------------------------------


def conversation(row: Mapping[str, Any]) -> list[dict]:
    """The row's turns, [{"role", "content"}]: its context, the prompt (user), the response
    (assistant) when it has one. The one function that knows how a pool stores its context."""
    ctx = row.get(CONTEXT_COLUMN)
    if isinstance(ctx, str):
        ctx = json.loads(ctx) if ctx.strip() else []
    turns = [{"role": t["role"], "content": t["content"]} for t in (ctx or [])]
    turns.append({"role": "user", "content": row["prompt"]})
    if row.get("response") is not None:
        turns.append({"role": "assistant", "content": row["response"]})
    return turns


def _split(turns: list[dict]) -> tuple[str | None, list[list[str]], str, str | None]:
    """(system, [[user, assistant], ...] before the prompt, prompt, response or None)."""
    system = "\n\n".join(t["content"] for t in turns if t["role"] == "system") or None
    chat = [t for t in turns if t["role"] != "system"]
    response = chat.pop()["content"] if chat[-1]["role"] == "assistant" else None
    prompt = chat.pop()["content"]
    history = [[u["content"], a["content"]] for u, a in zip(chat[0::2], chat[1::2])]
    return system, history, prompt, response


def _alpaca(row: Mapping, turns: list[dict], pool_fields: Mapping) -> dict:
    system, history, prompt, response = _split(turns)
    rec = {"row_id": row["row_id"], "instruction": prompt, "input": "", "output": response or ""}
    if system is not None:
        rec["system"] = system
    if history:
        rec["history"] = history
    return rec


def _messages(row: Mapping, turns: list[dict], pool_fields: Mapping) -> dict:
    return {"row_id": row["row_id"], "messages": turns}


def _sharegpt(row: Mapping, turns: list[dict], pool_fields: Mapping) -> dict:
    system = "\n\n".join(t["content"] for t in turns if t["role"] == "system")
    rec = {
        "row_id": row["row_id"],
        "conversations": [{"from": _SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in turns if t["role"] != "system"],
    }
    if system:
        rec["system"] = system
    return rec


def _pool(row: Mapping, turns: list[dict], pool_fields: Mapping) -> dict:
    """A flat pool's own field names (row_id stays too: it is how import finds the row)."""
    _, _, prompt, response = _split(turns)
    rec = {"row_id": row["row_id"]}
    if pool_fields.get("id_field"):
        rec[pool_fields["id_field"]] = row["row_id"]
    rec[pool_fields.get("prompt_field") or "prompt"] = prompt
    rec[pool_fields.get("response_field") or "response"] = response or ""
    return rec


_WRITERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt, "pool": _pool}


def records(rows: Iterable[Mapping], layout: str, pool_fields: Mapping | None = None) -> list[dict]:
    """The rows (dicts with row_id, prompt, task, and response and context when they exist) in `layout`."""
    write, fields = _WRITERS[layout], dict(pool_fields or {})
    out = []
    for row in rows:
        rec = write(row, conversation(row), fields)
        if row.get("task") is not None:  # under the pool's own name in the pool's layout
            rec[(fields.get("task_field") if layout == "pool" else None) or "task"] = row["task"]
        out.append(rec)
    return out


def response_of(rec: Mapping) -> Any:
    """The response an annotator filled into an exported record of any layout (None: not one)."""
    if "response" in rec:
        return rec["response"]
    if "output" in rec and "instruction" in rec:
        return rec["output"]
    for key, role, content, assistant in (
        ("messages", "role", "content", "assistant"),
        ("conversations", "from", "value", "gpt"),
    ):
        turns = rec.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
            return turns[-1].get(content) if turns[-1].get(role) == assistant else None
    return None


# ---- LLaMA-Factory's registry -------------------------------------------------------------------


def _dataset_info(file_name: str, layout: str, recs: list[dict], pool_fields: Mapping) -> dict:
    if layout == "alpaca":
        columns = {"prompt": "instruction", "query": "input", "response": "output"}
        for key in ("system", "history"):  # named only when written: a named column must exist
            if any(key in r for r in recs):
                columns[key] = key
        return {"file_name": file_name, "formatting": "alpaca", "columns": columns}
    if layout == "messages":
        return {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    if layout == "sharegpt":
        columns = {"messages": "conversations"}
        if any("system" in r for r in recs):
            columns["system"] = "system"
        return {"file_name": file_name, "formatting": "sharegpt", "columns": columns}
    # a flat pool: alpaca with the pool's own column names
    return {
        "file_name": file_name,
        "formatting": "alpaca",
        "columns": {
            "prompt": pool_fields.get("prompt_field") or "prompt",
            "response": pool_fields.get("response_field") or "response",
        },
    }


def native_layout(pool_format: str) -> str:
    """The layout the pool came in: a chat layout by name, else the flat pool's own fields."""
    return pool_format if pool_format in _WRITERS else "pool"


def write_subsets(
    folder: Store, subsets: Mapping[str, pa.Table], pool_format: str = "auto", pool_fields: Mapping | None = None
) -> dict:
    """Write each subset (name -> rows) as ``<name>.<layout>.jsonl`` in alpaca, messages and the pool's
    own layout, and ``dataset_info.json`` with an entry ``edsft_<name>_<layout>`` per file.
    Returns {name: {layout: file uri}, "dataset_info": uri}."""
    layouts = ["alpaca", "messages"]
    native = native_layout(pool_format)
    if native not in layouts:
        layouts.append(native)
    fields = dict(pool_fields or {})
    info, files = {}, {}
    for name, rows in subsets.items():
        pylist = rows.to_pylist()
        files[name] = {}
        for layout in layouts:
            recs = records(pylist, layout, fields)
            fname = f"{name}.{layout}.jsonl"
            folder.child(fname).write_jsonl(recs)
            files[name][layout] = folder.child(fname).uri
            info[f"edsft_{name}_{layout}"] = _dataset_info(fname, layout, recs, fields)
    folder.child("dataset_info.json").write_json(info)
    return {**files, "dataset_info": folder.child("dataset_info.json").uri}


def pool_fields(pool_cfg) -> dict:
    """The field names a flat pool came with (PoolConfig), for the pool layout."""
    return {k: getattr(pool_cfg, k, None) for k in ("prompt_field", "response_field", "task_field", "id_field")}


# ---- which pool rows ------------------------------------------------------------------------------


def subset_rows(selection: pa.Table, pool: Store, with_response: bool) -> pa.Table:
    """The pool's rows of a selection (row_id, rank), in rank order, with a ``rank`` column: row_id,
    prompt, task, the context column when the pool has one, and the response only when asked (the
    select stage never asks: selection does not read the label column)."""
    return in_rank_order(pool_rows(selection.column("row_id").to_pylist(), pool, with_response), selection)


def pool_rows(row_ids: Iterable[str], pool: Store, with_response: bool) -> pa.Table:
    """The pool's rows with these ids (pool order); a clear error for an id the pool lacks."""
    wanted = pa.array(sorted(set(row_ids)), pa.string())
    files = pool.parquet_files()
    names = pq.read_schema(files[0], filesystem=pool.fs).names if files else []
    cols = (
        ["row_id", "prompt", "task"]
        + ([CONTEXT_COLUMN] if CONTEXT_COLUMN in names else [])
        + (["response"] if with_response else [])
    )
    parts = []
    # Stream the pool part by part, keeping only selected rows: the pool never sits whole in memory.
    for path in files:
        t = pq.read_table(path, filesystem=pool.fs, columns=cols)
        parts.append(t.filter(pc.is_in(t.column("row_id"), value_set=wanted)))
    rows = pa.concat_tables(parts) if parts else pa.table({c: pa.array([], pa.string()) for c in cols})
    missing = set(wanted.to_pylist()) - set(rows.column("row_id").to_pylist())
    if missing:
        raise SubsetError(
            f"{len(missing)} selected row_ids are not in the pool (e.g. {sorted(missing)[:3]}): "
            "selection.parquet and pool.parquet come from different runs; re-run `edsft select`"
        )
    return rows


def in_rank_order(rows: pa.Table, selection: pa.Table) -> pa.Table:
    """The rows of `rows` that `selection` (row_id, rank) holds, in its rank order, with its ``rank``."""
    rank = dict(zip(selection.column("row_id").to_pylist(), selection.column("rank").to_pylist()))
    ids = rows.column("row_id").to_pylist()
    order = sorted((i for i in range(rows.num_rows) if ids[i] in rank), key=lambda i: rank[ids[i]])
    return rows.take(pa.array(order, pa.int64())).append_column("rank", pa.array([rank[ids[i]] for i in order], pa.int64()))
