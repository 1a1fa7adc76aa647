"""SFT examples: chat-template tokenisation, response-only loss mask, truncation, packing.

Targets come from applying the chat template to the WHOLE conversation (the row's ``context``
of system prompt and earlier turns, if any, then the user prompt and the assistant response). The loss covers only the assistant's tokens: the boundary is the
length of the prompt rendered with ``add_generation_prompt=True``, which must be a prefix of
the full conversation. We never append ``eos_token`` by hand: the SmolLM2 GGUF tokenizer has
reported ``eos_token='<|im_start|>'`` while turns end with ``<|im_end|>``, and appending the
wrong token taught a model never to stop. Instead the template's own end-of-turn token is
part of the target (so the model learns to stop) and generation stops at
``edsft.models.end_of_turn_ids``. Template text after the end-of-turn token (ChatML's
trailing newline) stays in the input but is not trained.

Packing (``training.packing``) is *simple packing*: whole examples are concatenated in order
into blocks of at most ``max_seq_len`` tokens, each keeping its own loss mask. Attention
and positions run across example boundaries inside a block (no position_ids reset, no
block-diagonal mask): cheap, attention-kernel independent, and the loss at a boundary is
masked anyway because every example starts with prompt tokens. It removes padding waste;
use it for throughput, leave it off for exactness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edsft.pools.records import context_turns
from edsft.storage import Store, get_store

__all__ = [
    "IGNORE_INDEX",
    "REQUIRED_COLUMNS",
    "TokenStats",
    "load_examples",
    "messages_for",
    "prompt_text",
    "tokenize_example",
    "tokenize_examples",
    "pack_examples",
    "collate",
]

IGNORE_INDEX = -100  # torch cross_entropy's ignore_index
REQUIRED_COLUMNS = ("row_id", "prompt", "response")


def load_examples(data: Store | str, columns: Sequence[str] = ("row_id", "prompt", "response", "task", "context")) -> list[dict]:
    """Rows of an annotated Parquet (file or folder) as dicts; ``task`` and ``context`` are optional."""
    store = get_store(data) if isinstance(data, str) else data
    if not store.exists():
        raise ValueError(f"training data {store.uri!r} does not exist: run the annotate stage first or pass its output")
    table = store.read_table()
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"training data {store.uri!r} lacks columns {missing}: it needs {list(REQUIRED_COLUMNS)} "
            f"(has {table.column_names}); pass the annotated Parquet"
        )
    keep = [c for c in columns if c in table.column_names]
    rows = table.select(keep).to_pylist()
    for r in rows:
        r.setdefault("task", None)
        r.setdefault("context", None)
    return rows


def messages_for(prompt: str, response: str | None = None, context: str | None = None) -> list[dict]:
    """The conversation of a row: its context turns, the prompt as the final user turn, the response."""
    msgs = [*context_turns(context), {"role": "user", "content": prompt}]
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def prompt_text(tokenizer: Any, prompt: str, context: str | None = None) -> str:
    """The prompt as the model sees it at generation time (template + generation prompt)."""
    return tokenizer.apply_chat_template(messages_for(prompt, context=context), tokenize=False, add_generation_prompt=True)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template already holds the special tokens (BOS, <|im_start|>): add none.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class TokenStats:
    """What tokenisation did to the data; reported in train_summary.json."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0  # cut at max_seq_len (the response lost its tail, maybe its end-of-turn)
    dropped_no_response: int = 0  # no response token survived truncation
    boundary_fallbacks: int = 0  # prompt tokens were not a prefix; the boundary came from offsets
    response_tokens: int = 0
    total_tokens: int = 0
    blocks: int | None = None  # packed blocks, when packing

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def tokenize_example(
    tokenizer: Any, prompt: str, response: str, end_ids: Iterable[int], max_seq_len: int, context: str | None = None
) -> tuple[dict | None, dict]:
    """One example -> ({input_ids, labels}, flags) or (None, flags) when nothing is left to learn.

    ``labels`` is aligned with ``input_ids`` (the shift happens in the loss) and is
    IGNORE_INDEX outside the response; the response span ends at (and includes) its first
    end-of-turn token. With a ``context`` (a conversation row) the whole conversation is the
    input and only its final assistant turn is trained: the earlier turns are part of the prompt.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len} must be >= 2: set training.max_seq_len to e.g. 256")
    end_ids = set(int(i) for i in end_ids)
    ptext = prompt_text(tokenizer, prompt, context)
    ftext = tokenizer.apply_chat_template(messages_for(prompt, response, context), tokenize=False)
    full = _ids(tokenizer, ftext)
    pids = _ids(tokenizer, ptext)
    flags = {"truncated": False, "dropped": False, "fallback": False}
    if not ftext.startswith(ptext):
        raise ValueError(
            "the chat template does not render the prompt (with add_generation_prompt=True) as a prefix "
            "of the whole conversation, so the response tokens cannot be located: use a model whose "
            "template does (ChatML, Llama-3 and SmolLM2 templates do)"
        )
    if full[: len(pids)] == pids:
        start = len(pids)
    else:
        # A BPE merge across the boundary (rare): take the first token that starts at or after
        # the end of the prompt text, from the fast tokenizer's character offsets.
        flags["fallback"] = True
        offsets = tokenizer(ftext, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        start = next((i for i, (s, _) in enumerate(offsets) if s >= len(ptext)), len(full))
    stop = len(full)
    for i in range(start, len(full)):  # train through the first end-of-turn token, not the template tail
        if full[i] in end_ids:
            stop = i + 1
            break
    if len(full) > max_seq_len:
        flags["truncated"] = stop > max_seq_len
        full = full[:max_seq_len]
        stop = min(stop, max_seq_len)
    if stop <= start:
        flags["dropped"] = True
        return None, flags
    labels = [IGNORE_INDEX] * start + full[start:stop] + [IGNORE_INDEX] * (len(full) - stop)
    return {"input_ids": full, "labels": labels}, flags


def tokenize_examples(
    tokenizer: Any, rows: Sequence[Mapping], max_seq_len: int, end_ids: Iterable[int]
) -> tuple[list[dict], TokenStats]:
    """Tokenise rows with prompt/response; drops (and counts) those with no response token left."""
    end_ids = list(end_ids)
    if not end_ids:
        raise ValueError("end_ids is empty: pass edsft.models.end_of_turn_ids(tokenizer) so the model learns to stop")
    stats = TokenStats(examples=len(rows))
    out = []
    for r in rows:
        ex, flags = tokenize_example(tokenizer, str(r["prompt"]), str(r["response"]), end_ids, max_seq_len, r.get("context"))
        stats.truncated += flags["truncated"]
        stats.boundary_fallbacks += flags["fallback"]
        if ex is None:
            stats.dropped_no_response += 1
            continue
        ex["row_id"] = r.get("row_id")
        ex["task"] = r.get("task")
        stats.kept += 1
        stats.response_tokens += sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
        stats.total_tokens += len(ex["input_ids"])
        out.append(ex)
    return out, stats


def pack_examples(examples: Sequence[Mapping], max_seq_len: int) -> list[dict]:
    """Greedy, order-preserving simple packing of whole examples into <= max_seq_len blocks."""
    blocks: list[dict] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for ex in examples:
        ids, labels = list(ex["input_ids"]), list(ex["labels"])
        if cur_ids and len(cur_ids) + len(ids) > max_seq_len:
            blocks.append({"input_ids": cur_ids, "labels": cur_labels})
            cur_ids, cur_labels = [], []
        cur_ids += ids
        cur_labels += labels
    if cur_ids:
        blocks.append({"input_ids": cur_ids, "labels": cur_labels})
    return blocks


def collate(batch: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro batch to its longest sequence; padding is masked from attention and loss."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(b["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
