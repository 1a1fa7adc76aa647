"""The direct Scorer on the tiny Llama: parity with a brute-force forward, padding invariance,
EOS-first responses, quarantine of bad rows, and refusal of the label column.

The numeric parity checks pin dtype=float32: 'auto' is bf16 on CPUs with native bf16, where
batch composition moves numbers by bf16 rounding; bf16 against fp32 is tested in test_bf16_quality.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edsft.scoring.scorer import Scorer
from edsft.scoring.uncertainty import SCORE_COLUMNS, response_scores

PROMPTS = [
    "What is 2+3?",
    "Write the number seven in words, then spell it backwards and count its letters.",
    "Name a prime.",
    "Explain what a Python list comprehension is and give two examples that use a condition.",
    "hi",
]


def _batch(prompts, ids=None):
    ids = ids if ids is not None else [f"r{i}" for i in range(len(prompts))]
    return {
        "row_id": np.array(ids, dtype=object),
        "prompt": np.array(prompts, dtype=object),
        "task": np.array(["t"] * len(prompts), dtype=object),
    }


@pytest.fixture(scope="module")
def scorer():
    return Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=6, max_prompt_tokens=64, batch_size=8, max_retries=1)


def test_scores_equal_a_brute_force_forward_over_prompt_and_response(scorer):
    # The scorer takes its numbers from generation's own logits; recompute them from one plain
    # forward pass over prompt + generated tokens and compare.
    out = scorer(_batch(PROMPTS[:1]))
    model = scorer.model
    prompt_ids = scorer._prompt_ids(PROMPTS[0])
    assert out["prompt_tokens"][0] == len(prompt_ids)
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False, eos_token_id=scorer.end_ids, pad_token_id=scorer.pad_id
        )
        resp = gen[0, len(prompt_ids) :]
        full = model(gen, output_hidden_states=True)
    logits = full.logits[:, len(prompt_ids) - 1 : -1]  # the distribution that produced each response token
    expected = response_scores(logits, resp.unsqueeze(0), torch.ones(1, len(resp)))
    for c in SCORE_COLUMNS:
        assert out[c][0] == pytest.approx(expected[c].item(), abs=1e-5), c
    assert out["response_tokens"][0] == len(resp)
    h = full.hidden_states[-1][0, : len(prompt_ids)].mean(0)  # last layer, prompt positions
    np.testing.assert_allclose(out["embedding"][0], (h / h.norm()).numpy(), atol=1e-5)


def test_embedding_layer_matches_hf_hidden_state_numbering():
    s0 = Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=1, embedding_layer=1)
    ids = s0._prompt_ids(PROMPTS[2])
    with torch.no_grad():
        hs = s0.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    h = hs[1][0].mean(0)
    np.testing.assert_allclose(s0(_batch(PROMPTS[2:3]))["embedding"][0], (h / h.norm()).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="embedding_layer=5"):
        Scorer("builtin:tiny-llama", embedding_layer=5)


def test_padding_invariance(scorer):
    # each prompt alone vs inside one left-padded batch with longer prompts: same numbers
    together = scorer(_batch(PROMPTS))
    assert len(set(together["prompt_tokens"].tolist())) > 2  # really padded
    for i, p in enumerate(PROMPTS):
        alone = scorer(_batch([p]))
        for c in (*SCORE_COLUMNS, "embedding"):
            np.testing.assert_allclose(alone[c][0], together[c][i], atol=1e-4, err_msg=c)
        assert alone["generated"][0] == together["generated"][i]
        assert alone["response_tokens"][0] == together["response_tokens"][i]
    assert together["row_id"].tolist() == [f"r{i}" for i in range(len(PROMPTS))]  # input order restored
    np.testing.assert_allclose(np.linalg.norm(together["embedding"], axis=1), 1.0, atol=1e-5)
    assert together["embedding"].dtype == np.float32


def test_response_that_ends_at_once_has_defined_scores():
    s = Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=5)
    im_end = s.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def end_turn_now(module, args, output):  # the model puts all its mass on <|im_end|>
        output = output.clone()
        output[..., im_end] += 100.0
        return output

    handle = s.model.lm_head.register_forward_hook(end_turn_now)
    try:
        out = s(_batch(PROMPTS[:2]))
    finally:
        handle.remove()
    assert out["response_tokens"].tolist() == [1, 1]
    assert out["generated"].tolist() == ["", ""]
    assert list(out["error"]) == [None, None]
    for c in SCORE_COLUMNS:
        assert np.isfinite(out[c]).all(), c
    np.testing.assert_allclose(out["least_confidence"], 0.0, atol=1e-6)  # p(<|im_end|>) ~ 1
    np.testing.assert_allclose(out["min_margin"], 1.0, atol=1e-6)
    np.testing.assert_allclose(out["max_entropy"], 0.0, atol=1e-5)


class _FaultyScorer(Scorer):
    """Fault injection: generation raises whenever a given prompt is in the micro-batch."""

    poison = "POISON"
    calls = 0

    def _score_ids(self, id_lists):
        self.calls += 1
        if any(ids == self._prompt_ids(self.poison) for ids in id_lists):
            raise RuntimeError("injected failure")
        return super()._score_ids(id_lists)


def test_bad_rows_are_quarantined_and_the_rest_scored(scorer):
    s = _FaultyScorer("builtin:tiny-llama", dtype="float32", max_new_tokens=6, max_prompt_tokens=64, batch_size=8, max_retries=2)
    prompts = [PROMPTS[0], "", None, "   ", PROMPTS[1], "POISON", PROMPTS[2], PROMPTS[3]]
    out = s(_batch(prompts))
    errors = list(out["error"])
    bad = {i for i, e in enumerate(errors) if e is not None}
    assert bad == {1, 2, 3, 5}
    assert "empty after truncation" in errors[1] and "not a string" in errors[2]
    assert "RuntimeError: injected failure" in errors[5]
    assert len(prompts) == (len(prompts) - len(bad)) + len(bad) == len(out["row_id"])
    # retried (1 + 2 retries) before bisecting 5 valid rows down to the poisoned one
    assert s.calls > 3
    for i in bad:
        assert np.isnan(out["mean_entropy"][i]) and not out["embedding"][i].any()
    # the good rows get exactly the scores they get in a clean batch
    clean = scorer(_batch([prompts[i] for i in (0, 4, 6, 7)]))
    for j, i in enumerate((0, 4, 6, 7)):
        for c in SCORE_COLUMNS:
            assert out[c][i] == pytest.approx(clean[c][j], abs=1e-4)


def test_label_column_is_refused_and_bad_arguments_are_clear(scorer):
    batch = _batch(PROMPTS[:2])
    batch["response"] = np.array(["5", "seven"], dtype=object)
    with pytest.raises(ValueError, match="label column"):
        scorer(batch)
    with pytest.raises(ValueError, match="'prompt'"):
        scorer({"row_id": np.array(["a"])})
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        Scorer("builtin:tiny-llama", max_new_tokens=0)


@pytest.mark.parametrize("bucket", [1, 64])
def test_static_cache_generation_gives_the_dynamic_scores(scorer, bucket):
    # the fast path (preallocated KV cache, width bucketing, micro-batch padded with filler rows) must
    # change nothing but speed: same tokens, same scores, same embeddings for the real rows
    static = Scorer(
        "builtin:tiny-llama",
        dtype="float32",
        max_new_tokens=6,
        max_prompt_tokens=64,
        batch_size=8,
        max_retries=1,
        generation="static",
        width_bucket=bucket,
    )
    assert static.generation == "static" and scorer.generation == "dynamic"  # auto on CPU = dynamic
    a, b = scorer(_batch(PROMPTS)), static(_batch(PROMPTS))
    assert list(a["generated"]) == list(b["generated"])
    np.testing.assert_array_equal(a["response_tokens"], b["response_tokens"])
    for c in SCORE_COLUMNS:
        np.testing.assert_allclose(a[c], b[c], atol=1e-4, err_msg=c)
    np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-4)


def test_generation_mode_is_checked():
    with pytest.raises(ValueError, match="generation='fast'"):
        Scorer("builtin:tiny-llama", generation="fast")
    with pytest.raises(ValueError, match="width_bucket=0"):
        Scorer("builtin:tiny-llama", width_bucket=0)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter for the tiny Llama with random (not zero) B matrices, so it changes the model."""
    from peft import LoraConfig, get_peft_model

    from edsft.models import load_model

    torch.manual_seed(0)
    model = load_model("builtin:tiny-llama", dtype="float32", device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)  # a visible change of the answers, not only of the last digits
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    return str(folder)


