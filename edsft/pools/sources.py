"""Pool sources: where a pool's records come from, one component per kind of ``pool.path``.

A :class:`PoolSource` lists its *inputs* (files, or one generated split), reads one input as
``(line, record)`` pairs, says how its records map to rows, whether its inputs may be read in
parallel (one Ray task each), and which eval split it brings. The ingest (in-process or on
Ray) drives any source the same way; nothing outside this module asks what kind a pool is.

* :class:`FileSource` - JSONL / JSON / Parquet / CSV / Arrow files: a file, a glob, a folder (a
  ``datasets`` ``save_to_disk`` folder reads its Arrow files), an s3:// prefix, or
  ``hf://datasets/<org>/<name>/...`` on the hub (through ``huggingface_hub``'s fsspec filesystem,
  :func:`hf_filesystem`); its eval split is ``pool.eval_fraction`` of its own rows.
* :class:`BuiltinTasks` (``builtin:tasks``) and :class:`BuiltinPydocs` (``builtin:pydocs``) -
  generated pools with fixed columns and their own eval split.

``pool.eval_path``, when set, replaces any source's own eval split (:func:`eval_split_of`).

Adding a source: write a class with the members of :class:`PoolSource` and
``register_source("myscheme://", lambda cfg: MySource(cfg))``; :func:`open_source` then returns it
for every ``pool.path`` starting with ``myscheme://``. Inputs cross to Ray tasks, so they must be
small picklable values (frozen dataclasses of strings), and a ``parallel`` source must be
registered by a module the Ray workers import too (else set ``parallel = False``). A new *file
format* is a reader instead (:func:`edsft.pools.readers.register_reader`).
"""

from __future__ import annotations

import fnmatch
import glob as _glob
import json
import logging
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow.fs as pafs

from ..config import Config, PoolConfig
from ..storage import Store, get_store, is_remote
from .readers import EXTENSIONS, READERS, format_of, read_store
from .records import FieldMapping, PoolError, RecordMapping, mapping_for

__all__ = [
    "Input",
    "Skipped",
    "Listing",
    "EvalSplit",
    "PoolSource",
    "FileSource",
    "BuiltinTasks",
    "BuiltinPydocs",
    "SOURCES",
    "register_source",
    "open_source",
    "eval_split_of",
    "list_files",
    "pool_store",
    "scheme_of",
    "hf_filesystem",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Input:
    """One input of a source, read whole by one worker: a file, or one generated split.

    ``origin`` is what every row and quarantine record of it carries as ``source``.
    """

    origin: str
    fmt: str = ""  # the reader of a file ("jsonl", "json", "parquet"); "" for generated inputs


@dataclass(frozen=True)
class Skipped:
    """A file under the pool path that is not read, and why (listed in the ingest summary)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Listing:
    inputs: list[Input]
    skipped: list[Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class EvalSplit:
    """A source's eval split: a share of its own rows (seeded hash of row_id), or other records."""

    fraction: float = 0.0
    source: PoolSource | None = None


class PoolSource(Protocol):
    """What the ingest needs from a pool source (see the module docstring for how to add one)."""

    name: str  # the pool.path it was opened for (messages)
    parallel: bool  # True: each input may be read in its own Ray task
    mapping: RecordMapping  # record -> row
    size_hint: int | None  # rows expected (a progress bar's total), None if unknown

    def list_inputs(self) -> Listing:
        """The inputs in order (the first copy of a row_id wins in this order) and what was skipped."""
        ...

    def read(self, inp: Input) -> Iterator[tuple[int, Any]]:
        """``(line, record | Bad)`` of one input; content problems are yielded, never raised."""
        ...

    def eval_split(self) -> EvalSplit:
        """The eval split this source brings when ``pool.eval_path`` is unset."""
        ...


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------

_HIDDEN = (
    "hidden: the name (or a folder above it) starts with '.' or '_' (markers like _SUCCESS, .DS_Store); rename it to ingest it"
)


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.split("/") if part)


HF = "hf://"


def hf_filesystem():
    """The hub's fsspec filesystem (``huggingface_hub.HfFileSystem``, installed with transformers;
    a token comes from its usual places). The one place the hub is reached: tests put a local
    fsspec filesystem here."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def hf_store(uri: str) -> Store:
    """A Store for ``hf://datasets/<org>/<name>[@revision]/<path>`` on :func:`hf_filesystem`."""
    path = uri[len(HF) :].rstrip("/")
    if not path.startswith("datasets/") or path.count("/") < 2:
        raise PoolError(f"pool.path={uri!r} is not a dataset on the hub: write hf://datasets/<org>/<name>/<file, folder or glob>")
    return Store(pafs.PyFileSystem(pafs.FSSpecHandler(hf_filesystem())), path, HF + path)


