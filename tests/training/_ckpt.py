"""Shared by the checkpoint tests: a folder must hold no pickle, checked by content as well as name."""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


def assert_no_pickle(folder: Path) -> None:
    """Pickle starts with PROTO (0x80); torch.save's zip archives start with PK and hold a data.pkl."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    assert files, f"{folder} is empty"
    for p in files:
        head = p.read_bytes()[:4]
        assert p.suffix not in PICKLE_SUFFIXES, p
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", p
