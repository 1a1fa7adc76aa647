"""``builtin:tasks``: a generated multi-task instruction pool with short, exactly checkable answers.

No dataset can be downloaded where edsft is developed, so the package brings its own pool. It is
built to look like a real instruction pool where it matters for experimental design:

* 20 task families (arithmetic, unit conversion, sorting, counting, string edits, date arithmetic,
  table lookup, boolean logic, word problems, ...), each with >= 4 natural-language paraphrases,
  some with the data inline in the instruction and some with it in the separate ``input`` field;
* long-tailed family frequencies (Zipf weights 1/rank): a few families dominate, the tail is rare,
  so random sampling under-covers the tail and diversity-aware selection has something to win;
* answers are short and exact (a number, a word, a list like ``3, 5, 9``), so exact match is a
  meaningful metric; about half the families are format-following that a 135M model learns from
  a few hundred examples (parity, uppercase, lookup, capital letters, ...), the rest are harder.

Determinism: rows come in blocks of ``_BLOCK`` rows, each block with its own RNG seeded from
``(seed, split, block index)``. The rows therefore do not depend on ``chunk_size``, and the first
1k rows of a 100k pool are the 1k pool. Generation is pure Python (~1M rows in ~10 s).

Held-out split: every problem has a canonical key (family + data, *without* the paraphrase); a
problem belongs to the eval side iff ``crc32(key) % _EVAL_MOD == 0``. Train rows reject eval-side
problems and eval rows reject train-side ones, so the splits are disjoint for every pair of seeds
and sizes - not even a paraphrase of an eval question can appear in the train pool. The eval split
is balanced: row ``i`` comes from family ``i % len(TASK_FAMILIES)``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import random
import zlib
from collections.abc import Callable, Iterator

__all__ = ["TASK_FAMILIES", "TEMPLATES", "iter_tasks", "generate_tasks", "family_names"]

_BLOCK = 1024  # rows per independently seeded block
_EVAL_MOD = 16  # 1/16 of the problem space is reserved for the eval split

# ------------------------------------------------------------------------------------------------
# Word lists (small, fixed: the pool must be identical on every machine).
# ------------------------------------------------------------------------------------------------

WORDS = (
    "apple river stone cloud garden window planet silver orange market candle forest bridge yellow "
    "pencil rocket butter summer winter autumn spring castle dragon mirror button pocket letter "
    "number animal island jungle desert valley harbor meadow breeze shadow thunder lemon cherry "
    "banana grape melon peach tomato potato carrot pepper onion garlic basket bottle kettle teapot "
    "saucer spoon fork knife plate table chair sofa lamp carpet blanket pillow curtain ladder "
    "hammer wrench shovel bucket rope chain anchor sail boat train plane truck bicycle wagon "
    "engine wheel pilot doctor farmer baker singer dancer painter writer teacher student sister "
    "brother mother father friend neighbor kitten puppy rabbit turtle parrot tiger zebra camel "
    "monkey donkey falcon salmon lobster spider beetle violet purple golden copper marble velvet "
    "cotton paper rubber plastic crystal diamond pearl coral amber ginger cinnamon honey cookie "
    "muffin pizza noodle salad cereal yogurt cheese bread water coffee cocoa juice music guitar "
    "violin piano trumpet drum poem story novel comic movie theater museum library school office "
    "kitchen bedroom hallway balcony garage chimney fountain statue temple palace tower village "
    "city country ocean lake pond canal beach cliff hill mountain volcano glacier canyon cave"
).split()
NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nina Oscar Paul "
    "Quinn Rosa Sam Tina Umar Vera Walter Xena Yusuf Zoe Liam Mia Noah Ava"
).split()
ITEMS = (
    "apples pencils marbles stickers books coins cookies shells stamps balloons cards candies "
    "oranges toys flowers buttons ribbons cupcakes crayons eggs"
).split()
KEYS = (
    "alpha beta gamma delta omega red green blue black white north south east west apple pear "
    "plum fig kiwi lime mango cat dog fox owl bee ant cow pig hen x y z id code size age port "
    "level count width height"
).split()
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
UNITS = (  # (from, to, factor): integer factors so answers are exact integers
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("liters", "milliliters", 1000),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
)
VOWELS = frozenset("aeiouAEIOU")
_DATE0 = _dt.date(2000, 1, 1)
_NDATES = (_dt.date(2030, 12, 31) - _DATE0).days + 1

# ------------------------------------------------------------------------------------------------
# Paraphrases: per family a list of (instruction, input) format strings over the family's fields.
# ------------------------------------------------------------------------------------------------

TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "arithmetic": [
        ("What is {expr}?", ""),
        ("Calculate {expr}.", ""),
        ("Compute the result. Reply with the number only.", "{expr}"),
        ("Solve the arithmetic problem.", "{expr} = ?"),
        ("Evaluate the expression {expr}.", ""),
    ],
    "parity": [
        ("Is {n} even or odd?", ""),
        ("Tell me whether {n} is even or odd. Answer with one word.", ""),
        ("Classify the number as even or odd.", "{n}"),
        ("Is the number {n} odd or even?", ""),
        ("Even or odd?", "{n}"),
    ],
    "uppercase": [
        ("Convert the text to uppercase.", "{s}"),
        ("Rewrite '{s}' in capital letters.", ""),
        ("Write this in all caps: {s}", ""),
        ("Change every letter of the following text to uppercase.", "{s}"),
    ],
    "key_lookup": [
        ("Look up the value for '{key}' in the table below.", "{lines}"),
        ("Given {inline}, what is the value of {key}?", ""),
        ("What number is stored under {key}?", "{lines}"),
        ("Here is a small dictionary: {{{json}}}. Return the value of key '{key}'.", ""),
    ],
    "max_min": [
        ("Which number is the {which}: {nums}?", ""),
        ("Find the {which} number in the list.", "{nums}"),
        ("Return the {which} value among {nums}.", ""),
        ("From the numbers {nums}, pick the {which} one.", ""),
    ],
    "word_problem": [
        ("{story} How many {item} does {name} have now?", ""),
        ("Solve the word problem and answer with a number.", "{story} How many {item} does {name} have?"),
        ("Read the story and count the {item}: {story}", ""),
        ("{story} What is the number of {item} {name} has in the end?", ""),
    ],
    "count_items": [
        ("How many items are in this list: {items}?", ""),
        ("Count the words in the list.", "{items}"),
        ("Count how many entries the following list contains: {items}", ""),
        ("How many elements does this list have?", "{items}"),
    ],
    "capital_letters": [
        ("Extract the capital letters from '{s}'.", ""),
        ("List only the uppercase letters in the text, with no spaces.", "{s}"),
        ('Which capital letters appear in "{s}"? Write them together.', ""),
        ("Write down the capital letters of the following text in order.", "{s}"),
    ],
    "last_word": [
        ("What is the last word of '{s}'?", ""),
        ("Return the final word of the text.", "{s}"),
        ('Which word comes last in "{s}"?', ""),
        ("Give me the last word in the following phrase.", "{s}"),
    ],
    "sort_list": [
        ("Sort these numbers in ascending order: {nums}", ""),
        ("Arrange the numbers from smallest to largest.", "{nums}"),
        ("Put the following list in increasing order: {nums}", ""),
        ("Order these values ascending. Separate them with commas.", "{nums}"),
    ],
    "unit_conversion": [
        ("Convert {v} {src} to {dst}.", ""),
        ("How many {dst} are in {v} {src}?", ""),
        ("Express {v} {src} in {dst}. Give just the number.", ""),
        ("Unit conversion: answer with a number of {dst}.", "{v} {src}"),
    ],
    "rounding": [
        ("Round {n} to the nearest {to}.", ""),
        ("What is {n} rounded to the nearest {to}?", ""),
        ("Round the number to the nearest {to}.", "{n}"),
        ("Give {n} rounded to the closest {to}.", ""),
    ],
    "next_in_sequence": [
        ("What comes next in the sequence {seq}, ...?", ""),
        ("Continue the pattern with the next number.", "{seq}"),
        ("Find the next term: {seq}, ?", ""),
        ("Which number follows in this sequence?", "{seq}"),
    ],
    "reverse_word": [
        ("Reverse the text '{s}'.", ""),
        ("Write '{s}' backwards.", ""),
        ("Spell the following text in reverse order.", "{s}"),
        ("Reverse the order of the characters.", "{s}"),
    ],
    "sort_words": [
        ("Sort these words alphabetically: {words}", ""),
        ("Put the words in alphabetical order.", "{words}"),
        ("Arrange the following words from A to Z: {words}", ""),
        ("Order the words alphabetically, separated by commas.", "{words}"),
    ],
    "remove_vowels": [
        ("Remove all vowels from '{s}'.", ""),
        ("Delete the vowels (a, e, i, o, u) from the text.", "{s}"),
        ("Write '{s}' without any vowels.", ""),
        ("Strip the vowels out of the following text.", "{s}"),
    ],
    "count_letter": [
        ("How many times does the letter '{c}' appear in '{s}'?", ""),
        ("Count the occurrences of '{c}' in the text.", "{s}"),
        ('In "{s}", how often does the letter {c} occur?', ""),
        ("Count how many '{c}' characters the following text contains.", "{s}"),
    ],
    "day_of_week": [
        ("If today is {day}, what day of the week will it be in {n} days?", ""),
        ("Today is {day}. Which weekday is it {n} days from now?", ""),
        ("Starting on a {day}, what day is it after {n} days?", ""),
        ("Answer with the name of a weekday.", "{n} days after a {day}"),
    ],
    "boolean_logic": [
        ("Let {assign}. Is {expr} True or False?", ""),
        ("Evaluate the boolean expression {expr} where {assign}.", ""),
        ("Given {assign}, what is the value of: {expr}", ""),
        ("Compute the truth value (True or False).", "{assign}; {expr}"),
    ],
    "add_days": [
        ("What date is {n} days after {date}? Answer as YYYY-MM-DD.", ""),
        ("Add {n} days to {date}. Give the date in YYYY-MM-DD format.", ""),
        ("Which date comes {n} days after the given date (YYYY-MM-DD)?", "{date}"),
        ("Starting from {date}, count forward {n} days. What is the date (YYYY-MM-DD)?", ""),
    ],
}

# ------------------------------------------------------------------------------------------------
# Problem generators: rng -> (fields for the templates, answer, canonical key without paraphrase).
# ------------------------------------------------------------------------------------------------


def _phrase(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _nums(rng: random.Random, k: int, hi: int) -> list[int]:
    return [rng.randint(0, hi) for _ in range(k)]


def _arithmetic(rng):
    r = rng.random()
    if r < 0.45:
        a, b, op, ans = rng.randint(1, 999), rng.randint(1, 999), "+", None
        ans = a + b
    elif r < 0.8:
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        a, b = max(a, b), min(a, b)  # non-negative results
        op, ans = "-", a - b
    else:
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        op, ans = "*", a * b
    expr = f"{a} {op} {b}"
    return {"expr": expr}, str(ans), expr


def _parity(rng):
    n = rng.randint(0, 9_999_999)
    return {"n": n}, ("even" if n % 2 == 0 else "odd"), str(n)


def _uppercase(rng):
    s = _phrase(rng, 2, 4)
    return {"s": s}, s.upper(), s


def _key_lookup(rng):
    keys = rng.sample(KEYS, rng.randint(3, 5))
    vals = [rng.randint(1, 99) for _ in keys]
    key = rng.choice(keys)
    pairs = list(zip(keys, vals))
    fields = {
        "key": key,
        "lines": "\n".join(f"{k}: {v}" for k, v in pairs),
        "inline": ", ".join(f"{k}={v}" for k, v in pairs),
        "json": ", ".join(f'"{k}": {v}' for k, v in pairs),
    }
    return fields, str(dict(pairs)[key]), f"{fields['inline']}?{key}"


def _max_min(rng):
    nums = _nums(rng, rng.randint(3, 6), 999)
    which = "largest" if rng.random() < 0.5 else "smallest"
    ans = max(nums) if which == "largest" else min(nums)
    s = ", ".join(map(str, nums))
    return {"nums": s, "which": which}, str(ans), f"{which}:{s}"


def _word_problem(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(1, 40)
    r = rng.random()
    if r < 0.4:
        story, ans = f"{name} has {a} {item} and gets {b} more.", a + b
    elif r < 0.8:
        a, b = max(a, b), min(a, b)
        story, ans = f"{name} has {a} {item} and gives {b} away.", a - b
    else:
        b = rng.randint(2, 6)
        story, ans = f"{name} has {b} boxes with {a} {item} in each box.", a * b
    return {"story": story, "name": name, "item": item}, str(ans), story


def _count_items(rng):
    k = rng.randint(2, 9)
    items = ", ".join(rng.choice(WORDS) for _ in range(k))
    return {"items": items}, str(k), items


def _capital_letters(rng):
    words = [w.capitalize() if rng.random() < 0.5 else w for w in _phrase(rng, 3, 6).split()]
    if not any(w[0].isupper() for w in words):
        words[0] = words[0].capitalize()
    s = " ".join(words)
    return {"s": s}, "".join(c for c in s if c.isupper()), s


def _last_word(rng):
    s = _phrase(rng, 3, 7)
    return {"s": s}, s.rsplit(" ", 1)[-1], s


def _sort_list(rng):
    nums = _nums(rng, rng.randint(3, 7), 99)
    s = ", ".join(map(str, nums))
    return {"nums": s}, ", ".join(map(str, sorted(nums))), s


def _unit_conversion(rng):
    src, dst, f = rng.choice(UNITS)
    v = rng.randint(1, 9999)
    return {"v": v, "src": src, "dst": dst}, str(v * f), f"{v} {src}>{dst}"


def _rounding(rng):
    n = rng.randint(10, 99_999)
    to = 10 if rng.random() < 0.5 else 100
    ans = (n + to // 2) // to * to  # half up: 45 -> 50 (not Python's banker's rounding)
    return {"n": n, "to": "ten" if to == 10 else "hundred"}, str(ans), f"{n}~{to}"


def _next_in_sequence(rng):
    start, step, k = rng.randint(0, 5000), rng.randint(1, 12), rng.randint(4, 6)
    seq = [start + i * step for i in range(k)]
    s = ", ".join(map(str, seq))
    return {"seq": s}, str(start + k * step), s


def _reverse_word(rng):
    s = _phrase(rng, 2, 2)
    return {"s": s}, s[::-1], s


def _sort_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 5))
    s = ", ".join(words)
    return {"words": s}, ", ".join(sorted(words)), s


def _remove_vowels(rng):
    s = _phrase(rng, 2, 3)
    return {"s": s}, "".join(c for c in s if c not in VOWELS), s


def _count_letter(rng):
    s = _phrase(rng, 1, 3)
    c = rng.choice(s.replace(" ", "")) if rng.random() < 0.8 else chr(97 + rng.randrange(26))
    return {"s": s, "c": c}, str(s.count(c)), f"{c}@{s}"


def _day_of_week(rng):
    d, n = rng.randrange(7), rng.randint(1, 20_000)
    return {"day": DAYS[d], "n": n}, DAYS[(d + n) % 7], f"{d}+{n}"


_VARS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def _boolean_logic(rng):
    k = rng.randint(2, 3)
    names = rng.sample(_VARS, k)
    vals = [rng.random() < 0.5 for _ in names]
    terms = [("not " + v) if rng.random() < 0.3 else v for v in names]
    ops = [rng.choice(("and", "or")) for _ in range(k - 1)]
    expr = terms[0]
    for op, t in zip(ops, terms[1:]):
        expr = f"({expr} {op} {t})" if rng.random() < 0.5 and " " in expr else f"{expr} {op} {t}"
    assign = ", ".join(f"{n} = {v}" for n, v in zip(names, vals))
    ans = eval(expr, {"__builtins__": {}}, dict(zip(names, vals)))  # our own expression: only names/and/or/not
    return {"expr": expr, "assign": assign}, str(bool(ans)), f"{assign}|{expr}"


def _add_days(rng):
    d = _DATE0 + _dt.timedelta(days=rng.randrange(_NDATES))
    n = rng.randint(1, 400)
    return {"date": d.isoformat(), "n": n}, (d + _dt.timedelta(days=n)).isoformat(), f"{d}+{n}"


# (name, generator) in rank order: Zipf weight 1/rank, so arithmetic is ~28% of the pool and
# add_days ~1.4%. The head mixes easy and hard families; the tail holds the date/logic tasks.
_GENERATORS: list[tuple[str, Callable]] = [
    ("arithmetic", _arithmetic),
    ("parity", _parity),
    ("uppercase", _uppercase),
    ("key_lookup", _key_lookup),
    ("max_min", _max_min),
    ("word_problem", _word_problem),
    ("count_items", _count_items),
    ("capital_letters", _capital_letters),
    ("last_word", _last_word),
    ("sort_list", _sort_list),
    ("unit_conversion", _unit_conversion),
    ("rounding", _rounding),
    ("next_in_sequence", _next_in_sequence),
    ("reverse_word", _reverse_word),
    ("sort_words", _sort_words),
    ("remove_vowels", _remove_vowels),
    ("count_letter", _count_letter),
    ("day_of_week", _day_of_week),
    ("boolean_logic", _boolean_logic),
    ("add_days", _add_days),
]

_ZIPF_S = 1.0
_raw = [1.0 / (rank + 1) ** _ZIPF_S for rank in range(len(_GENERATORS))]
#: family name -> sampling weight (sums to 1), in rank order.
TASK_FAMILIES: dict[str, float] = {name: w / sum(_raw) for (name, _), w in zip(_GENERATORS, _raw)}
_CUM = list(itertools.accumulate(TASK_FAMILIES.values()))
assert set(TEMPLATES) == set(TASK_FAMILIES)  # module invariant, not user input


def family_names() -> list[str]:
    return list(TASK_FAMILIES)


def _is_eval_key(family: str, key: str) -> bool:
    return zlib.crc32(f"{family}|{key}".encode()) % _EVAL_MOD == 0


def _rng(seed: int, split: str, block: int) -> random.Random:
    h = hashlib.blake2b(f"edsft-tasks:{seed}:{split}:{block}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def _make_row(rng: random.Random, fam_idx: int, want_eval: bool) -> dict:
    name, gen = _GENERATORS[fam_idx]
    while True:  # rejection keeps the problem spaces of the two splits disjoint
        fields, answer, key = gen(rng)
        if _is_eval_key(name, key) == want_eval:
            break
    instruction, inp = rng.choice(TEMPLATES[name])
    return {"instruction": instruction.format(**fields), "input": inp.format(**fields), "output": answer, "task": name}


def _block_rows(seed: int, split: str, block: int, n: int) -> list[dict]:
    rng = _rng(seed, split, block)
    if split == "eval":  # balanced: family by position, independent of the RNG
        start = block * _BLOCK
        fams = [(start + i) % len(_GENERATORS) for i in range(n)]
    else:
        # Always draw a whole block of families, so a shorter last block is a prefix of the full one.
        fams = rng.choices(range(len(_GENERATORS)), cum_weights=_CUM, k=_BLOCK)[:n]
    want_eval = split == "eval"
    return [_make_row(rng, f, want_eval) for f in fams]


def iter_tasks(n: int, seed: int = 0, split: str = "train", chunk_size: int = 10_000) -> Iterator[list[dict]]:
    """Yield ``n`` rows ``{"instruction", "input", "output", "task"}`` in chunks of ``chunk_size``.

    ``split="train"`` draws families by their long-tailed weights; ``split="eval"`` is balanced
    (row ``i`` is family ``i % 20``, so equal counts when 20 divides ``n``) and never shares a
    problem with any train pool. Rows depend only on ``(n, seed, split)``, and a smaller ``n``
    gives a prefix of a larger one. Memory stays at one chunk.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be an integer >= 0 (rows of builtin:tasks)")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")
    buf: list[dict] = []
    for block in range((n + _BLOCK - 1) // _BLOCK):
        buf.extend(_block_rows(seed, split, block, min(_BLOCK, n - block * _BLOCK)))
        while len(buf) >= chunk_size:
            yield buf[:chunk_size]
            buf = buf[chunk_size:]
    if buf:
        yield buf


def generate_tasks(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """All rows at once (small ``n`` only: tests, notebooks)."""
    return [row for chunk in iter_tasks(n, seed, split) for row in chunk]