def pool_store(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Store:
    """The Store of a pool file or folder: local, s3:// or hf://."""
    return hf_store(uri) if uri.startswith(HF) else get_store(uri, endpoint_url, region)


def scheme_of(path: str) -> str:
    """The scheme of a pool path: ``s3://``, ``hf://`` or "" (local)."""
    return "s3://" if is_remote(path) else HF if path.startswith(HF) else ""


def _saved_dataset(store: Store, rel: list[tuple[str, str]], prefix: str) -> Listing | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder, in its own order (``state.json``
    ``_data_files``), its metadata files skipped; a ``DatasetDict`` folder reads its ``train`` split.
    None when the folder is not one."""
    names = {r for _, r in rel}
    if "dataset_dict.json" in names:
        splits = json.loads(store.fs.open_input_stream(posixpath.join(store.path, "dataset_dict.json")).read()).get("splits", [])
        if "train" not in splits:
            raise PoolError(
                f"{store.uri} is a saved DatasetDict without a 'train' split (splits: {splits}): point pool.path at one split's folder"
            )
        sub = posixpath.join(store.path, "train")
        return _saved_dataset(
            Store(store.fs, sub, store.uri.rstrip("/") + "/train"),
            [(p, r[len("train/") :]) for p, r in rel if r.startswith("train/")],
            prefix,
        )
    if "state.json" not in names:
        return None
    state = json.loads(store.fs.open_input_stream(posixpath.join(store.path, "state.json")).read())
    data = [d["filename"] for d in state.get("_data_files", [])]
    missing = [d for d in data if d not in names]
    if missing:
        raise PoolError(f"{store.uri}/state.json names {missing[0]!r}, which is not in the folder: re-save the dataset")
    inputs = [Input(prefix + posixpath.join(store.path, d), "arrow") for d in data]
    skipped = [
        Skipped(prefix + p, "not a data file of the saved dataset (state.json lists its Arrow files)")
        for p, r in rel
        if r not in data and r not in ("state.json", "dataset_info.json")
    ]
    return Listing(inputs, skipped)


def list_files(path: str, fmt: str = "auto", endpoint_url: str | None = None, region: str | None = None) -> Listing:
    """The files of a pool path: a file, a glob, a folder (recursive; a ``save_to_disk`` folder
    gives its Arrow files), an s3:// prefix or an hf:// path; sorted.

    A path with ``*?[`` is a glob unless it exists as written (a folder named ``runs[2]``).
    """
    scheme = scheme_of(path)
    store = pool_store(path, endpoint_url, region)
    exists = store.fs.get_file_info(store.path).type != pafs.FileType.NotFound
    has_glob = any(c in path for c in "*?[") and not exists
    skipped: list[Skipped] = []
    if has_glob:
        if scheme:
            # List below the longest glob-free prefix, then match the full key pattern.
            head = path[: min(path.index(c) for c in "*?[" if c in path)]
            base = pool_store(head.rsplit("/", 1)[0], endpoint_url, region)
            pattern = path[len(scheme) :]
            infos = base.fs.get_file_info(pafs.FileSelector(base.path, recursive=True, allow_not_found=True))
            files = sorted(
                scheme + i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern)
            )
        else:
            files = sorted(
                str(Path(p).absolute()) for p in _glob.glob(str(Path(path).expanduser()), recursive=True) if Path(p).is_file()
            )
        kind = f"glob {path!r}"
    else:
        info = store.fs.get_file_info(store.path)
        if info.type == pafs.FileType.File:
            files = [store.uri]
        elif info.type == pafs.FileType.Directory:
            infos = store.fs.get_file_info(pafs.FileSelector(store.path, recursive=True))
            rel = sorted((i.path, posixpath.relpath(i.path, store.path)) for i in infos if i.type == pafs.FileType.File)
            saved = _saved_dataset(store, rel, scheme)
            if saved is not None:
                return saved
            files = [scheme + p for p, r in rel if not _hidden(r)]
            skipped = [Skipped(scheme + p, _HIDDEN) for p, r in rel if _hidden(r)]
        else:
            raise PoolError(
                f"pool.path={path!r} does not exist: point it at a file, glob, folder, s3:// prefix or hf://datasets/ path"
            )
        kind = f"folder {path!r}" if info.type == pafs.FileType.Directory else f"file {path!r}"
    inputs, unknown = [], []
    for f in files:
        f_fmt = format_of(f, fmt)
        if f_fmt is None:
            unknown.append(f)
        else:
            inputs.append(Input(f, f_fmt))
    if unknown and (len(files) == 1 or not has_glob and kind.startswith("file")):
        raise PoolError(f"cannot tell the format of {unknown[0]!r} from its extension: set pool.format to {' or '.join(READERS)}")
    unknown_why = f"unknown extension: set pool.format to {' or '.join(READERS)} to read it"
    skipped = sorted(skipped + [Skipped(f, unknown_why) for f in unknown], key=lambda s: s.path)
    if skipped:
        log.warning(
            "pool: skipping %d file(s) (e.g. %s: %s); the ingest summary lists them all",
            len(skipped),
            skipped[0].path,
            skipped[0].reason,
        )
    if not inputs:
        why = f" ({len(skipped)} skipped, e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else ""
        raise PoolError(f"{kind} holds no {'/'.join(EXTENSIONS)} files{why}: check pool.path (and pool.format)")
    return Listing(inputs, skipped)


@dataclass(frozen=True)
class FileSource:
    """Pool files, local, s3:// or hf://; records mapped by ``pool.layout`` (:func:`~edsft.pools.records.mapping_for`)."""

    path: str
    pool: PoolConfig
    endpoint_url: str | None = None
    region: str | None = None
    parallel = True
    size_hint = None

    @classmethod
    def from_config(cls, cfg: Config, path: str | None = None) -> FileSource:
        return cls(path or cfg.pool.path, cfg.pool, cfg.storage.endpoint_url, cfg.storage.region)

    @property
    def name(self) -> str:
        return self.path

    @property
    def mapping(self) -> RecordMapping:
        return mapping_for(self.pool)

    def list_inputs(self) -> Listing:
        return list_files(self.path, self.pool.format, self.endpoint_url, self.region)

    def read(self, inp: Input) -> Iterator[tuple[int, Any]]:
        return read_store(pool_store(inp.origin, self.endpoint_url, self.region), inp.fmt)

    def eval_split(self) -> EvalSplit:
        return EvalSplit(fraction=self.pool.eval_fraction)


# ------------------------------------------------------------------------------------------------
# Built-in generated pools
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Generated:
    """A generated pool: one input per split, fixed columns, its own balanced eval split."""

    name: str
    pool: PoolConfig
    split: str = "train"  # "train" (the pool) or "eval"
    parallel = False  # one generator: nothing to spread over tasks

    @property
    def mapping(self) -> FieldMapping:
        return FieldMapping.builtin(self.pool)

    @property
    def size_hint(self) -> int | None:
        return None

    def list_inputs(self) -> Listing:
        return Listing([Input(self.name if self.split == "train" else f"{self.name}/eval")])

    def read(self, inp: Input) -> Iterator[tuple[int, Any]]:
        i = 0
        for chunk in self._chunks():
            for rec in chunk:
                yield i, rec
                i += 1

    def eval_split(self) -> EvalSplit:
        return EvalSplit(source=type(self)(self.name, self.pool, "eval")) if self.split == "train" else EvalSplit()

    def _chunks(self) -> Iterator[list[dict]]:
        raise NotImplementedError


class BuiltinTasks(_Generated):
    """``builtin:tasks``: ``pool.size`` rows of 20 verifiable task families (``pool.seed``)."""

    @property
    def size_hint(self) -> int | None:
        return self.pool.size if self.split == "train" else self.pool.eval_size

    def _chunks(self) -> Iterator[list[dict]]:
        from .builtin_tasks import iter_tasks

        yield from iter_tasks(self.size_hint, seed=self.pool.seed, split=self.split)


class BuiltinPydocs(_Generated):
    """``builtin:pydocs``: Q/A pairs from Python's documentation (eval: ``pool.eval_size`` rows)."""

    def _chunks(self) -> Iterator[list[dict]]:
        from .builtin_pydocs import iter_pydocs

        rows = [r for chunk in iter_pydocs(self.split) for r in chunk]
        yield rows[: self.pool.eval_size] if self.split == "eval" else rows


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------

SourceFactory = Callable[[Config], PoolSource]
SOURCES: dict[str, SourceFactory] = {}  # key -> factory, in registration order


def register_source(key: str, factory: SourceFactory) -> None:
    """``pool.path == key`` (or, for a key ending in ``://``, any path starting with it) opens
    ``factory(cfg)``. Later registrations of the same key replace earlier ones."""
    SOURCES[key] = factory


def _builtin(cls) -> SourceFactory:
    return lambda cfg: cls(cfg.pool.path, cfg.pool)


register_source("builtin:tasks", _builtin(BuiltinTasks))
register_source("builtin:pydocs", _builtin(BuiltinPydocs))


def open_source(cfg: Config) -> PoolSource:
    """The source of ``cfg.pool.path`` (cheap: nothing is listed or read until asked)."""
    path = cfg.pool.path
    for key, factory in SOURCES.items():
        if path == key or (key.endswith("://") and path.startswith(key)):
            return factory(cfg)
    return FileSource.from_config(cfg)


def eval_split_of(cfg: Config, source: PoolSource) -> EvalSplit:
    """The eval split an ingest uses: the files of ``pool.eval_path`` if set, else the source's own."""
    if cfg.pool.eval_path:
        return EvalSplit(source=FileSource.from_config(cfg, cfg.pool.eval_path))
    return source.eval_split()
