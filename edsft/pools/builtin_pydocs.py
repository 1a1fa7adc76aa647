"""``builtin:pydocs``: real human-written instruction/response pairs from Python's own documentation.

Two sources ship with every CPython, so the pool needs no download:

* ``pydoc_data.topics.topics`` - the language reference sections (``with``, ``assignment``, ...):
  "Explain the `with` statement in Python." -> the topic text, trimmed at a paragraph boundary;
* public docstrings of a fixed list of pure-Python stdlib modules: "What does `json.dumps` do?"
  -> the first paragraph of its docstring (functions, classes and public methods of classes).

Rows are ``{"instruction", "input", "output", "task"}`` with the module (or ``language`` for
reference topics) as ``task``; the paraphrase is picked by a hash of the object name, so the pool
is identical on every run (it may differ between Python versions: docstrings change). The held-out
split is by hash of the question too: ``crc32(name) % 10 == 0`` goes to eval.
"""

from __future__ import annotations

import importlib
import inspect
import re
import zlib

__all__ = ["MODULES", "pydocs_rows", "iter_pydocs"]

# Pure-Python, side-effect-free stdlib modules with good docstrings (no GUI, no network at import).
MODULES = (
    "abc argparse base64 bisect calendar collections colorsys configparser contextlib copy csv "
    "dataclasses datetime decimal difflib enum fnmatch fractions functools getopt glob gzip hashlib "
    "heapq hmac html ipaddress itertools json keyword locale logging math mimetypes operator os "
    "os.path pathlib pickle pprint queue random re secrets shlex shutil statistics string struct "
    "tarfile tempfile textwrap threading time timeit tokenize traceback types typing unicodedata "
    "urllib.parse uuid warnings weakref zipfile zlib builtins asyncio concurrent.futures email.message "
    "email.utils http.client http.cookies http.server urllib.request xml.etree.ElementTree "
    "xml.dom.minidom sqlite3 subprocess socket selectors signal unittest unittest.mock doctest inspect "
    "ast dis codecs io importlib pkgutil gettext optparse plistlib binascii graphlib numbers reprlib "
    "sysconfig platform filecmp linecache stat sched cmd code smtplib ftplib imaplib poplib "
    "mailbox multiprocessing array bz2 lzma zipimport wave"
).split()

_FUNC_TEMPLATES = (
    "What does `{name}` do?",
    "Explain the purpose of `{name}` in Python.",
    "Describe what the Python function `{name}` is for.",
    "In Python's standard library, what is `{name}` used for?",
    "Briefly summarize the documentation of `{name}`.",
)
_CLASS_TEMPLATES = (
    "What is `{name}` in Python?",
    "Explain what the class `{name}` represents.",
    "Describe the Python class `{name}`.",
    "What is the `{name}` class of the standard library for?",
)
_MODULE_TEMPLATES = (
    "What is the Python module `{name}` for?",
    "Describe the standard library module `{name}`.",
    "Summarize what `{name}` provides.",
    "What can I do with Python's `{name}` module?",
)
_TOPIC_TEMPLATES = (
    "Explain the Python topic `{name}`.",
    "What does the Python language reference say about `{name}`?",
    "Describe how `{name}` works in Python.",
    "Give an overview of `{name}` in the Python language.",
)

_MAX_RESPONSE = 900  # characters: responses are short documentation answers, not whole pages
_MIN_RESPONSE = 20


def _pick(templates: tuple[str, ...], name: str) -> str:
    return templates[zlib.crc32(name.encode()) % len(templates)]


def _first_paragraph(doc: str) -> str:
    doc = inspect.cleandoc(doc)
    paras = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    # Skip signature-only first lines of C functions ("dumps(obj, ...)") when a sentence follows.
    if len(paras) > 1 and "(" in paras[0] and "." not in paras[0].split(")")[-1] and len(paras[0]) < 80:
        paras = paras[1:]
    return " ".join(paras[0].split()) if paras else ""


