"""A fingerprint of a pool's input files: part of the ingest stage's hash, so that editing,
adding or removing a pool file re-runs ingest (and everything after it) instead of reusing a
``pool.parquet`` built from the old files.

Small local pools (up to ``CONTENT_HASH_LIMIT`` bytes in all) are hashed by content, so that a
copy that keeps the mtime (``cp -p``, an unpacked archive) or an edit within the same second is
still seen. Bigger local pools use each file's size and modification time: one listing, no reads.
``s3://`` pools use each object's size and ETag, from the same kind of listing (ListObjectsV2
returns them, 1,000 objects a request): LastModified has whole seconds, so two PUTs of the same
size in one second would look alike, while the ETag changes with the content. ``hf://`` pools use
each file's size and content identity from the hub's listing: the LFS sha256 for an LFS file, else
the git blob id. Hub files have no mtime, so without them a new commit with a same-size file would
look unchanged; a filesystem that gives neither falls back to size (and mtime, if any).

The listing is deliberately wider than what ingest reads (hidden files and unknown extensions
count too): a change there re-runs ingest for nothing, which is cheap; a change missed would
silently reuse a stale pool.
"""

from __future__ import annotations

import fnmatch
import glob as _glob
import hashlib
import json
import posixpath
from pathlib import Path

import pyarrow.fs as pafs

from .sources import pool_store, scheme_of

__all__ = ["fingerprint", "CONTENT_HASH_LIMIT"]

CONTENT_HASH_LIMIT = 64 << 20


def _files(path: str, endpoint_url: str | None, region: str | None) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    store = pool_store(path, endpoint_url, region)
    info = store.fs.get_file_info(store.path)
    if info.type == pafs.FileType.File:
        return store.fs, [info]
    if info.type == pafs.FileType.Directory:
        infos = store.fs.get_file_info(pafs.FileSelector(store.path, recursive=True))
        return store.fs, sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    if any(c in path for c in "*?["):
        if scheme_of(path):
            head = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            base = pool_store(head, endpoint_url, region)
            pattern = path[len(scheme_of(path)) :]
            infos = base.fs.get_file_info(pafs.FileSelector(base.path, recursive=True, allow_not_found=True))
            return base.fs, sorted(
                (i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern)), key=lambda i: i.path
            )
        paths = sorted(str(Path(p).absolute()) for p in _glob.glob(str(Path(path).expanduser()), recursive=True))
        return store.fs, [i for i in store.fs.get_file_info(paths) if i.type == pafs.FileType.File]
    return store.fs, []  # missing: ingest reports it; the fingerprint just says "nothing there"


def _s3_etags(paths: list[str], endpoint_url: str | None, region: str | None) -> dict[str, str]:
    """{bucket/key: ETag} of the objects ``paths`` (``bucket/key``, one bucket), from a listing of their
    common prefix (credentials from the environment, like every other S3 access of edsft)."""
    import boto3

    from ..storage import s3_settings

    bucket = paths[0].split("/", 1)[0]
    prefix = posixpath.commonprefix([p.split("/", 1)[1] for p in paths])
    endpoint_url, region = s3_settings(endpoint_url, region)
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[f"{bucket}/{o['Key']}"] = o["ETag"]
    return out


def _hf_ids(fs: pafs.FileSystem, infos: list[pafs.FileInfo]) -> dict[str, str]:
    """{path: content identity} of hub files: pyarrow's FileInfo keeps only size and mtime, so ask the
    fsspec filesystem under it, whose info() answers from the listing it just cached (no request)."""
    hffs = fs.handler.fs
    out = {}
    for i in infos:
        info = hffs.info(i.path)
        lfs = info.get("lfs") or {}  # the blob of an LFS file is its pointer; the sha256 is the content's
        ident = lfs.get("sha256") or info.get("blob_id")
        if ident:
            out[i.path] = ident
    return out


def _digest(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path, compression=None) as f:  # the bytes on disk, not a decompression of them
        while True:
            buf = f.read(1 << 20)
            if not buf:
                return h.hexdigest()
            h.update(buf)


def fingerprint(pool, endpoint_url: str | None = None, region: str | None = None) -> str | None:
    """A short hex digest of the files behind ``pool.path`` and ``pool.eval_path`` (a
    :class:`edsft.config.PoolConfig`); None for built-in pools, which are generated from the
    config alone."""
    paths = [p for p in (pool.path, getattr(pool, "eval_path", None)) if p and not str(p).startswith("builtin:")]
    if not paths:
        return None
    entries = []
    for path in paths:
        fs, infos = _files(str(path), endpoint_url, region)
        scheme = scheme_of(str(path))
        by_content = not scheme and sum(i.size or 0 for i in infos) <= CONTENT_HASH_LIMIT
        ids = {}  # a content identity per file, where the listing has one
        if scheme == "s3://" and infos:
            ids = _s3_etags([i.path for i in infos], endpoint_url, region)
        elif scheme == "hf://" and infos:
            ids = _hf_ids(fs, infos)
        for i in infos:
            if by_content:
                entries.append([i.path, i.size, _digest(fs, i.path)])
            else:
                entries.append([i.path, i.size, ids.get(i.path, i.mtime_ns)])
        if not infos:
            entries.append([path, None])
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