def test_adapter_scores_are_the_finetuned_models(scorer, adapter_dir):
    from peft import PeftModel

    from edsft.models import load_model

    tuned = Scorer(
        "builtin:tiny-llama",
        dtype="float32",
        max_new_tokens=6,
        max_prompt_tokens=64,
        batch_size=8,
        max_retries=1,
        adapter=adapter_dir,
    )
    out = tuned(_batch(PROMPTS[:1]))
    # reference: base + the adapter left unmerged, one plain forward over prompt + generated answer
    model = PeftModel.from_pretrained(load_model("builtin:tiny-llama", dtype="float32", device="cpu"), adapter_dir).eval()
    prompt_ids = tuned._prompt_ids(PROMPTS[0])
    with torch.no_grad():
        gen = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tuned.end_ids,
            pad_token_id=tuned.pad_id,
        )
        resp = gen[0, len(prompt_ids) :]
        full = model(input_ids=gen, output_hidden_states=True)
    expected = response_scores(full.logits[:, len(prompt_ids) - 1 : -1], resp.unsqueeze(0), torch.ones(1, len(resp)))
    for c in SCORE_COLUMNS:
        assert out[c][0] == pytest.approx(expected[c].item(), abs=1e-4), c
    h = full.hidden_states[-1][0, : len(prompt_ids)].mean(0)
    np.testing.assert_allclose(out["embedding"][0], (h / h.norm()).numpy(), atol=1e-4)
    base = scorer(_batch(PROMPTS[:1]))
    assert not np.allclose(out["embedding"][0], base["embedding"][0], atol=1e-3)
    # the tiny model is near uniform over its vocabulary: the adapter moves its scores a little, but surely
    assert max(abs(float(out[c][0]) - float(base[c][0])) for c in SCORE_COLUMNS) > 1e-5


