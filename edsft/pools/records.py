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
from dataclasses import dataclass
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
]

SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("task", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
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
)
RAW_CHARS = 200  # how much of a bad line the quarantine keeps

Row = tuple  # (row_id, prompt, response | None, task | None)


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


def content_row_id(prompt: str, response: str | None) -> str:
    """Stable id of a row without an id field: the same content gives the same id everywhere."""
    blob = prompt + "\x1f" + (response if response is not None else "")
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


def optional_text(rec: dict, field: str | None) -> "str | None | Bad":
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

    @classmethod
    def from_pool(cls, p: PoolConfig) -> "FieldMapping":
        return cls(p.prompt_field, p.input_field or None, p.response_field or None, p.task_field or None, p.id_field or None, p.max_prompt_chars)

    @classmethod
    def builtin(cls, p: PoolConfig) -> "FieldMapping":
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
            if not (raw_prompt.isascii() and (not extra or extra.isascii()) and (response is None or response.isascii())
                    and (task is None or task.isascii())):
                bad = unencodable((f.prompt, raw_prompt), (f.input, extra), (f.response, response), (f.task, task))
                if bad:
                    return bad
            if f.id:
                raw = rec.get(f.id)
                if raw is None or raw == "":
                    return Bad("missing_id", f"field {f.id!r} (pool.id_field) is missing or empty")
                if isinstance(raw, float) or not isinstance(raw, (str, int)) or isinstance(raw, bool):
                    return Bad("wrong_type", f"field {f.id!r} must be a string or an integer, got {type(raw).__name__}")
                row_id = str(raw)
                bad = unencodable((f.id, row_id))
                if bad:
                    return bad
            else:
                row_id = content_row_id(prompt, response)
        except UnicodeDecodeError as e:
            return Bad("not_utf8", f"a field holds bytes that are not UTF-8: {e.reason}")
        return row_id, prompt, response, task
