"""What a pool row is, and how one raw record becomes a row or the reason it cannot.

A *record* is what a reader or a generator yields (usually a dict); a *row* is what lands in
``pool.parquet``: ``(row_id, prompt, response, task)`` plus its origin ``(source, line)``.
:class:`FieldMapping` turns records into rows using the ``pool.*_field`` settings; a pool format
whose records are shaped differently (chat messages, say) brings its own mapping with the same
``map`` method and reuses the checks here (:func:`prompt_problem`, :func:`optional_text`,
:func:`unencodable`, :func:`content_row_id`), so every source quarantines for the same reasons.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from dataclasses import dataclass, replace
from typing import Any, Protocol

import pyarrow as pa

from ..config import PoolConfig
from ..errors import UserError

__all__ = [
    "SCHEMA",
    "REASONS",
    "PoolError",
    "Bad",
    "Row",
    "RecordMapping",
    "FieldMapping",
    "content_row_id",
    "snip",
    "visible",
    "optional_text",
    "prompt_problem",
    "unencodable",
    "ConversationMapping",
    "AlpacaMapping",
    "AutoMapping",
    "mapping_for",
    "context_turns",
]

SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("task", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        # A conversation's turns before ``prompt`` (its final user turn), OpenAI-style JSON:
        # [{"role": "system"|"user"|"assistant", "content": ...}, ...]; null for a single-turn row.
        ("context", pa.string()),
    ]
)
# The quarantine reasons (the ingest module's docstring says what each means).
REASONS = (
    "malformed_json",
    "not_utf8",
    "wrong_type",
    "empty_prompt",
    "missing_id",
    "prompt_too_long",
    "duplicate_id",
    "eval_overlap",
    "unreadable_file",
    "malformed_csv",
    "no_user_turn",
    "role_order",
    "empty_turn",
    "unknown_role",
    "no_response",
)
RAW_CHARS = 200  # how much of a bad line the quarantine keeps

Row = tuple  # (row_id, prompt, response | None, task | None[, context | None])


class PoolError(UserError):
    """A pool that cannot be ingested (no files, unknown format, too many bad rows). CLI: exit 2."""


@dataclass
class Bad:
    """Why a record is not a row: one of :data:`REASONS`, a detail that names the field, the raw text."""

    reason: str
    detail: str
    raw: str = ""


def snip(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[: RAW_CHARS * 4].decode("utf-8", errors="replace")
    return raw[:RAW_CHARS]


def content_row_id(prompt: str, response: str | None, context: str | None = None) -> str:
    """Stable id of a row without an id field: the same content gives the same id everywhere.

    A conversation's ``context`` is part of its content (the same last question after another
    history is another row); without one the id is that of the flat row."""
    blob = prompt + "\x1f" + (response if response is not None else "")
    if context is not None:
        blob += "\x1e" + context
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=8).hexdigest()


# Characters that show nothing: whitespace, controls (Cc) and format characters (Cf: zero-width
# space/joiners, BOM, soft hyphen, bidi marks). A prompt made only of them is empty to a reader.
_INVISIBLE = frozenset(("Cc", "Cf"))


def visible(text: str) -> bool:
    """Whether ``text`` holds one character a reader can see (stops at the first one: O(1) usually)."""
    if text[:1].isalnum():  # the common case, without a generator
        return True
    return any(not c.isspace() and unicodedata.category(c) not in _INVISIBLE for c in text)


def unencodable(*named: tuple[str | None, str | None]) -> Bad | None:
    """The first ``(field, text)`` that cannot be written as UTF-8 (a lone surrogate such as the
    valid JSON escape ``"\\ud800"``), as a quarantine reason; None when all can."""
    for name, text in named:
        if text is None or text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return Bad(
                "not_utf8",
                f"field {name!r} holds the lone surrogate {text[e.start]!r} at character {e.start + 1}: valid JSON "
                f"but not text; fix the program that wrote it (often a string cut in the middle of an emoji)",
            )
    return None


def _as_text(value: Any) -> str | None:
    """Strings stay, finite numbers become text (answers like 42 are common), anything else is None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError handled by the caller
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN / Infinity are not answers (JSON's NaN, a pandas float column's missing value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def optional_text(rec: dict, field: str | None) -> str | None | Bad:
    """An optional text field (response, task): absent or null is None, a wrong type is bad."""
    if not field:
        return None
    raw = rec.get(field)
    text = _as_text(raw)
    if raw is not None and text is None:
        if isinstance(raw, float):
            return Bad("wrong_type", f"field {field!r} is {raw!r}: it must be a string, a finite number or null")
        return Bad("wrong_type", f"field {field!r} must be a string, number or null, got {type(raw).__name__}")
    return text


def prompt_problem(prompt: str, field: str, max_chars: int) -> Bad | None:
    """The checks every prompt passes, whatever format it came from."""
    if not visible(prompt):
        what = "empty" if not prompt.strip() else "made only of whitespace, zero-width or control characters"
        return Bad("empty_prompt", f"field {field!r} is {what}")
    if len(prompt) > max_chars:
        return Bad("prompt_too_long", f"prompt has {len(prompt)} characters > pool.max_prompt_chars={max_chars}")
    return None


def record_id(rec: dict, field: str | None, prompt: str, response: str | None, context: str | None = None) -> str | Bad:
    """The row_id: the ``field`` (pool.id_field) of ``rec`` if set, else a hash of the content."""
    if not field:
        return content_row_id(prompt, response, context)
    raw = rec.get(field)
    if raw is None or raw == "":
        return Bad("missing_id", f"field {field!r} (pool.id_field) is missing or empty")
    if isinstance(raw, float) or not isinstance(raw, (str, int)) or isinstance(raw, bool):
        return Bad("wrong_type", f"field {field!r} must be a string or an integer, got {type(raw).__name__}")
    row_id = str(raw)
    return unencodable((field, row_id)) or row_id


class RecordMapping(Protocol):
    """Turns one record into a row, or says why it cannot (never raises on bad content)."""

    def map(self, rec: Any) -> Row | Bad: ...


@dataclass(frozen=True)
class FieldMapping:
    """Records that are flat objects: the prompt, input, response, task and id each in a named field."""

    prompt: str
    input: str | None
    response: str | None
    task: str | None
    id: str | None
    max_prompt_chars: int
    require_response: bool = False

    @classmethod
    def from_pool(cls, p: PoolConfig) -> FieldMapping:
        c = p.columns  # LLaMA-Factory's names win over the *_field settings
        return cls(
            c.get("prompt", p.prompt_field),
            c.get("query", p.input_field) or None,
            c.get("response", p.response_field) or None,
            p.task_field or None,
            p.id_field or None,
            p.max_prompt_chars,
            p.require_response,
        )

    @classmethod
    def builtin(cls, p: PoolConfig) -> FieldMapping:
        """Built-in pools have fixed columns whatever the field mapping says."""
        return cls("instruction", "input", "output", "task", None, p.max_prompt_chars)

    def map(self, rec: Any) -> Row | Bad:
        f = self
        if not isinstance(rec, dict):
            return Bad("wrong_type", f"a row must be a JSON object, got {type(rec).__name__}", snip(json.dumps(rec, default=str)))
        try:
            prompt = rec.get(f.prompt)
            if prompt is None:
                return Bad("empty_prompt", f"field {f.prompt!r} is missing or null (set pool.prompt_field)")
            if isinstance(prompt, bytes):
                prompt = prompt.decode("utf-8")
            if not isinstance(prompt, str):
                return Bad("wrong_type", f"field {f.prompt!r} must be a string, got {type(prompt).__name__}")
            extra = None
            if f.input:
                extra = rec.get(f.input)
                if isinstance(extra, bytes):
                    extra = extra.decode("utf-8")
                if extra is not None and not isinstance(extra, str):
                    return Bad("wrong_type", f"field {f.input!r} must be a string or null, got {type(extra).__name__}")
            raw_prompt = prompt
            if extra and visible(extra):
                prompt = f"{prompt}\n\n{extra}" if visible(prompt) else extra
            bad = prompt_problem(prompt, f.prompt, f.max_prompt_chars)
            if bad:
                return bad
            response = optional_text(rec, f.response)
            if isinstance(response, Bad):
                return response
            task = optional_text(rec, f.task)
            if isinstance(task, Bad):
                return task
            # All-ASCII text (most rows) cannot hold a lone surrogate: skip the encoding check.
            if not (
                raw_prompt.isascii()
                and (not extra or extra.isascii())
                and (response is None or response.isascii())
                and (task is None or task.isascii())
            ):
                bad = unencodable((f.prompt, raw_prompt), (f.input, extra), (f.response, response), (f.task, task))
                if bad:
                    return bad
            if f.require_response and response is None:
                return Bad("no_response", f"field {f.response!r} is missing or null and pool.require_response is set")
            row_id = record_id(rec, f.id, prompt, response)
            if isinstance(row_id, Bad):
                return row_id
        except UnicodeDecodeError as e:
            return Bad("not_utf8", f"a field holds bytes that are not UTF-8: {e.reason}")
        return row_id, prompt, response, task


# ------------------------------------------------------------------------------------------------
# Conversations: alpaca (flat + system + history), ShareGPT and OpenAI messages
# ------------------------------------------------------------------------------------------------

# The role vocabularies of the two chat layouts, in LLaMA-Factory's tag names (pool.tags overrides).
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}
MESSAGES_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "function",
}
LAYOUT_COLUMN = {"sharegpt": "conversations", "messages": "messages"}  # the turns' column by default


