"""A micro-batch's shared prefix (a chat template's system turn) runs through the model once.

edsft.training.engine.response_logits computes the leading tokens every row starts with for one
row and lets the rows attend to their keys and values: the same loss and gradients as the plain
batched pass (float32, tiny Llama), and the same training through DeepSpeed and DDP."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_train_ray import _cfg

from edsft.models import end_of_turn_ids, load_model, load_tokenizer
from edsft.training import engine
from edsft.training.data import IGNORE_INDEX, collate, tokenize_example
from edsft.training.engine import _prefix_length, response_logits

MODEL = "builtin:tiny-llama"
LEAD = "Answer in one short sentence, without any explanation at all, and think before you answer: "


def _batch(prompts, responses):
    tok = load_tokenizer(MODEL)
    ends = end_of_turn_ids(tok)
    exs = [tokenize_example(tok, p, r, ends, 128, None)[0] for p, r in zip(prompts, responses)]
    return collate(exs, tok.pad_token_id)


def _model():
    torch.manual_seed(0)
    model = load_model(MODEL, dtype="float32", device=torch.device("cpu"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(model, lora)


def _loss_and_grads(model, b, share):
    model.zero_grad()
    logits, targets, rows = response_logits(model, b["input_ids"], b["attention_mask"], b["labels"], share_prefix=share)
    loss = torch.nn.functional.cross_entropy(logits, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), targets, rows, loss.item(), grads


def test_the_shared_prefix_runs_once_and_changes_no_loss_or_gradient():
    b = _batch([f"{LEAD}is {i * 7} a number?" + " Go." * (i % 3) for i in range(6)], [str(i) * (1 + i % 4) for i in range(6)])
    keep = b["labels"][:, 1:] != IGNORE_INDEX
    p = _prefix_length(b["input_ids"], b["attention_mask"], keep)
    assert p >= 12 and (b["input_ids"][:, :p] == b["input_ids"][:1, :p]).all()
    model = _model()
    calls = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        shared = _loss_and_grads(model, b, True)
    finally:
        hook.remove()
    assert calls == [(1, p), (6, b["input_ids"].shape[1] - p)]  # the prefix for one row, then the rest of each row
    plain = _loss_and_grads(model, b, False)
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(shared[1], plain[1]) and torch.equal(shared[2], plain[2])
    assert shared[3] == pytest.approx(plain[3], rel=1e-6)
    assert set(shared[4]) == set(plain[4]) and len(plain[4]) > 0
    for name in plain[4]:  # the prefix's gradient reaches every shared weight through the expanded cache
        torch.testing.assert_close(shared[4][name], plain[4][name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_prefix_is_shared_into_a_response_or_for_one_row():
    same_prompt = _batch([f"{LEAD}is 7 a number?"] * 3, ["yes", "no", "maybe"])  # rows equal up to the response
    keep = same_prompt["labels"][:, 1:] != IGNORE_INDEX
    p = _prefix_length(same_prompt["input_ids"], same_prompt["attention_mask"], keep)
    first = int(keep[0].float().argmax())
    assert 0 < p <= first  # stops where the first label is predicted: that hidden state is each row's own
    plain = _loss_and_grads(_model(), same_prompt, False)
    shared = _loss_and_grads(_model(), same_prompt, True)
    assert shared[3] == pytest.approx(plain[3], rel=1e-6)
    one = _batch([f"{LEAD}is 7 a number?"], ["yes"])
    assert _prefix_length(one["input_ids"], one["attention_mask"], one["labels"][:, 1:] != IGNORE_INDEX) == 0


@pytest.mark.parametrize("backend", ["deepspeed", "ddp"])
def test_training_with_a_shared_prefix_is_the_same_training(tmp_path, monkeypatch, backend):
    from edsft.distributed.train import train_sft

    rows = [{"row_id": f"r{i}", "prompt": f"{LEAD}is {i} a number?", "response": "yes", "task": "const"} for i in range(32)]
    data = tmp_path / "annotated.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    cfg = _cfg(**{"training.num_workers": 1, "training.mode": "local", "training.backend": backend, "training.lora_dropout": 0.0})
    used = []
    real = engine._prefix_cache
    monkeypatch.setattr(engine, "_prefix_cache", lambda *a: used.append(a[1].shape) or real(*a))
    shared = train_sft(cfg, str(data), str(tmp_path / "shared"), progress=False)
    assert len(used) == 12 and all(s[0] == 1 and s[1] >= 12 for s in used)  # every micro step
    monkeypatch.setattr(engine.Engine, "share_prefix", lambda self: False)
    used.clear()
    plain = train_sft(cfg, str(data), str(tmp_path / "plain"), progress=False)
    assert used == []
    a = load_file(str(tmp_path / "shared" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert [s for s, _ in shared["loss_curve"]] == [s for s, _ in plain["loss_curve"]]
    for (_, x), (_, y) in zip(shared["loss_curve"], plain["loss_curve"]):
        assert x == pytest.approx(y, rel=1e-4)


def test_active_dropout_turns_sharing_off():
    class Stub(engine.Engine):
        def __init__(self, model):
            self.model = model

    assert Stub(_model()).share_prefix()
    dropping = get_peft_model(
        load_model(MODEL, dtype="float32", device=torch.device("cpu")),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1),
    )
    assert not Stub(dropping).share_prefix()  # one pass would give every row the same mask on the prefix