def _trim(text: str, limit: int = _MAX_RESPONSE) -> str:
    """Whole paragraphs up to ``limit`` characters (at least the first paragraph, cut at a sentence)."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    out = ""
    for p in paras:
        if out and len(out) + len(p) + 2 > limit:
            break
        out = f"{out}\n\n{p}" if out else p
    if len(out) > limit:  # a single long paragraph: cut at the last sentence end that fits
        cut = out[:limit]
        end = cut.rfind(". ")
        out = cut[: end + 1] if end > limit // 3 else cut.rstrip() + "..."
    return out


def _topic_rows() -> list[dict]:
    from pydoc_data.topics import topics

    rows = []
    for name in sorted(topics):
        text = topics[name]
        # Topic texts start with a title line and a rule of "*" characters; drop them.
        lines = text.strip().splitlines()
        if len(lines) > 2 and set(lines[1].strip()) <= set("*=-"):
            text = "\n".join(lines[2:])
        answer = _trim(text)
        if len(answer) >= _MIN_RESPONSE:
            rows.append(
                {
                    "instruction": _pick(_TOPIC_TEMPLATES, name).format(name=name),
                    "input": "",
                    "output": answer,
                    "task": "language",
                    "_name": name,
                }
            )
    return rows


def _public(obj) -> list[tuple[str, object]]:
    names = getattr(obj, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in dir(obj) if not n.startswith("_")]
    out = []
    for n in sorted(set(names)):
        try:
            out.append((n, getattr(obj, n)))
        except AttributeError:
            continue
    return out


def _module_rows(modname: str) -> list[dict]:
    try:
        mod = importlib.import_module(modname)
    except ImportError:  # a trimmed Python build: skip the module, the pool stays deterministic per install
        return []
    rows: list[dict] = []

    def add(name: str, obj, templates) -> None:
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str):
            return
        answer = _trim(_first_paragraph(doc))
        if len(answer) >= _MIN_RESPONSE:
            rows.append(
                {
                    "instruction": _pick(templates, name).format(name=name),
                    "input": "",
                    "output": answer,
                    "task": modname,
                    "_name": name,
                }
            )

    add(modname, mod, _MODULE_TEMPLATES)
    for n, obj in _public(mod):
        # Only objects defined by this module (not re-exports such as os.path's imported helpers).
        home = getattr(obj, "__module__", None)
        if not isinstance(home, str) or not (
            home == modname or home.startswith(modname + ".") or home.lstrip("_") in (modname, modname.split(".")[-1])
        ):
            continue
        qual = f"{modname}.{n}"
        if inspect.isclass(obj):
            add(qual, obj, _CLASS_TEMPLATES)
            for m, meth in _public(obj):
                if callable(meth) and m in vars(obj):  # methods defined on the class itself
                    add(f"{qual}.{m}", meth, _FUNC_TEMPLATES)
        elif callable(obj):
            add(qual, obj, _FUNC_TEMPLATES)
    return rows


def pydocs_rows(split: str = "train") -> list[dict]:
    """All rows of one split, in a fixed order. Duplicate questions keep their first occurrence."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    rows = _topic_rows()
    for m in MODULES:
        rows.extend(_module_rows(m))
    seen: set[str] = set()
    out = []
    for r in rows:
        name = r.pop("_name")
        if name in seen:
            continue
        seen.add(name)
        is_eval = zlib.crc32(("pydocs|" + name).encode()) % 10 == 0
        if is_eval == (split == "eval"):
            out.append(r)
    return out


def iter_pydocs(split: str = "train", chunk_size: int = 10_000):
    """The split in chunks (same interface as :func:`edsft.pools.builtin_tasks.iter_tasks`)."""
    rows = pydocs_rows(split)
    for i in range(0, len(rows), chunk_size):
        yield rows[i : i + chunk_size]
