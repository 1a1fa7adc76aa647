"""The CPU fast paths of a LoRA step and of evaluation give the numbers of the plain ones.

- the response-only LM head (the model's own head on no position, ours on the response positions)
  equals the full logits gathered at those positions, in fp32 and under bf16 autocast, through peft;
- the LM head always gets a contiguous input (a strided [rows, 1, hidden] view sent torch's CPU
  matmul down a path that copied the whole weight once per row), and its logits are the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from edsft.config import Config
from edsft.models import load_model, load_tokenizer
from edsft.training.data import IGNORE_INDEX, collate, tokenize_examples
from edsft.training.engine import response_logits
from edsft.training.loop import build_model

TINY = "builtin:tiny-llama"


def _batch(n: int = 6) -> dict:
    from edsft.models import end_of_turn_ids

    tok = load_tokenizer(TINY)
    rows = [
        {"row_id": str(i), "prompt": f"What is {i} plus {i}?" + " Think." * (i % 3), "response": str(2 * i)} for i in range(n)
    ]
    items, _ = tokenize_examples(tok, rows, 64, end_of_turn_ids(tok))
    return collate(items, tok.pad_token_id)


@pytest.mark.parametrize("bf16", [False, True])
def test_response_logits_equal_the_full_logits_at_the_response_positions(bf16):
    cfg = Config().replace(**{"training.model": TINY, "training.precision": "bf16" if bf16 else "fp32"}).training
    torch.manual_seed(0)
    model = build_model(cfg, TINY, torch.device("cpu")).eval()  # eval: no dropout, so both passes agree
    b = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, targets, rows = response_logits(model, b["input_ids"], b["attention_mask"], b["labels"])
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    keep = b["labels"][:, 1:] != IGNORE_INDEX
    assert logits.shape == (int(keep.sum()), full.shape[-1])
    assert torch.equal(targets, b["labels"][:, 1:][keep]) and torch.equal(rows, keep.nonzero()[:, 0])
    torch.testing.assert_close(logits.float(), full[:, :-1][keep].float(), rtol=0, atol=1e-2 if bf16 else 1e-5)


def test_lm_head_input_is_contiguous():
    model = load_model(TINY, dtype="bfloat16", device="cpu")
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    b = _batch(3)
    with torch.no_grad():
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1)  # generate's call
        model.generate(input_ids=b["input_ids"][:, :8], max_new_tokens=2, do_sample=False)
    assert seen and all(seen), seen


def test_contiguous_head_input_gives_the_same_logits_as_the_strided_view():
    model = load_model(TINY, dtype="bfloat16", device="cpu")
    head = model.get_output_embeddings()
    hidden = torch.randn(5, 9, head.in_features, dtype=torch.bfloat16)
    view = hidden[:, -1:, :]
    assert not view.is_contiguous()
    with torch.no_grad():
        hooked = head(view)  # the hook makes it contiguous
        plain = torch.nn.functional.linear(view, head.weight)  # the strided path itself
    assert torch.equal(hooked, plain)