def _context_json(turns: list[dict]) -> str | None:
    return json.dumps(turns, ensure_ascii=False) if turns else None


def context_turns(context: str | None) -> list[dict]:
    """A row's ``context`` column back as chat messages (``[{"role", "content"}, ...]``: system
    prompt and earlier turns, for a chat template); [] for a single-turn row. A null that went
    through a pandas batch (Ray Data) arrives as NaN, so anything but a non-empty string is "none"."""
    if isinstance(context, list):
        return context
    return json.loads(context) if isinstance(context, str) and context else []


def check_turns(turns: list[tuple[str, str]], what: str) -> Bad | None:
    """The rules of a conversation, on ``(role, text)`` turns with roles already normalised to
    system / user / assistant: system turns first, then user and assistant alternating from a
    user turn, no empty turn. ``what`` names the field in the detail."""
    for i, (role, text) in enumerate(turns):
        if not visible(text):
            return Bad("empty_turn", f"{what} turn {i} ({role}) is empty or only whitespace / invisible characters")
    chat = [r for r, _ in turns if r != "system"]
    if "user" not in chat:
        return Bad("no_user_turn", f"{what} has no user turn (roles: {[r for r, _ in turns]})")
    n_system = len(turns) - len(chat)
    if any(r == "system" for r, _ in turns[n_system:]):
        return Bad("role_order", f"{what}: a system turn must come before every user and assistant turn")
    for i, role in enumerate(chat):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            return Bad(
                "role_order",
                f"{what} turn {i + n_system} is {role}, expected {want}: turns must alternate user, assistant, ... from a user turn",
            )
    return None


