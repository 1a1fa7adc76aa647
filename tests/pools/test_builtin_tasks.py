"""builtin:tasks: families, paraphrases, long tail, determinism, a disjoint balanced eval split,
and answers recomputed here independently of the generator."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict

import pytest

from edsft.pools.builtin_tasks import TASK_FAMILIES, TEMPLATES, generate_tasks, iter_tasks

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@pytest.fixture(scope="module")
def pool_100k():
    return generate_tasks(100_000, seed=0)


def _text(r):
    return r["instruction"] + "\n" + r["input"]


def _ints(s):
    return [int(x) for x in re.findall(r"-?\d+", s)]


def test_families_and_paraphrases(pool_100k):
    assert len(TASK_FAMILIES) >= 12
    assert abs(sum(TASK_FAMILIES.values()) - 1) < 1e-9
    seen = defaultdict(set)
    for r in pool_100k:
        assert set(r) == {"instruction", "input", "output", "task"}
        assert r["instruction"].strip() and r["output"].strip()
        assert len(r["output"]) <= 60, r  # short, exact answers
        # the instruction with the data blanked out identifies the paraphrase
        seen[r["task"]].add(re.sub(r"'[^']*'|\"[^\"]*\"|\d+|\{.*\}", "#", r["instruction"])[:30] + "|" + str(bool(r["input"])))
    assert set(seen) == set(TASK_FAMILIES)
    for fam, templates in TEMPLATES.items():
        assert len(templates) >= 4, fam
        assert len(seen[fam]) >= 4, (fam, seen[fam])


def test_long_tail(pool_100k):
    counts = Counter(r["task"] for r in pool_100k)
    top, bottom = counts.most_common()[0], counts.most_common()[-1]
    assert top[0] == "arithmetic" and bottom[1] > 0
    assert top[1] / bottom[1] > 10  # a few families dominate, like real pools
    share = {k: v / len(pool_100k) for k, v in counts.items()}
    for fam, w in TASK_FAMILIES.items():  # frequencies follow the declared weights
        assert abs(share[fam] - w) < 0.01, (fam, share[fam], w)


def test_deterministic_by_seed_and_chunking():
    a = generate_tasks(3000, seed=7)
    b = [r for chunk in iter_tasks(3000, seed=7, chunk_size=333) for r in chunk]
    assert a == b
    chunks = list(iter_tasks(3000, seed=7, chunk_size=1000))
    assert [len(c) for c in chunks] == [1000, 1000, 1000]
    assert generate_tasks(1000, seed=7) == a[:1000]  # smaller pools are prefixes
    c = generate_tasks(3000, seed=8)
    assert sum(x == y for x, y in zip(a, c)) < 30


def test_eval_split_balanced_and_disjoint(pool_100k):
    ev = generate_tasks(40 * len(TASK_FAMILIES), seed=0, split="eval")
    counts = Counter(r["task"] for r in ev)
    assert set(counts.values()) == {40} and set(counts) == set(TASK_FAMILIES)
    train_prompts = {_text(r) for r in pool_100k}
    assert not [r for r in ev if _text(r) in train_prompts]
    # another seed of the eval split is still disjoint from this train pool
    ev2 = generate_tasks(400, seed=3, split="eval")
    assert not [r for r in ev2 if _text(r) in train_prompts]
    assert generate_tasks(280, seed=0, split="eval") == ev[:280]


def test_answers_verifiable(pool_100k):
    checked = Counter()
    for r in pool_100k[:20000]:
        t, text, out = r["task"], _text(r), r["output"]
        if t == "arithmetic":
            a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", text).groups()
            a, b = int(a), int(b)
            assert int(out) == {"+": a + b, "-": a - b, "*": a * b}[op]
        elif t == "parity":
            assert out == ("even" if _ints(text)[0] % 2 == 0 else "odd")
        elif t == "sort_list":
            assert _ints(out) == sorted(_ints(text))
        elif t == "max_min":
            nums = _ints(text)
            assert int(out) == (max(nums) if "largest" in text else min(nums))
        elif t == "uppercase":
            assert out == out.upper() and out.lower() in text
        elif t == "reverse_word":
            assert out[::-1] in text
        elif t == "day_of_week":
            day = next(d for d in DAYS if d in text)
            assert out == DAYS[(DAYS.index(day) + _ints(text)[0]) % 7]
        elif t == "add_days":
            date = re.search(r"\d{4}-\d{2}-\d{2}", text).group()
            n = _ints(text.replace(date, ""))[0]
            assert out == (dt.date.fromisoformat(date) + dt.timedelta(days=n)).isoformat()
        elif t == "unit_conversion":
            factor = {
                "kilometers": 1000,
                "meters": 100,
                "kilograms": 1000,
                "hours": 60,
                "minutes": 60,
                "days": 24,
                "weeks": 7,
                "liters": 1000,
                "feet": 12,
                "yards": 3,
            }
            v, src = re.search(r"(\d+) (\w+)", text).groups()
            assert int(out) == int(v) * factor[src]
        elif t == "next_in_sequence":
            seq = _ints(text)
            assert int(out) - seq[-1] == seq[1] - seq[0]
        elif t == "rounding":
            n, to = _ints(text)[0], 10 if "ten" in text else 100
            assert int(out) % to == 0 and abs(int(out) - n) <= to // 2
        else:
            continue
        checked[t] += 1
    assert len(checked) >= 10 and min(checked.values()) >= 50, checked


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        next(iter_tasks(10, split="test"))
    with pytest.raises(ValueError, match="n="):
        next(iter_tasks(-1))


def test_1k_size():
    rows = generate_tasks(1000, seed=0)
    assert len(rows) == 1000 and len({r["task"] for r in rows}) == len(TASK_FAMILIES)
