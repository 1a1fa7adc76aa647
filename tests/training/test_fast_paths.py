"""The CPU fast paths of a LoRA step and of evaluation give the numbers of the plain ones.

- the response-only LM head (the model's own head on no position, ours on the response positions)
  equals the full logits gathered at those positions, in fp32 and under bf16 autocast, through peft;
- the LM head always gets a contiguous input (a strided [rows, 1, hidden] view sent torch's CPU
  matmul down a path that copied the whole weight once per row), and its logits are the same numbers;
- 'auto' attention: eager on CPU for short sequences, sdpa for long ones and on GPU; both give the
  same logits;
- Dropout16 is a Bernoulli dropout: drop rate p (to 1/65536), kept values scaled by 1 / (1 - p),
  the gradient masked the same way, reproducible from the seed, identity in eval mode; build_model
  swaps peft's LoRA dropouts for it on CPU and no longer casts LoRA inputs to fp32 in bf16.
"""

from __future__ import annotations

import pytest
import torch

from edsft.config import Config
from edsft.models import EAGER_ATTENTION_MAX_LEN, load_model, load_tokenizer, resolve_attention
from edsft.training.data import IGNORE_INDEX, collate, tokenize_examples
from edsft.training.dropout import Dropout16, use_dropout16
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


def test_auto_attention_is_eager_for_short_cpu_sequences_and_gives_the_same_logits():
    assert resolve_attention("auto", "cpu", 256) == "eager"
    assert resolve_attention("auto", "cpu", None) == "eager"
    assert resolve_attention("auto", "cpu", EAGER_ATTENTION_MAX_LEN + 1) == "sdpa"
    assert resolve_attention("auto", "cuda", 64) == "sdpa"
    assert resolve_attention("sdpa", "cpu", 64) == "sdpa"
    b = _batch()
    out = {}
    for attention in ("eager", "sdpa"):
        model = load_model(TINY, dtype="float32", device="cpu", attention=attention)
        assert model.config._attn_implementation == attention
        with torch.no_grad():
            out[attention] = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    mask = b["attention_mask"].bool()  # padded positions attend to nothing: their values are undefined
    torch.testing.assert_close(out["eager"][mask], out["sdpa"][mask], rtol=1e-4, atol=1e-4)


def test_dropout16_is_a_bernoulli_dropout_with_exact_scale_and_masked_gradient():
    d = Dropout16(0.05)
    assert d.p == pytest.approx(0.05, abs=1 / 65536) and d.scale == 1 / (1 - d.p)
    torch.manual_seed(1)
    x = torch.ones(4_000_000, requires_grad=True)
    y = d(x)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - d.p) < 4 * (d.p * (1 - d.p) / x.numel()) ** 0.5  # 4 sigma: 0.00044
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(d.scale)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(out)/d(x) is the mask times the scale, per element
    for dtype in (torch.bfloat16, torch.float32):  # keeps the input's dtype and shape
        z = torch.randn(3, 5, 7, dtype=dtype)
        assert d(z).dtype == dtype and d(z).shape == z.shape
    torch.manual_seed(7)
    a = d(torch.ones(1000))
    torch.manual_seed(7)
    assert torch.equal(a, d(torch.ones(1000)))  # the default generator: seeds and saved RNG states cover it
    z = torch.randn(100)
    assert d.eval()(z) is z and Dropout16(0.0).train()(z) is z
    with pytest.raises(ValueError, match="must be in"):
        Dropout16(1.0)


def test_build_model_uses_dropout16_and_keeps_bf16_lora_inputs_in_bf16():
    cfg = Config().replace(**{"training.model": TINY, "training.precision": "bf16", "training.lora_dropout": 0.1}).training
    model = build_model(cfg, TINY, torch.device("cpu"))
    drops = [m for m in model.modules() if isinstance(m, (Dropout16, torch.nn.Dropout))]
    assert drops and all(isinstance(m, Dropout16) and m.training for m in drops)
    lora = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert lora and not any(m.cast_input_dtype_enabled for m in lora)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # adapters stay fp32
    assert use_dropout16(model) == 0  # nothing left to replace
    saved = model.peft_config["default"]
    assert saved.lora_dropout == 0.1  # the adapter config still says what the run used


def test_a_continued_adapter_gets_the_same_fast_paths(tmp_path):
    cfg = Config().replace(**{"training.model": TINY, "training.precision": "bf16", "training.lora_dropout": 0.1}).training
    build_model(cfg, TINY, torch.device("cpu")).save_pretrained(tmp_path)
    model = build_model(cfg, TINY, torch.device("cpu"), init_adapter=tmp_path)
    assert any(isinstance(m, Dropout16) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules())