def conversation_row(
    turns: list[tuple[str, str]],
    rec: dict,
    what: str,
    id_field: str | None,
    task_field: str | None,
    max_prompt_chars: int,
    require_response: bool,
) -> Row | Bad:
    """A checked conversation -> ``(row_id, prompt, response, task, context)``: the final
    assistant turn is the response (None when the conversation ends on a user turn), the user turn
    before it the prompt, everything earlier (system included) the context."""
    bad = check_turns(turns, what)
    if bad:
        return bad
    if turns[-1][0] == "assistant":
        *before, (_, prompt), (_, response) = turns
    else:
        if require_response:
            return Bad("no_response", f"{what} ends on a user turn (no answer to learn) and pool.require_response is set")
        *before, (_, prompt) = turns
        response = None
    bad = unencodable(*((f"{what} turn {i}", t) for i, (_, t) in enumerate(turns)))
    if bad:
        return bad
    chars = len(prompt) + sum(len(t) for _, t in before)
    if chars > max_prompt_chars:
        return Bad(
            "prompt_too_long",
            f"the conversation before its answer has {chars} characters > pool.max_prompt_chars={max_prompt_chars}",
        )
    task = optional_text(rec, task_field)
    if isinstance(task, Bad):
        return task
    context = _context_json([{"role": r, "content": t} for r, t in before])
    row_id = record_id(rec, id_field, prompt, response, context)
    if isinstance(row_id, Bad):
        return row_id
    return row_id, prompt, response, task, context


