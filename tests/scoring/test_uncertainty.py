"""Uncertainty math against numbers worked out by hand on a 3-token vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from edsft.scoring.uncertainty import response_mask, response_scores, token_stats


def _logits(*dists):
    # logits = log p, so softmax gives back exactly p
    return torch.log(torch.tensor(dists, dtype=torch.float64)).float()


def test_scores_match_hand_values():
    # Row A: two tokens, p = (.5, .25, .25) then (.8, .1, .1), both times token 0 is chosen; position 3 is padding.
    # Row B: the response ends at once (end-of-turn first): one token, p = (1/3, 1/3, 1/3), token 1 chosen.
    # Padding positions hold extreme logits that must not leak into any score.
    junk = [1e-9, 1 - 2e-9, 1e-9]
    logits = torch.stack(
        [
            _logits([0.5, 0.25, 0.25], [0.8, 0.1, 0.1], junk),
            _logits([1 / 3, 1 / 3, 1 / 3], junk, junk),
        ]
    )
    tokens = torch.tensor([[0, 0, 2], [1, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    s = response_scores(logits, tokens, mask)

    h1 = 1.5 * math.log(2)  # -(.5 ln .5 + 2 * .25 ln .25)
    h2 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.1))  # 0.639032
    expected = {
        "mean_entropy": [(h1 + h2) / 2, math.log(3)],
        "max_entropy": [h1, math.log(3)],
        "least_confidence": [1 - 0.5 * 0.8, 1 - 1 / 3],  # p(response) = .4 and 1/3
        "least_confidence_norm": [1 - math.sqrt(0.4), 1 - 1 / 3],
        "mean_margin": [(0.25 + 0.7) / 2, 0.0],
        "min_margin": [0.25, 0.0],
    }
    for name, values in expected.items():
        assert s[name].dtype == torch.float32
        assert s[name].tolist() == pytest.approx(values, abs=1e-6), name
    assert s["response_tokens"].tolist() == [2, 1]
    assert expected["mean_entropy"][0] == pytest.approx(0.8394, abs=1e-4)  # the hand value itself


def test_token_stats_and_certain_token():
    # a near-one-hot distribution: entropy ~0, margin ~1, chosen log-prob ~0
    logits = torch.tensor([[[30.0, 0.0, 0.0]]])
    st = token_stats(logits, torch.tensor([[0]]))
    assert st["entropy"].item() == pytest.approx(0.0, abs=1e-10)
    assert st["margin"].item() == pytest.approx(1.0, abs=1e-10)
    assert st["chosen_logprob"].item() == pytest.approx(0.0, abs=1e-10)
    # -inf logits (a masked vocabulary) give finite entropy, not nan
    st = token_stats(torch.tensor([[[0.0, 0.0, -math.inf]]]), torch.tensor([[1]]))
    assert st["entropy"].item() == pytest.approx(math.log(2))


def test_response_mask_stops_after_first_end_token():
    tokens = torch.tensor([[5, 2, 9, 2], [2, 0, 0, 0], [5, 5, 5, 5], [7, 3, 8, 3]])
    m = response_mask(tokens, [2, 3])
    assert m.int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_empty_mask_is_nan_and_bad_shapes_raise():
    s = response_scores(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    assert math.isnan(s["mean_entropy"].item()) and s["response_tokens"].item() == 0
    with pytest.raises(ValueError, match="logits must be"):
        token_stats(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def _reference_scores(logits, tokens, mask):
    """The scores by their definitions, over the full [B, T, V] tensor in float64 (no shortcut)."""
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    top2 = p.topk(2, -1).values
    margin = top2[..., 0] - top2[..., 1]
    m = mask.bool()
    n = m.sum(1).double()
    lp = (chosen * m).sum(1)
    return {
        "mean_entropy": (ent * m).sum(1) / n,
        "max_entropy": ent.masked_fill(~m, -math.inf).amax(1),
        "least_confidence": 1 - lp.exp(),
        "least_confidence_norm": 1 - (lp / n).exp(),
        "mean_margin": (margin * m).sum(1) / n,
        "min_margin": margin.masked_fill(~m, math.inf).amin(1),
    }


def test_per_step_logits_and_the_stacked_tensor_give_the_definitions():
    # more rows than one chunk of positions (uncertainty._CHUNK), responses of every length 1..T,
    # and nan logits after each response's end that must not leak into a score
    g = torch.Generator().manual_seed(0)
    b, t, v = 41, 6, 500
    logits = torch.randn(b, t, v, generator=g) * 4
    tokens = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.arange(b) % t + 1
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    logits[~mask] = torch.nan  # after the end
    stacked = response_scores(logits, tokens, mask)
    steps = response_scores(list(logits.unbind(1)), tokens, mask)
    ref = _reference_scores(torch.where(mask.unsqueeze(-1), logits, 0.0), tokens, mask)
    for name, want in ref.items():
        assert torch.equal(stacked[name], steps[name]), name
        assert stacked[name].tolist() == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6), name
    assert stacked["response_tokens"].tolist() == lengths.tolist()
    with pytest.raises(ValueError, match="logits must be"):
        response_scores(list(logits.unbind(1))[:-1], tokens, mask)  # one step short
