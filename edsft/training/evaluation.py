"""Held-out evaluation of the base model and the finetuned one (base + LoRA adapter).

Per row and per variant (``base``, ``finetuned``):

- teacher-forced response loss: the sum of token cross-entropies over exactly the tokens the
  training loss covers (the assistant response through its end-of-turn token), and their count,
  so that loss and perplexity aggregate token-weighted;
- a greedy generation that stops at ``end_of_turn_ids``, scored against the reference with
  normalised exact match and ROUGE-L (edsft.training.metrics).

One model serves both variants: the adapter is loaded with peft and switched off for ``base``
(``disable_adapter``), so the base weights are in memory once. No Ray here: the Ray Data actor in
edsft.distributed.evaluate wraps :class:`Evaluator`.

Speed: ``dtype='auto'`` runs bf16 where the hardware has it (edsft.models.resolve_dtype); losses
are summed in fp32. :meth:`Evaluator.evaluate` prefills each prompt once for both the loss and the
generation (:meth:`Evaluator.losses_and_generate`: the teacher-forced response runs on the prompt's
KV cache, which greedy decoding then continues; the prompt is most of an eval row, and the two passes
used to compute it twice). Rows are length-sorted before they are cut into micro batches (little padding),
the LM head runs over response positions only (engine.response_logits) and generate computes the
head at the last position only (transformers' ``logits_to_keep=1``); the prompt tokens every row of a
generation micro batch starts with (the chat template's system turn) are prefilled once
(edsft.models.SharedPrefix); on CPU the bf16 decoder weights (the base layers under a LoRA adapter
too) are prepacked for oneDNN once (edsft.models.prepack_linears: same logits; 0.8-0.85x the time
of a loss batch and of a generation, measured on SmolLM2-135M). Results come back in row order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from edsft.models import (
    SharedPrefix,
    dtype_name,
    end_of_turn_ids,
    load_model,
    load_tokenizer,
    pad_prompts,
    prepack_linears,
)
from edsft.training.data import IGNORE_INDEX, collate, prompt_text, tokenize_example
from edsft.training.engine import logits_at, response_logits
from edsft.training.metrics import exact_match, rouge_l, summarize

__all__ = ["Evaluator", "build_metrics", "VARIANTS"]

VARIANTS = ("base", "finetuned")
_LOSS_ROWS = 16  # rows per teacher-forced loss micro batch (see Evaluator.losses)


class Evaluator:
    """Loss and generation metrics for rows with prompt/response/task, for each model variant."""

    def __init__(
        self,
        model_spec: str,
        adapter_dir: str | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        max_seq_len: int = 256,
        max_new_tokens: int = 24,
        batch_size: int = 64,
    ):
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_spec)
        self.end_ids = end_of_turn_ids(self.tokenizer)
        if not self.end_ids:
            raise ValueError(f"model={model_spec!r} has no end-of-turn or eos token: generation could not stop")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_ids[0]
        model = load_model(model_spec, dtype=dtype, device=self.device)
        self.dtype = dtype_name(model.dtype)  # what 'auto' resolved to, for metrics.json
        self.has_adapter = adapter_dir is not None
        if self.has_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.eval()
        # inference only: CPU bf16 weights in oneDNN's layout, packed once (a no-op on GPU and in fp32)
        prepack_linears(self.model, rows_hint=batch_size)
        shared = SharedPrefix(self.model)
        self._shared_prefix = shared if shared.supported() else None
        self.max_seq_len, self.max_new_tokens, self.batch_size = max_seq_len, max_new_tokens, batch_size

    @property
    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.has_adapter else VARIANTS[:1]

    def _variant(self, variant: str):
        if variant not in self.variants:
            raise ValueError(f"variant={variant!r} is not available: this evaluator has {list(self.variants)}")
        if variant == "base" and self.has_adapter:
            return self.model.disable_adapter()  # the base weights, adapters bypassed
        return contextlib.nullcontext()

    @torch.no_grad()
    def losses(self, rows: Sequence[Mapping], variant: str) -> list[dict]:
        """Per row: ``loss_sum`` and ``n_tokens`` over response tokens (both 0 when nothing survives truncation)."""
        out: list[dict] = [{"loss_sum": 0.0, "n_tokens": 0} for _ in rows]
        encoded = []
        for i, r in enumerate(rows):
            ex, _ = tokenize_example(
                self.tokenizer, str(r["prompt"]), str(r["response"]), self.end_ids, self.max_seq_len, r.get("context")
            )
            if ex is not None:
                encoded.append((i, ex))
        encoded.sort(key=lambda x: len(x[1]["input_ids"]))  # similar lengths share a micro batch
        # Teacher forcing is one compute-bound pass: 16 rows already fill the cores' GEMMs, and more only
        # add padding and spill the caches (SmolLM2-135M, 512 rows, 1 thread: 64 rows 1.07x the time of
        # 16). Generation, whose decode steps stream every weight once per step, takes batch_size rows.
        step = min(self.batch_size, _LOSS_ROWS)
        with self._variant(variant):
            for start in range(0, len(encoded), step):
                chunk = encoded[start : start + step]
                batch = {k: v.to(self.device) for k, v in collate([ex for _, ex in chunk], self.pad_id).items()}
                logits, targets, row = response_logits(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
                sums = torch.zeros(len(chunk), dtype=torch.float64, device=token_loss.device).index_add_(
                    0, row, token_loss.double()
                )
                counts = torch.bincount(row, minlength=len(chunk))
                for (i, _), s, n in zip(chunk, sums.tolist(), counts.tolist()):
                    out[i] = {"loss_sum": float(s), "n_tokens": int(n)}
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], variant: str, contexts: Sequence[str | None] | None = None) -> list[str]:
        """Greedy completions, cut at the first end-of-turn token, special tokens removed (in input order).

        ``contexts``: per prompt, a conversation row's earlier turns (None: a single-turn prompt)."""
        contexts = list(contexts) if contexts is not None else [None] * len(prompts)
        encoded = [self._prompt_ids(p, c) for p, c in zip(prompts, contexts)]  # each its last max_seq_len tokens
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a micro batch
        preds: list[str] = [""] * len(prompts)
        with self._variant(variant):
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                ids = [encoded[i] for i in chunk]
                # left padding, every row's next token generated at the same position; the tokens all rows
                # start with (the chat template's) prefilled once, per variant (edsft.models.SharedPrefix)
                if self._shared_prefix is not None:
                    input_ids, mask, _, cache, _ = self._shared_prefix.pack(ids, self.pad_id, self.device, tag=variant)
                else:
                    (input_ids, mask), cache = pad_prompts(ids, self.pad_id), None
                width = input_ids.shape[1]
                gen = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    **({"cache": cache} if cache is not None else {}),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    eos_token_id=self.end_ids,
                    pad_token_id=self.pad_id,
                )
                for i, row in zip(chunk, gen[:, width:].tolist()):
                    cut = next((j for j, t in enumerate(row) if t in self.end_ids), len(row))
                    preds[i] = self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
        return preds

    @torch.no_grad()
    def losses_and_generate(self, rows: Sequence[Mapping], variant: str) -> tuple[list[dict], list[str]]:
        """:meth:`losses` and :meth:`generate` of the same rows with ONE prefill of each prompt.

        Both start by running the prompt through the model, and the prompt is most of an eval row
        (builtin:tasks: 50 of 56 tokens), so computing it twice doubled the work. Here each micro batch
        of prompts is prefilled once (its shared template prefix once for all rows, edsft.models.SharedPrefix)
        into a KV cache; the teacher-forced response tokens run on top of that cache for the loss, are cut
        off again (``crop``), and greedy generation continues from the same cache. The prompt's last token
        goes through twice (it starts both the loss and generate's first step): one token, not the prompt.

        Causal attention makes this the same computation as the two separate passes: same greedy
        answers, losses within float rounding (tests/training/test_fast_paths.py). Rows whose prompt the
        loss pass and generation tokenise differently (a prompt longer than max_seq_len: the loss keeps
        the start, generation the end; a BPE merge across the prompt/response boundary; no response
        token left) take the two separate passes."""
        losses: list[dict] = [{"loss_sum": 0.0, "n_tokens": 0} for _ in rows]
        preds: list[str] = [""] * len(rows)
        fused, rest = [], []
        for i, r in enumerate(rows):
            prompt, context = str(r["prompt"]), r.get("context")
            gen_ids = self._prompt_ids(prompt, context)
            ex, _ = tokenize_example(self.tokenizer, prompt, str(r["response"]), self.end_ids, self.max_seq_len, context)
            labels = ex["labels"] if ex is not None else []
            start = next((j for j, t in enumerate(labels) if t != IGNORE_INDEX), None)
            if ex is not None and start == len(gen_ids) and ex["input_ids"][:start] == gen_ids:
                stop = max(j for j, t in enumerate(labels) if t != IGNORE_INDEX) + 1
                fused.append((i, gen_ids, ex["input_ids"][start:stop]))
            else:
                rest.append(i)
        if rest:
            sub = [rows[i] for i in rest]
            sub_preds = self.generate([str(r["prompt"]) for r in sub], variant, [r.get("context") for r in sub])
            for i, loss, pred in zip(rest, self.losses(sub, variant), sub_preds):
                losses[i], preds[i] = loss, pred
        fused.sort(key=lambda x: len(x[1]))  # similar prompt lengths share a micro batch
        with self._variant(variant):
            for start in range(0, len(fused), self.batch_size):
                chunk = fused[start : start + self.batch_size]
                sums, counts, texts = self._fused_batch([g for _, g, _ in chunk], [r for _, _, r in chunk], variant)
                for (i, _, _), s, n, text in zip(chunk, sums, counts, texts):
                    losses[i], preds[i] = {"loss_sum": s, "n_tokens": n}, text
        return losses, preds

    def _prompt_ids(self, prompt: str, context: str | None) -> list[int]:
        """The prompt's ids as :meth:`generate` feeds them: template + generation prompt, its last max_seq_len tokens."""
        text = prompt_text(self.tokenizer, prompt, context)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-max(1, self.max_seq_len) :]

    def _fused_batch(self, prompts: list[list[int]], responses: list[list[int]], variant: str):
        """One micro batch of :meth:`losses_and_generate`: (loss sums, token counts, predictions)."""
        from transformers import DynamicCache

        dev = self.device
        if self._shared_prefix is not None:
            input_ids, mask, p, cache, _ = self._shared_prefix.pack(prompts, self.pad_id, dev, tag=variant)
        else:
            (input_ids, mask), p, cache = pad_prompts(prompts, self.pad_id), 0, None
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        rows, width = input_ids.shape
        # positions from the mask, as generate computes them: padding (left, or between prefix and suffix) skipped
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        none = torch.zeros(0, dtype=torch.long, device=dev)  # logits_to_keep: no LM head at all
        if width - 1 > p:  # the prompt but its last token into the cache (the shared prefix is there already)
            self.model(
                input_ids=input_ids[:, p : width - 1],
                attention_mask=mask[:, : width - 1],
                position_ids=positions[:, p : width - 1],
                cache=cache,
                use_cache=True,
                logits_to_keep=none,
            )
        # teacher forcing on top of the cache: the prompt's last token, then the response but its last,
        # right padded; the output at step j predicts response token j
        steps = max(len(r) for r in responses)
        tf_ids = torch.full((rows, steps), self.pad_id, dtype=torch.long)
        targets = torch.full((rows, steps), IGNORE_INDEX, dtype=torch.long)
        for b, resp in enumerate(responses):
            tf_ids[b, : len(resp)] = torch.tensor([int(input_ids[b, -1]), *resp[:-1]])
            targets[b, : len(resp)] = torch.tensor(resp)
        tf_ids, targets = tf_ids.to(dev), targets.to(dev)
        keep = targets != IGNORE_INDEX
        tf_mask = torch.cat([mask[:, : width - 1], keep.long()], dim=1)
        tf_pos = positions[:, width - 1 : width] + torch.arange(steps, device=dev)
        logits = logits_at(
            self.model, keep, input_ids=tf_ids, attention_mask=tf_mask, position_ids=tf_pos, cache=cache, use_cache=True
        )
        row = keep.nonzero()[:, 0]
        token_loss = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        sums = torch.zeros(rows, dtype=torch.float64, device=dev).index_add_(0, row, token_loss.double())
        counts = torch.bincount(row, minlength=rows)
        cache.crop(-steps)  # back to the prompt (a negative count: the tokens removed from the end); generate
        # recomputes the prompt's last token, then decodes
        gen = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.end_ids,
            pad_token_id=self.pad_id,
        )
        texts = []
        for out in gen[:, width:].tolist():
            cut = next((j for j, t in enumerate(out) if t in self.end_ids), len(out))
            texts.append(self.tokenizer.decode(out[:cut], skip_special_tokens=True).strip())
        return [float(s) for s in sums.tolist()], [int(n) for n in counts.tolist()], texts

    def evaluate(self, rows: Sequence[Mapping], *, generate: bool = True, variants: Iterable[str] | None = None) -> list[dict]:
        """One result dict per (row, variant): row_id, task, variant, loss_sum, n_tokens[, prediction, exact_match, rouge_l]."""
        results = []
        for variant in variants or self.variants:
            if generate:
                losses, preds = self.losses_and_generate(rows, variant)
            else:
                losses, preds = self.losses(rows, variant), [None] * len(rows)
            for r, loss, pred in zip(rows, losses, preds):
                res = {"row_id": r.get("row_id"), "task": r.get("task"), "variant": variant, **loss}
                if pred is not None:
                    res.update(
                        prediction=pred, exact_match=exact_match(pred, r["response"]), rouge_l=rouge_l(pred, r["response"])
                    )
                results.append(res)
        return results