def _decoded(value: Any, field: str) -> Any:
    """A list stored as JSON text (a CSV cell, a string column) is parsed; other values pass."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            return Bad(
                "malformed_json", f"field {field!r} holds text that is not a JSON list: {e.msg} at column {e.colno}", snip(value)
            )
    return value


def _system_turns(rec: dict, field: str | None) -> list[tuple[str, str]] | Bad:
    system = optional_text(rec, field)
    if isinstance(system, Bad):
        return system
    return [("system", system)] if system and visible(system) else []


@dataclass(frozen=True)
class ConversationMapping:
    """ShareGPT / OpenAI ``messages`` records: a list of turns in ``column``, roles by ``tags``."""

    column: str
    tags: dict
    system: str | None  # a separate system-prompt column (LLaMA-Factory's columns.system)
    id: str | None
    task: str | None
    max_prompt_chars: int
    require_response: bool = False

    @classmethod
    def from_pool(cls, p: PoolConfig, layout: str, tags: dict | None = None) -> ConversationMapping:
        base = tags or (SHAREGPT_TAGS if layout == "sharegpt" else MESSAGES_TAGS)
        return cls(
            p.columns.get("messages", LAYOUT_COLUMN[layout]),
            {**base, **p.tags},
            p.columns.get("system", "system"),
            p.id_field or None,
            p.task_field or None,
            p.max_prompt_chars,
            p.require_response,
        )

    def map(self, rec: Any) -> Row | Bad:
        if not isinstance(rec, dict):
            return Bad("wrong_type", f"a row must be a JSON object, got {type(rec).__name__}", snip(json.dumps(rec, default=str)))
        try:
            raw = _decoded(rec.get(self.column), self.column)
            if isinstance(raw, Bad):
                return raw
            if raw is None:
                return Bad("empty_prompt", f"field {self.column!r} is missing or null (set pool.columns.messages)")
            if not isinstance(raw, list):
                return Bad("wrong_type", f"field {self.column!r} must be a list of turns, got {type(raw).__name__}")
            turns = _system_turns(rec, self.system)
            if isinstance(turns, Bad):
                return turns
            t = self.tags
            roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["system_tag"]: "system"}
            tools = {t.get("observation_tag"), t.get("function_tag")} - {None}
            for i, turn in enumerate(raw):
                if not isinstance(turn, dict):
                    return Bad("wrong_type", f"{self.column!r} turn {i} must be an object, got {type(turn).__name__}")
                role, content = turn.get(t["role_tag"]), turn.get(t["content_tag"])
                if role not in roles:
                    why = (
                        "tool turns are not supported"
                        if role in tools
                        else (
                            f"expected one of {sorted(roles)} under {t['role_tag']!r}: map yours with pool.tags (user_tag, assistant_tag, system_tag)"
                        )
                    )
                    return Bad("unknown_role", f"{self.column!r} turn {i} has role {role!r}: {why}")
                if isinstance(content, bytes):
                    content = content.decode("utf-8")
                if content is None:
                    content = ""
                if not isinstance(content, str):
                    return Bad(
                        "wrong_type",
                        f"{self.column!r} turn {i} {t['content_tag']!r} must be a string, got {type(content).__name__}",
                    )
                turns.append((roles[role], content))
            return conversation_row(
                turns, rec, repr(self.column), self.id, self.task, self.max_prompt_chars, self.require_response
            )
        except UnicodeDecodeError as e:
            return Bad("not_utf8", f"a field holds bytes that are not UTF-8: {e.reason}")


@dataclass(frozen=True)
class AlpacaMapping:
    """Alpaca records: the flat fields plus an optional ``system`` prompt and a ``history`` of
    earlier ``[user, assistant]`` pairs. A record without either is exactly its flat row."""

    flat: FieldMapping
    system: str | None
    history: str | None

    @classmethod
    def from_pool(cls, p: PoolConfig) -> AlpacaMapping:
        return cls(FieldMapping.from_pool(p), p.columns.get("system", "system"), p.columns.get("history", "history"))

    def map(self, rec: Any) -> Row | Bad:
        out = self.flat.map(rec)
        if isinstance(out, Bad):
            return out
        if not (self.system and rec.get(self.system)) and not (self.history and rec.get(self.history)):
            return out  # the common case, without the conversation machinery
        _, prompt, response, _ = out  # the id and task are re-derived for the conversation below
        try:
            system = _system_turns(rec, self.system)
            history = _decoded(rec.get(self.history), self.history) if self.history else None
        except UnicodeDecodeError as e:
            return Bad("not_utf8", f"a field holds bytes that are not UTF-8: {e.reason}")
        if isinstance(system, Bad):
            return system
        if isinstance(history, Bad):
            return history
        if not system and not history:
            return out
        if not isinstance(history, (list, type(None))):
            return Bad(
                "wrong_type", f"field {self.history!r} must be a list of [user, assistant] pairs, got {type(history).__name__}"
            )
        turns = list(system)
        for i, pair in enumerate(history or []):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                return Bad("wrong_type", f"field {self.history!r} entry {i} must be a [user, assistant] pair of strings")
            turns += [("user", pair[0]), ("assistant", pair[1])]
        turns.append(("user", prompt))
        if response is not None:
            turns.append(("assistant", response))
        # The flat checks passed; the conversation's own ones (empty turns, total length) and id follow.
        f = self.flat
        return conversation_row(turns, rec, "alpaca", f.id, f.task, f.max_prompt_chars, f.require_response)


@dataclass(frozen=True)
class AutoMapping:
    """``pool.layout=auto``: each record by its own shape. A list of turns in ``messages`` or
    ``conversations`` (or pool.columns.messages) is a chat record, its vocabulary told by the keys
    of its first turn (``role`` -> OpenAI, ``from`` -> ShareGPT); anything else is alpaca / flat."""

    chats: tuple  # ((column, ConversationMapping for role/content, for from/value), ...)
    alpaca: AlpacaMapping

    @classmethod
    def from_pool(cls, p: PoolConfig) -> AutoMapping:
        def pair(col: str) -> tuple:
            q = replace(p, columns={**p.columns, "messages": col})
            return col, ConversationMapping.from_pool(q, "messages"), ConversationMapping.from_pool(q, "sharegpt")

        cols = [p.columns["messages"]] if "messages" in p.columns else ["messages", "conversations"]
        return cls(tuple(pair(c) for c in cols), AlpacaMapping.from_pool(p))

    def map(self, rec: Any) -> Row | Bad:
        if isinstance(rec, dict):
            for col, messages, sharegpt in self.chats:
                turns = rec.get(col)
                if turns is not None:
                    first = _decoded(turns, col)
                    first = first[0] if isinstance(first, list) and first else None
                    sharegpt_like = (
                        isinstance(first, dict) and messages.tags["role_tag"] not in first and sharegpt.tags["role_tag"] in first
                    )
                    return (sharegpt if sharegpt_like else messages).map(rec)
        return self.alpaca.map(rec)


def mapping_for(p: PoolConfig) -> RecordMapping:
    """The record mapping of ``pool.layout``."""
    if p.layout == "flat":
        return FieldMapping.from_pool(p)
    if p.layout == "alpaca":
        return AlpacaMapping.from_pool(p)
    if p.layout in LAYOUT_COLUMN:
        return ConversationMapping.from_pool(p, p.layout)
    return AutoMapping.from_pool(p)