def test_adapter_stays_unmerged_in_bf16(adapter_dir):
    from peft import PeftModel

    tuned = Scorer("builtin:tiny-llama", dtype="bfloat16", max_new_tokens=4, batch_size=8, adapter=adapter_dir)
    assert isinstance(tuned.model, PeftModel)  # merging into bf16 weights would round the update away
    base = Scorer("builtin:tiny-llama", dtype="bfloat16", max_new_tokens=4, batch_size=8)
    a, b = tuned(_batch(PROMPTS)), base(_batch(PROMPTS))
    assert not np.allclose(a["embedding"], b["embedding"], atol=1e-2)
    with pytest.raises(ValueError, match="adapter_config.json"):
        Scorer("builtin:tiny-llama", adapter=str(Path(adapter_dir).parent))


def test_embed_only_rows_get_the_prefill_embedding_and_no_generation(scorer):
    batch = _batch(PROMPTS)
    full = scorer(batch)
    flags = np.array([True, False, True, False, True])
    mixed = scorer({**batch, "embed_only": flags})
    # the embedding of an embed-only row is the one its scoring gives (same prefill hidden states)
    np.testing.assert_allclose(mixed["embedding"][flags], full["embedding"][flags], atol=1e-5)
    assert np.isnan(mixed["mean_entropy"][flags]).all() and (mixed["response_tokens"][flags] == 0).all()
    assert all(g is None for g in mixed["generated"][flags]) and all(e is None for e in mixed["error"])
    np.testing.assert_array_equal(mixed["prompt_tokens"], full["prompt_tokens"])
    # the other rows are scored as without the flags, to float32 rounding (a few ulps: an entropy of 7.3
    # measured 2.9e-6 apart, 6 ulps, with the model run on 2 rows instead of 5)
    for c in (*SCORE_COLUMNS, "response_tokens"):
        np.testing.assert_allclose(mixed[c][~flags], full[c][~flags], rtol=1e-6, atol=1e-6)
    assert mixed["embed_only"].tolist() == flags.tolist()


def test_a_shared_prompt_prefix_is_prefilled_once_and_changes_no_number(scorer):
    # prompts that start alike (as every prompt does after a chat template's system turn): the shared
    # tokens are prefilled for one row and reused; tokens, scores and embeddings equal each prompt alone
    prompts = [f"Answer in one short sentence, without any explanation at all: {p}" for p in PROMPTS]
    ids = [scorer._prompt_ids(p) for p in prompts]
    shared = scorer._shared_prefix
    p = shared.length(ids)
    assert p >= 10 and all(x[:p] == ids[0][:p] for x in ids)  # really shared, and not the whole prompt
    calls = []
    hook = scorer.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        together = scorer(_batch(prompts))
    finally:
        hook.remove()
    assert calls[0] == (1, p)  # the prefix, once, one row
    assert calls[1][1] == max(len(x) for x in ids) - p  # the prefill then covers only the suffixes
    for i, prompt in enumerate(prompts):
        alone = scorer(_batch([prompt]))  # one row: no sharing, the plain left-padded path
        assert alone["generated"][0] == together["generated"][i]
        for c in (*SCORE_COLUMNS, "embedding"):
            np.testing.assert_allclose(alone[c][0], together[c][i], atol=1e-4, err_msg=c)