def test_training_takes_eager_attention_on_cpu_and_inference_keeps_sdpa():
    cfg = Config().replace(**{"training.model": TINY, "training.max_seq_len": 128}).training
    assert build_model(cfg, TINY, torch.device("cpu")).config._attn_implementation == "eager"
    long = Config().replace(**{"training.model": TINY, "training.max_seq_len": 1024}).training
    assert build_model(long, TINY, torch.device("cpu")).config._attn_implementation == "sdpa"
    from edsft.scoring.scorer import Scorer
    from edsft.training.evaluation import Evaluator

    assert Scorer(TINY, dtype="float32").model.config._attn_implementation == "sdpa"
    assert Evaluator(TINY, dtype="float32").model.config._attn_implementation == "sdpa"


def test_evaluation_prefills_a_shared_prompt_prefix_once_per_variant_with_the_same_answers(tmp_path):
    # the chat template's shared tokens are prefilled once per micro batch and model variant; the
    # base and the finetuned answers equal the plain left-padded generation's
    from peft import LoraConfig, get_peft_model

    from edsft.training.evaluation import Evaluator

    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_model(TINY, dtype="float32", device="cpu"),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)  # the finetuned answers differ from the base ones
    peft_model.save_pretrained(tmp_path / "adapter")
    prompts = [f"Reply with one word and nothing else, please: what is {i} plus {i}?" + " Think." * (i % 3) for i in range(6)]
    ev = Evaluator(TINY, str(tmp_path / "adapter"), device="cpu", dtype="float32", max_new_tokens=6, batch_size=3)
    assert ev._shared_prefix is not None
    shared = {v: ev.generate(prompts, v) for v in ev.variants}
    assert len(ev._shared_prefix._memo) >= 2  # one prefix per variant at least (the adapter changes its KV)
    assert {tag for _, tag in ev._shared_prefix._memo} == {"base", "finetuned"}
    ev._shared_prefix = None
    plain = {v: ev.generate(prompts, v) for v in ev.variants}
    assert shared == plain
    assert plain["base"] != plain["finetuned"]


def test_evaluation_prefills_each_prompt_once_for_loss_and_generation_with_the_numbers_of_two_passes(tmp_path):
    # losses_and_generate (what evaluate runs) prefills a prompt once and runs the teacher-forced
    # response and the greedy answer on that cache: the same losses, token counts and answers as the
    # separate loss pass + generation, for both variants; a row whose prompt the two passes tokenise
    # differently (longer than max_seq_len) and a conversation row come out right too
    import json

    from peft import LoraConfig, get_peft_model

    from edsft.training.evaluation import Evaluator

    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_model(TINY, dtype="float32", device="cpu"),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    context = json.dumps([{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}])
    rows = [
        {"row_id": str(i), "prompt": f"What is {i} plus {i}?" + " Think." * (i % 4), "response": f"{2 * i}" + " ok" * (i % 3)}
        for i in range(7)
    ]
    rows += [
        {"row_id": "long", "prompt": "Count: " + " one two three" * 40, "response": "four"},  # > max_seq_len
        {"row_id": "conv", "prompt": "And times 3?", "response": "twelve", "context": context},
    ]
    ev = Evaluator(TINY, str(tmp_path / "adapter"), device="cpu", dtype="float32", max_seq_len=64, max_new_tokens=5, batch_size=3)
    embed = ev.model.get_base_model().model.embed_tokens
    seen = []
    handle = embed.register_forward_hook(lambda m, a, out: seen.append(a[0].numel()))
    try:
        for variant in ev.variants:
            seen.clear()
            losses, preds = ev.losses_and_generate(rows, variant)
            fused_tokens = sum(seen)
            seen.clear()
            ref_losses, ref_preds = (
                ev.losses(rows, variant),
                ev.generate([r["prompt"] for r in rows], variant, [r.get("context") for r in rows]),
            )
            separate_tokens = sum(seen)
            assert preds == ref_preds
            assert [x["n_tokens"] for x in losses] == [x["n_tokens"] for x in ref_losses]
            # the long prompt leaves its response no room in the loss pass (0 tokens); generation keeps its end
            assert [x["n_tokens"] > 0 for x in losses] == [r["row_id"] != "long" for r in rows]
            for x, y in zip(losses, ref_losses):
                assert x["loss_sum"] == pytest.approx(y["loss_sum"], rel=1e-5, abs=1e-5)
            # the prompts go through once, not twice: well under the two passes' token count
            assert fused_tokens < 0.75 * separate_tokens
        assert preds != ev.losses_and_generate(rows, "base")[1]  # the adapter changes the answers
    finally:
        handle.remove()
    by_variant = {(r["row_id"], r["variant"]): r for r in ev.evaluate(rows)}
    assert by_variant[("long", "finetuned")]["prediction"] == preds[7]
