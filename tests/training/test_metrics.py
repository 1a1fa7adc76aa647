"""Metric functions against hand-made predictions (values worked out by hand in the comments)."""

from __future__ import annotations

import math
import random

import pytest
from rouge_score import rouge_scorer  # dev dependency: the reference our ROUGE-L must equal

from edsft.training.evaluation import build_metrics
from edsft.training.metrics import exact_match, lcs_length, macro_average, normalize, rouge_l, rouge_tokens, summarize


def test_normalize_lowercases_collapses_whitespace_strips_trailing_punctuation():
    assert normalize("  The  Answer\n is PARIS.  ") == "the answer is paris"
    assert normalize("yes!!!") == "yes"
    assert normalize("3.14") == "3.14"  # only trailing punctuation goes
    assert normalize("") == ""


@pytest.mark.parametrize(
    "pred, ref, expected",
    [("Paris.", "paris", 1.0), ("paris", "Paris is", 0.0), ("  42 ", "42", 1.0), ("4 2", "42", 0.0), ("", "", 1.0)],
)
def test_exact_match(pred, ref, expected):
    assert exact_match(pred, ref) == expected


def test_lcs_length():
    assert lcs_length("a b c d".split(), "a c d".split()) == 3
    assert lcs_length("x y".split(), "a b".split()) == 0
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_by_hand():
    # pred: "the cat sat on the mat" (6), ref: "the cat is on the mat" (6): LCS = the cat on the mat = 5
    # P = R = 5/6 -> F1 = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred "a b" (2), ref "a b c d" (4): LCS 2, P = 1, R = 0.5 -> F1 = 2/3
    assert rouge_l("a b", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("x", "a b") == 0.0
    assert rouge_l("", "a") == 0.0
    assert rouge_l("", "") == 0.0  # rouge-score: no tokens on a side scores 0 (was 1.0 before #16)
    assert rouge_l("Same text", "same   text!") == 1.0
    # punctuation separates tokens: pred "paris france" (2), ref "paris" (1): LCS 1, P = 1/2, R = 1 -> 2/3
    assert rouge_l("Paris, France.", "Paris") == pytest.approx(2 / 3)
    assert rouge_tokens("Paris, France.") == ["paris", "france"]
    assert rouge_tokens("3.14 is pi's value") == ["3", "14", "is", "pi", "s", "value"]


# rouge-score's own rougeL cases (rouge_scorer_test.py): (target, prediction, F)
@pytest.mark.parametrize(
    "target, prediction, f",
    [
        ("testing one two", "testing one", 4 / 5),  # testRougeLConsecutive
        ("testing one two", "testing two", 4 / 5),  # testRougeLNonConsecutive
        ("testing one two", "", 0.0),  # testRougeEmpty
    ],
)
def test_rouge_l_on_rouge_scores_own_cases(target, prediction, f):
    assert rouge_l(prediction, target) == pytest.approx(f)


def _varied_pairs() -> list[tuple[str, str]]:
    """Hand-picked edge cases plus seeded random sentences: punctuation, case, digits, unicode, repeats."""
    pairs = [
        ("Paris, France.", "Paris"),
        ("paris", "Paris, France."),
        ("", ""),
        ("", "x"),
        ("!!!", "..."),
        ("The answer is 42.", "42"),
        ("4 2", "42"),
        ("3.14", "3,14"),
        ("e-mail", "email"),
        ("e-mail", "e mail"),
        ("don't stop", "do not stop"),
        ("ÉCOLE école", "ecole"),
        ("naïve café", "naive cafe"),
        ("東京", "東京"),
        ("Straße", "strasse"),
        ("İstanbul", "istanbul"),
        ("K", "k"),
        ("snake_case_name", "snake case name"),
        ("a a a a", "a"),
        ("a b a b a b", "b a b a"),
        ("x\ty\nz", "x y z"),
        ("  lead and trail  ", "lead trail"),
        ("<b>bold</b> text", "bold text"),
        ("$1,000.00", "1000"),
        ("C++ and C#", "c and c"),
        ("The cat sat.", "the cat sat"),
        ("2024-01-31", "2024 01 31"),
        ("[1, 2, 3]", "1 2 3"),
        ("ok 👍", "ok"),
        ("１２３", "123"),
    ]
    rng = random.Random(16)
    vocab = [
        "the",
        "The",
        "cat",
        "CAT",
        "sat",
        "on",
        "mat",
        "Paris",
        "france",
        "42",
        "3.5",
        "a",
        "an",
        "is",
        "don't",
        "well-known",
        "über",
        "naïve",
        "x_y",
        "(note)",
        "end.",
        "yes!",
        "No?",
        "1,000",
        "—",
        "…",
    ]
    while len(pairs) < 80:
        a = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        b = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        pairs.append((a, b))
    return pairs


def test_rouge_l_equals_rouge_score_on_varied_pairs():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # what edsft documents
    pairs = _varied_pairs()
    assert len(pairs) >= 50
    for pred, ref in pairs:
        want = scorer.score(ref, pred)["rougeL"].fmeasure  # score(target, prediction)
        assert rouge_l(pred, ref) == want, (pred, ref)  # bit-for-bit: same tokens, same expression
    # the pairs are varied: they span the whole range of scores, not only 0 and 1
    values = {round(rouge_l(p, r), 3) for p, r in pairs}
    assert len(values) > 15 and 0.0 in values and 1.0 in values


def test_summarize_token_weighted_loss_and_macro_average():
    rows = [
        {"task": "a", "loss_sum": 2.0, "n_tokens": 1, "exact_match": 1.0, "rouge_l": 1.0},
        {"task": "a", "loss_sum": 6.0, "n_tokens": 3, "exact_match": 0.0, "rouge_l": 0.5},
        {"task": "b", "loss_sum": 1.0, "n_tokens": 4, "exact_match": 0.0, "rouge_l": 0.0},
    ]
    s = summarize(rows)
    # overall loss = (2 + 6 + 1) / (1 + 3 + 4) = 9/8, token-weighted
    assert s["overall"]["loss"] == pytest.approx(9 / 8)
    assert s["overall"]["perplexity"] == pytest.approx(math.exp(9 / 8))
    assert s["overall"]["exact_match"] == pytest.approx(1 / 3)
    # per task: a -> loss 8/4 = 2, em 0.5, rouge 0.75; b -> loss 0.25, em 0, rouge 0
    assert s["per_task"]["a"]["loss"] == pytest.approx(2.0) and s["per_task"]["b"]["loss"] == pytest.approx(0.25)
    assert s["per_task"]["a"]["rouge_l"] == pytest.approx(0.75)
    # macro = unweighted mean over tasks
    assert s["macro"]["exact_match"] == pytest.approx(0.25)
    assert s["macro"]["rouge_l"] == pytest.approx(0.375)
    assert s["macro"]["loss"] == pytest.approx((2.0 + 0.25) / 2)
    assert macro_average(s["per_task"], "missing") is None


def test_build_metrics_layout_and_delta():
    results = [
        {
            "row_id": "1",
            "task": "t",
            "variant": "base",
            "loss_sum": 4.0,
            "n_tokens": 2,
            "prediction": "no",
            "exact_match": 0.0,
            "rouge_l": 0.0,
        },
        {
            "row_id": "1",
            "task": "t",
            "variant": "finetuned",
            "loss_sum": 1.0,
            "n_tokens": 2,
            "prediction": "yes",
            "exact_match": 1.0,
            "rouge_l": 1.0,
        },
    ]
    m = build_metrics(results)
    assert m["n"] == 1 and m["variants"] == ["base", "finetuned"]
    assert m["base"]["loss"] == pytest.approx(2.0) and m["finetuned"]["loss"] == pytest.approx(0.5)
    assert m["delta"]["loss"] == pytest.approx(-1.5) and m["delta"]["exact_match"] == pytest.approx(1.0)
    assert m["per_task"]["t"]["finetuned"]["exact_match"] == 1.0 and m["per_task"]["t"]["n"] == 1
    assert m["base"]["macro"]["exact_match"] == 0.0
    only_base = build_metrics(results[:1])
    assert only_base["finetuned"] is None and only_base["delta"] is None
