"""Artifact storage on a local folder or an ``s3://`` prefix, through pyarrow filesystems.

pyarrow ignores ``AWS_ENDPOINT_URL``, so the endpoint and region come from the config
(``storage.endpoint_url``, ``storage.region``) and are passed explicitly; credentials come
only from the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) and are never
written anywhere. No torch, no ray: every layer may use this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["Store", "is_remote", "join", "get_store", "set_default_storage", "s3_settings"]

_DEFAULT: dict[str, Any] = {"endpoint_url": None, "region": None}


def set_default_storage(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Process-wide S3 settings used when a call gives none (set once from the config)."""
    _DEFAULT["endpoint_url"] = endpoint_url
    _DEFAULT["region"] = region
    if endpoint_url:  # boto3 and Ray's own S3 access read these
        os.environ.setdefault("AWS_ENDPOINT_URL", endpoint_url)
    if region:
        os.environ.setdefault("AWS_DEFAULT_REGION", region)


def is_remote(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


@dataclass(frozen=True)
class Store:
    """A filesystem plus the path of a location on it."""

    fs: pafs.FileSystem
    path: str  # path inside fs (bucket/key for s3, absolute path locally)
    uri: str  # the user-facing form (s3://bucket/key or /abs/path)

    # ---- small files -------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once: a reader (or a crash) never sees half of it.

        An S3 PUT is atomic already; locally the bytes go to a temporary name in the same folder
        and are renamed over the target (rename is atomic within a filesystem)."""
        self._mkparent()
        with self._atomic_local() as path:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def write_json(self, obj: Any) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def write_jsonl(self, rows: Iterable[dict]) -> int:
        lines = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
        self.write_text("".join(line + "\n" for line in lines))
        return len(lines)

    def read_jsonl(self) -> list[dict]:
        if not self.exists():
            return []
        return [json.loads(line) for line in self.read_text().splitlines() if line.strip()]

    # ---- tables ------------------------------------------------------------------------
    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """Read a Parquet file or a folder of Parquet parts."""
        return pq.read_table(self.path, filesystem=self.fs, columns=columns)

    def write_table(self, table: pa.Table) -> None:
        self._mkparent()
        with self._atomic_local() as path:
            pq.write_table(table, path, filesystem=self.fs)

    @contextlib.contextmanager
    def _atomic_local(self) -> Iterator[str]:
        """The path to write to: a temporary sibling renamed over ``self.path`` on success
        (locally), or ``self.path`` itself on S3, where an object appears whole or not at all."""
        if is_remote(self.uri):
            yield self.path
            return
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            yield tmp
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def parquet_files(self) -> list[str]:
        """Paths (inside fs) of the Parquet parts of a dataset folder, sorted; a file gives itself."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            return [self.path]
        if info.type == pafs.FileType.NotFound:
            return []
        sel = pafs.FileSelector(self.path, recursive=True)
        return sorted(i.path for i in self.fs.get_file_info(sel) if i.path.endswith(".parquet") and i.type == pafs.FileType.File)

    # ---- folders -----------------------------------------------------------------------
    def child(self, *parts: str) -> Store:
        return Store(self.fs, posixpath.join(self.path, *parts), join(self.uri, *parts))

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def remove(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def move_to(self, dest: Store) -> None:
        """Move this file or folder to ``dest`` (replacing what is there), on the same filesystem.

        Locally a rename (atomic); on S3, which has no rename, a copy of every object then a
        delete of the source: callers that need the move to look atomic record a commit marker
        after it (the pipeline's manifest does)."""
        dest.remove()
        if not is_remote(self.uri):
            Path(dest.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, dest.path)
            return
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            self.fs.copy_file(self.path, dest.path)
        else:
            for i in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True)):
                if i.type == pafs.FileType.File:
                    self.fs.copy_file(i.path, posixpath.join(dest.path, posixpath.relpath(i.path, self.path)))
        self.remove()

    def inventory(self) -> dict | None:
        """What is here, to compare with what a commit recorded: every file's size and the row
        count of the Parquet files (from their footers); None when nothing is here."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return None
        if info.type == pafs.FileType.File:
            files = {"": info.size}
        else:
            sel = pafs.FileSelector(self.path, recursive=True)
            files = {
                posixpath.relpath(i.path, self.path): i.size for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File
            }
        rows = None
        for rel in sorted(files):
            if rel.endswith(".parquet") or (rel == "" and self.path.endswith(".parquet")):
                path = posixpath.join(self.path, rel) if rel else self.path
                rows = (rows or 0) + pq.read_metadata(path, filesystem=self.fs).num_rows
        return {"files": dict(sorted(files.items())), "rows": rows}

    def list(self) -> list[str]:
        """Names directly inside this folder."""
        if not self.is_dir():
            return []
        sel = pafs.FileSelector(self.path, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    def download_to(self, local_dir: str | os.PathLike) -> Path:
        """Copy this folder (or file) to local disk; skips files already there with the same size."""
        local_dir = Path(local_dir)
        if not is_remote(self.uri):
            return Path(self.path)
        local_dir.mkdir(parents=True, exist_ok=True)
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            target = local_dir / posixpath.basename(self.path)
            pafs.copy_files(self.path, str(target), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            return target
        sel = pafs.FileSelector(self.path, recursive=True)
        for i in self.fs.get_file_info(sel):
            if i.type != pafs.FileType.File:
                continue
            rel = posixpath.relpath(i.path, self.path)
            target = local_dir / rel
            if target.exists() and target.stat().st_size == i.size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(i.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        return local_dir

    def upload_from(self, local: str | os.PathLike) -> None:
        """Copy a local file or folder here (no-op when this store is the same local path)."""
        local = Path(local)
        if not is_remote(self.uri) and Path(self.path).resolve() == local.resolve():
            return
        if local.is_file():
            self._mkparent()
            pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
            return
        self.mkdir()
        for f in sorted(local.rglob("*")):
            if f.is_file():
                dest = posixpath.join(self.path, f.relative_to(local).as_posix())
                self.fs.create_dir(posixpath.dirname(dest), recursive=True)
                with open(f, "rb") as src, self.fs.open_output_stream(dest) as dst:
                    shutil.copyfileobj(src, dst, length=1 << 22)

    def _mkparent(self) -> None:
        parent = posixpath.dirname(self.path) if is_remote(self.uri) else str(Path(self.path).parent)
        if parent:
            self.fs.create_dir(parent, recursive=True)


def s3_settings(endpoint_url: str | None = None, region: str | None = None) -> tuple[str | None, str]:
    """The endpoint and region an S3 access uses: the given ones, else the process-wide defaults."""
    endpoint_url = endpoint_url or _DEFAULT["endpoint_url"]
    region = region or _DEFAULT["region"] or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint_url, region


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    endpoint_url, region = s3_settings(endpoint_url, region)
    kwargs: dict[str, Any] = {"region": region}
    if endpoint_url:
        scheme, _, host = endpoint_url.partition("://")
        kwargs["endpoint_override"] = host or endpoint_url
        kwargs["scheme"] = scheme if host else "https"
    # Credentials: the environment only (pyarrow reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY itself).
    return pafs.S3FileSystem(**kwargs)


def get_store(uri: str | os.PathLike, endpoint_url: str | None = None, region: str | None = None) -> Store:
    """A Store for a local path or an s3:// URI."""
    uri = str(uri)
    if is_remote(uri):
        return Store(s3_filesystem(endpoint_url, region), uri[len("s3://") :].rstrip("/"), uri.rstrip("/"))
    path = str(Path(uri).expanduser().absolute())
    return Store(pafs.LocalFileSystem(), path, path)