def test_the_shared_prefix_is_reused_across_micro_batches_and_recomputed_when_it_changes():
    s = Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=3, max_prompt_tokens=64, batch_size=2)
    lead = "Answer in one short sentence, without any explanation at all: "
    prompts = [lead + p for p in PROMPTS[:4]] + ["Something else entirely, and longer " + p for p in PROMPTS[:2]]
    prefixes = []  # every micro-batch has 2 rows: a 1-row forward is a prefix being computed

    def spy(module, args, kwargs):
        if kwargs["input_ids"].shape[0] == 1:
            prefixes.append(tuple(kwargs["input_ids"][0].tolist()))

    hook = s.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = s(_batch(prompts))
    finally:
        hook.remove()
    # 3 micro-batches (length-sorted, so the two kinds mix): each distinct prefix is computed once
    assert len(prefixes) == len(set(prefixes)) >= 2, prefixes
    ref = Scorer("builtin:tiny-llama", dtype="float32", max_new_tokens=3, max_prompt_tokens=64, batch_size=2)
    ref._shared_prefix = None  # the plain path for every micro-batch
    plain = ref(_batch(prompts))
    assert list(out["generated"]) == list(plain["generated"])
    for c in (*SCORE_COLUMNS, "embedding"):
        np.testing.assert_allclose(out[c], plain[c], atol=1e-4, err_msg=c)


def test_bf16_head_recomputes_its_top_logits_in_fp32():
    # the bf16 LM head's k largest logits per position are the fp32 products of the same weights
    from edsft.scoring.scorer import _EXACT_TOP_K, _exact_top_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=False).to(torch.bfloat16)
    hidden = torch.randn(3, 2, 64).to(torch.bfloat16)
    exact = hidden.float() @ head.weight.float().T
    out = _exact_top_logits(head, (hidden,), head(hidden))
    assert out.dtype == torch.float32
    # the bf16 candidates can differ from the exact top k at the k-th place (a near tie there), not
    # at the top: the leading half is exact, and so are argmax and the top-1 minus top-2 margin
    top = exact.topk(_EXACT_TOP_K // 2, dim=-1)
    torch.testing.assert_close(out.gather(-1, top.indices), top.values, rtol=0, atol=1e-5)
    assert torch.equal(out.argmax(-1), exact.argmax(-1))
    rest = torch.ones_like(out, dtype=torch.bool).scatter_(-1, top.indices, False)
    assert (out - exact)[rest].abs().max() > 0  # the others keep their bf16 rounding (the head is bf16)


def test_prepacked_bf16_linears_give_bit_identical_logits():
    # oneDNN-prepacked weights change the layout, not the product: same logits, same greedy tokens
    from edsft.models import load_model, prepack_linears

    model = load_model("builtin:tiny-llama", dtype="bfloat16", device="cpu")
    ids = torch.randint(3, 200, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        swapped = prepack_linears(model, rows_hint=3)
        if not swapped:
            pytest.skip("this torch build has no oneDNN bf16 linear: prepack_linears leaves the model as it is")
        after = model(input_ids=ids).logits
    assert swapped == sum(1 for m in model.modules() if type(m).__name__ == "_PackedLinear") >= 7 * 2  # 7 per layer
    assert torch.equal(before, after)
    assert prepack_linears(load_model("builtin:tiny-llama", dtype="float32", device="cpu")) == 0  # bf16 only


def test_prepacked_base_layers_under_a_lora_adapter_give_bit_identical_logits():
    # evaluation and re-scoring run base + adapter: only the frozen base layers are packed, the adapter
    # stays a plain Linear (peft reads its .weight), and with the adapter on or off the logits are unchanged
    from peft import LoraConfig, get_peft_model

    from edsft.models import load_model, prepack_linears

    model = get_peft_model(
        load_model("builtin:tiny-llama", dtype="bfloat16", device="cpu"),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        autocast_adapter_dtype=False,  # bf16 adapters: the dtype alone would not keep them out
    ).eval()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapter an effect to keep
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.1
    ids = torch.randint(3, 200, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert not torch.equal(tuned, base)
        swapped = prepack_linears(model, rows_hint=3)
        if not swapped:
            pytest.skip("this torch build has no oneDNN bf16 linear: prepack_linears leaves the model as it is")
        assert torch.equal(model(input_ids=ids).logits, tuned)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base)
    lora = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert lora and all(type(m) is torch.nn.Linear for m in lora)
    assert swapped == sum(1 for n, m in model.named_modules() if n.endswith("base_layer") and type(m).__name__ == "_PackedLinear")
