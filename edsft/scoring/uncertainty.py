"""Uncertainty of a model on its own response, from the next-token distributions of generation.

Pure torch over ``logits [B, T, V]`` (the distribution at each generated position), the chosen
``tokens [B, T]`` and a ``mask [B, T]`` (1 for positions that belong to the response, the
end-of-turn token included; 0 for padding after the turn ended). No model here: the numbers are
checked against hand-computed values in tests/scoring/test_uncertainty.py.

Per response (length n = mask.sum()):

- ``mean_entropy`` / ``max_entropy``: Shannon entropy (nats) of each next-token distribution,
  averaged / maximised over the response;
- ``least_confidence`` = 1 - p(response), p = prod_t p(token_t); long responses drift to 1;
- ``least_confidence_norm`` = 1 - p^(1/n): the same on the per-token geometric mean, length-fair;
- ``mean_margin`` / ``min_margin``: top-1 minus top-2 probability; the min is the single most
  uncertain token (a small margin = a close call);
- ``response_tokens`` = n.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SCORE_COLUMNS", "token_stats", "response_scores", "response_mask"]

SCORE_COLUMNS = (
    "mean_entropy",
    "max_entropy",
    "least_confidence",
    "least_confidence_norm",
    "mean_margin",
    "min_margin",
)


def response_mask(tokens: torch.Tensor, end_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions up to and including the first end-of-turn token of each row.

    Rows that never end (hit max_new_tokens) keep every position.
    """
    end_ids = torch.as_tensor(list(end_ids) if not torch.is_tensor(end_ids) else end_ids, device=tokens.device)
    is_end = torch.isin(tokens, end_ids).to(torch.int64)
    ended_before = torch.cumsum(is_end, dim=1) - is_end  # ends strictly before position t
    return ended_before == 0


def token_stats(logits: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position entropy, log-prob of the chosen token and top-1 minus top-2 margin, [B, T] each."""
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and tokens [B, T]; got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    b, t, v = logits.shape
    flat = _position_stats(logits.reshape(b * t, v), tokens.reshape(b * t))
    return {k: x.reshape(b, t) for k, x in flat.items()}


def _position_stats(logits: torch.Tensor, tokens: torch.Tensor, *, owned: bool = False) -> dict[str, torch.Tensor]:
    """:func:`token_stats` over ``N`` positions: ``logits [N, V]``, ``tokens [N]``, results ``[N]`` in float32.

    One float32 copy of the logits turned into log-probabilities in place (``owned``: ``logits`` is
    already a copy made for this call), then the probabilities: two [N, V] buffers, not the five a
    log_softmax / exp / where chain allocates. Margins from the top-2 log-probabilities (the same
    tokens as the top-2 probabilities: exp is monotonic).
    """
    if logits.shape[-1] < 2:
        raise ValueError(f"vocabulary size {logits.shape[-1]} is too small: a margin needs at least 2 tokens")
    logp = logits.float() if owned or logits.dtype != torch.float32 else logits.clone()  # float32 even for bf16 logits
    log_z = torch.logsumexp(logp, dim=-1, keepdim=True)
    logp -= log_z
    p = logp.exp()
    # p * logp is 0 * -inf = nan where a logit is -inf (a masked vocabulary): those terms are 0, so
    # nansum; a nan (or +inf) logit gives a nan entropy, as the plain formula does, through log Z
    entropy = -torch.nansum(p * logp, dim=-1)
    entropy = torch.where(log_z.squeeze(-1).isfinite(), entropy, torch.nan)
    chosen = logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    top2 = logp.topk(2, dim=-1).values.exp()
    return {"entropy": entropy, "chosen_logprob": chosen, "margin": top2[..., 0] - top2[..., 1]}


_CHUNK = 16  # positions per _position_stats call on CPU: 16 x a 49k vocabulary in float32 is 3 MB, cache-sized


def response_scores(
    logits: torch.Tensor | Sequence[torch.Tensor], tokens: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The score columns (float32 [B]) plus ``response_tokens`` (int64 [B]); see the module doc.

    ``logits``: ``[B, T, V]``, or the ``T`` per-step ``[B, V]`` tensors generation returns (not
    stacked: a [B, T, V] copy is 300 MB at 64 rows x 24 tokens x 49k). Only response positions
    (``mask``) are computed, a few at a time: after a row's end-of-turn token its logits are never read.

    A row with an empty mask has no response to be uncertain about: its scores are NaN (the scorer
    never produces one, since generation emits at least one token).
    """
    m = mask.to(torch.bool)
    b, t = m.shape
    steps = logits.unbind(1) if torch.is_tensor(logits) else list(logits)
    if tokens.shape != (b, t) or len(steps) != t or any(s.dim() != 2 or s.shape[0] != b for s in steps):
        shape = tuple(logits.shape) if torch.is_tensor(logits) else f"{len(steps)} steps"
        raise ValueError(
            f"logits must be [B, T, V] (or T steps of [B, V]) for tokens [B, T] = {tuple(tokens.shape)}; got {shape}"
        )
    ent, lp, margin = (torch.zeros(b, t, device=m.device) for _ in range(3))
    for j, step in enumerate(steps):
        rows = m[:, j].nonzero().squeeze(1)
        chunk = _CHUNK if step.device.type == "cpu" else max(len(rows), 1)  # a GPU takes the step at once
        for c in range(0, len(rows), chunk):
            r = rows[c : c + chunk]
            st = _position_stats(step[r], tokens[r, j], owned=True)  # step[r] is a copy
            ent[r, j], lp[r, j], margin[r, j] = st["entropy"], st["chosen_logprob"], st["margin"]
    n = m.sum(1)
    nf = n.clamp(min=1).float()
    zero = torch.zeros_like(ent)
    logp_resp = torch.where(m, lp, zero).sum(1)
    out = {
        "mean_entropy": torch.where(m, ent, zero).sum(1) / nf,
        "max_entropy": torch.where(m, ent, torch.full_like(ent, -torch.inf)).amax(1),
        # 1 - exp(x) computed as -expm1(x): exact for p(response) close to 1
        "least_confidence": -torch.expm1(logp_resp),
        "least_confidence_norm": -torch.expm1(logp_resp / nf),
        "mean_margin": torch.where(m, margin, zero).sum(1) / nf,
        "min_margin": torch.where(m, margin, torch.full_like(margin, torch.inf)).amin(1),
    }
    empty = n == 0
    out = {k: torch.where(empty, torch.full_like(v, torch.nan), v).float() for k, v in out.items()}
    out["response_tokens"] = n.to(torch.int64)
    return out