def build_metrics(results: Sequence[Mapping], *, settings: Mapping[str, Any] | None = None) -> dict:
    """metrics.json from per-(row, variant) results.

    ``{"n", "variants", "base": {...}, "finetuned": {...} | None, "delta": {...} | None,
    "per_task": {task: {"n", "base", "finetuned"}}, "settings"}``; each variant block holds the
    overall (row/token-weighted) loss, perplexity, exact_match, rouge_l plus ``macro`` (the
    unweighted mean over tasks).
    """
    by_variant: dict[str, list[Mapping]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    blocks = {}
    per_task: dict[str, dict] = {}
    for variant, rows in by_variant.items():
        s = summarize(rows)  # rows whose response did not survive truncation add 0 tokens
        blocks[variant] = {**s["overall"], "macro": s["macro"]}
        for task, m in s["per_task"].items():
            per_task.setdefault(task, {"n": m["n"]})[variant] = {k: v for k, v in m.items() if k != "n"}
    n = len(by_variant.get("base") or next(iter(by_variant.values()), []))
    base, tuned = blocks.get("base"), blocks.get("finetuned")
    delta = None
    if base and tuned:
        delta = {
            k: tuned[k] - base[k]
            for k in ("loss", "perplexity", "exact_match", "rouge_l")
            if isinstance(base.get(k), (int, float)) and isinstance(tuned.get(k), (int, float)) and not math.isnan(base[k])
        }
    return {
        "n": n,
        "variants": sorted(by_variant),
        "base": base,
        "finetuned": tuned,
        "delta": delta,
        "per_task": per_task,
        "settings": dict(settings or {}),
    }
