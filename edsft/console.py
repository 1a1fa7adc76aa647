"""The console of a run: one line per stage, a summary table, and everything else in a log file.

A run's console is for a person: a line when a stage starts, its progress (rows/s, ETA; trials
done / total in a sweep) and a line when it ends, then a summary table (stage, rows, wall time,
artifact) and where the report, the metrics and the log are. Ray's and the libraries' output
(driver and worker logs, DeepSpeed, transformers, Tune, Python warnings) goes to
``<output.dir>/logs/edsft.log``; ``--verbose`` shows it live as well.

How: :class:`Console` redirects the process's file descriptors 1 and 2 to the log file (so output
written below Python - Ray's C++ core, the raylet and GCS it starts, worker logs that Ray forwards
to the driver - is caught too) and keeps a duplicate of the original stderr for its own lines.
With ``verbose`` the descriptors point at a pipe that a thread copies to both the log and the
console. Progress on a terminal is one line rewritten in place; otherwise a plain line every
``interval`` seconds, so CI logs and ``ray job logs`` stay short.

Stages report progress through :func:`progress` (a no-op when no console is open: library use
and tests print nothing extra). A process without a console can install a *sink* instead
(:func:`set_sink`): a sweep trial, which runs in a Tune worker, sends its stages' progress to its
trial folder, and the driver's console shows it next to the trial count. This module is in the
config layer: no Ray, no torch.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "Console",
    "Bar",
    "active",
    "bar",
    "note",
    "progress",
    "set_sink",
    "current_sink",
    "stage",
    "log_path_for",
    "summary_table",
    "compute_line",
    "format_seconds",
]

_ACTIVE: Console | None = None
PREFIX = "[edsft]"
# Where progress goes in a process with no console: sink(stage, done, total, unit); stage is the
# pipeline stage that :func:`stage` last named, done None when it has only just started.
Sink = Callable[[str | None, float | None, float | None, str], None]
_SINK: Sink | None = None
_SINK_STAGE: str | None = None


def active() -> Console | None:
    """The console of the run in progress in this process (None in library use and in Ray workers)."""
    return _ACTIVE


def note(msg: str) -> None:
    """A line for the person running edsft: on the console (and in the log) when one is open,
    else on stderr (a Ray worker's stderr ends up in the driver's log file)."""
    if _ACTIVE is not None:
        _ACTIVE.line(f"{PREFIX} {msg}")
    else:
        print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


def progress(done: float, total: float | None = None, unit: str = "rows", detail: str = "") -> None:
    """Progress of the stage in progress: ``done`` of ``total`` ``unit`` so far (cheap: call it often).
    ``detail``: a short text shown after the rate (a sweep: what its running trials are doing)."""
    if _ACTIVE is not None:
        _ACTIVE.update(done, total, unit, detail)
    elif _SINK is not None:
        _SINK(_SINK_STAGE, done, total, unit)


def set_sink(sink: Sink | None) -> Sink | None:
    """Send :func:`progress` to ``sink`` while no console is open in this process; returns the sink it
    replaces (restore it when done). None removes it."""
    global _SINK, _SINK_STAGE
    previous, _SINK, _SINK_STAGE = _SINK, sink, None
    return previous


def current_sink() -> tuple[Sink | None, str | None]:
    """(the sink, the stage it last heard of): what a worker process needs to report to it too."""
    return _SINK, _SINK_STAGE


def stage(name: str) -> None:
    """A pipeline stage starts in a process with no console: the sink (if any) hears of it."""
    global _SINK_STAGE
    if _ACTIVE is None and _SINK is not None:
        _SINK_STAGE = name
        _SINK(name, None, None, "")


class Bar:
    """A tqdm-shaped counter (``update(n)``, ``close()``) feeding the console's progress line."""

    def __init__(self, total: float | None, unit: str):
        self.n, self.total, self.unit = 0, total, unit

    def update(self, n: float = 1) -> None:
        self.n += n
        progress(self.n, self.total, self.unit)

    def close(self) -> None:
        pass

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def bar(total: float | None = None, unit: str = "rows") -> Bar | None:
    """A :class:`Bar` when a console is open, else None (the caller's own bar, or none)."""
    return Bar(total, unit) if _ACTIVE is not None else None


def log_path_for(output_dir: str) -> Path:
    """Where the log of a run folder goes: ``<output.dir>/logs/edsft.log``; for an ``s3://`` run
    folder a local scratch file (keyed by the URI) that :meth:`Console.close` uploads there."""
    from .storage import get_store, is_remote

    if not is_remote(output_dir):
        return Path(get_store(output_dir).path) / "logs" / "edsft.log"
    key = hashlib.sha256(output_dir.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "edsft-logs" / key / "edsft.log"


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def summary_table(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The end-of-run table: one row per stage, ``{stage, rows, wall_s, artifact}`` (``rows`` may
    be a string like ``"6 steps"``; a skipped stage says so in the wall column)."""
    head = ("stage", "rows", "wall", "artifact")
    body = []
    for r in rows:
        wall = "skipped" if r.get("skipped") else format_seconds(float(r.get("wall_s") or 0.0))
        body.append((str(r["stage"]), str(r.get("rows", "")), wall, str(r.get("artifact") or "")))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(3)]
    fmt = lambda t: f"  {t[0]:<{widths[0]}}  {t[1]:>{widths[1]}}  {t[2]:>{widths[2]}}  {t[3]}".rstrip()  # noqa: E731
    return [fmt(head), *(fmt(t) for t in body)]


def compute_line(compute: dict[str, Any]) -> str:
    """``compute: scoring 12.3 s, selection 0.4 s, training 31.0 s, evaluation 6.2 s = 49.9 s`` (and the
    GPU-seconds when there are any): :func:`edsft.compute.run_compute` of the run, inherited stages included."""
    kinds = compute.get("compute_s", {})
    line = "compute: " + ", ".join(f"{k} {format_seconds(v)}" for k, v in kinds.items())
    line += f" = {format_seconds(compute.get('total_s', 0.0))}"
    if compute.get("gpu_total_s", 0.0) > 0:
        gpu = ", ".join(f"{k} {format_seconds(v)}" for k, v in compute.get("gpu_s", {}).items() if v > 0)
        line += f"; GPU-seconds: {gpu} = {format_seconds(compute['gpu_total_s'])}"
    return line


def _rate(done: float, total: float | None, unit: str, elapsed: float) -> str:
    """``120/200 rows, 45.1 rows/s, ETA 2 s`` (what is known of it)."""
    parts = [f"{done:g}/{total:g} {unit}" if total else f"{done:g} {unit}"]
    if elapsed > 0 and done > 0:
        rate = done / elapsed
        parts.append(f"{rate:.3g} {unit}/s" if rate >= 1 else f"{elapsed / done:.3g} s per {unit.rstrip('s') or unit}")
        if total and total > done:
            parts.append(f"ETA {format_seconds((total - done) / rate)}")
    return ", ".join(parts)


class Console:
    """Open for the length of a CLI command: ``with Console(log_path, verbose=...) as con: ...``.

    ``stream``: where the console lines go (default: the process's stderr as it was on entry).
    ``interval``: seconds between plain progress lines when the stream is not a terminal.
    """

    def __init__(
        self,
        log_path: str | os.PathLike,
        *,
        verbose: bool = False,
        stream: TextIO | None = None,
        interval: float | None = None,
        upload_to: Any = None,
    ):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.upload_to = upload_to  # a Store for an s3:// run folder's logs/edsft.log
        self._stream = stream
        self.interval = float(os.environ.get("EDSFT_PROGRESS_INTERVAL", 30)) if interval is None else interval
        self._lock = threading.RLock()
        self._stage: dict[str, Any] | None = None
        self._status = ""  # the progress line currently shown on a terminal
        self._saved: list[tuple[int, int]] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # ---- capture -----------------------------------------------------------------------------
    def __enter__(self) -> Console:
        global _ACTIVE
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._log.write(f"\n===== edsft {' '.join(sys.argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        self._log.flush()
        if self._stream is None:
            self._stream = self._dup(sys.stderr)
        self._stdout = self._dup(sys.stdout)
        self.tty = bool(getattr(self._stream, "isatty", lambda: False)()) and not self.verbose
        self._py = (sys.stdout, sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if self.verbose:  # fds 1/2 -> a pipe; a thread copies it to the log and the console
            r, w = os.pipe()
            target = w
            self._threads.append(threading.Thread(target=self._tee, args=(r,), daemon=True, name="edsft-tee"))
            self._threads[-1].start()
        else:
            target = self._log.fileno()
        for fd in (1, 2):
            try:
                self._saved.append((fd, os.dup(fd)))
                os.dup2(target, fd)
            except OSError:  # no such descriptor (a daemon): Python-level redirection still works
                pass
        if self.verbose:
            os.close(target)
        # Python-level writers (print, warnings, logging.lastResort, Ray's log forwarding) go to
        # fd 1/2 even when sys.stdout/err were replaced (pytest's capsys, notebooks)
        sys.stdout = io.TextIOWrapper(
            os.fdopen(os.dup(1), "wb", buffering=0), encoding="utf-8", errors="replace", line_buffering=True, write_through=True
        )
        sys.stderr = io.TextIOWrapper(
            os.fdopen(os.dup(2), "wb", buffering=0), encoding="utf-8", errors="replace", line_buffering=True, write_through=True
        )
        _ACTIVE = self
        self._threads.append(threading.Thread(target=self._tick, daemon=True, name="edsft-progress"))
        self._threads[-1].start()
        return self

    @staticmethod
    def _dup(f: TextIO) -> TextIO:
        """A writer to where ``f`` writes now, unaffected by the redirection of fd 1/2."""
        try:
            fd = f.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return f  # a replaced stream (pytest's capsys): write to it as it is
        return io.TextIOWrapper(
            os.fdopen(os.dup(fd), "wb", buffering=0), encoding="utf-8", errors="replace", line_buffering=True, write_through=True
        )

    def _tee(self, r: int) -> None:
        with os.fdopen(r, "rb", buffering=0) as pipe:
            for chunk in iter(lambda: pipe.read(65536), b""):
                text = chunk.decode("utf-8", "replace")
                with self._lock:
                    if not self._log.closed:
                        self._log.write(text)
                    self._stream.write(text)
                    self._stream.flush()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        global _ACTIVE
        if _ACTIVE is not self:
            return
        self._stop.set()
        self._clear_status()
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
                f.close()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = self._py
        for fd, saved in self._saved:  # closing the write end lets the tee thread finish
            os.dup2(saved, fd)
            os.close(saved)
        for t in self._threads:
            if t.name == "edsft-tee":
                t.join(timeout=1)  # a child process may still hold the pipe: don't wait for it
        _ACTIVE = None
        self._log.close()
        if self.upload_to is not None:
            try:
                self.upload_to.write_bytes(self.log_path.read_bytes())
            except Exception as e:  # noqa: BLE001 - the run's outcome matters more than its log's upload
                self.line(f"{PREFIX} could not upload the log to {self.upload_to.uri}: {e} (it is in {self.log_path})")

    # ---- console lines -----------------------------------------------------------------------
    def out(self, text: str) -> None:
        """A result on the original stdout (``edsft report``'s JSON), for pipes like ``| jq``."""
        self._stdout.write(text + "\n")
        self._stdout.flush()

    def line(self, text: str) -> None:
        """A whole line on the console and in the log."""
        with self._lock:
            if _ACTIVE is self and not self._log.closed:
                self._log.write(text + "\n")
                self._log.flush()
            self._clear_status()
            self._stream.write(text + "\n")
            if self._stage is not None and self.tty:
                self._show(self._render())
            self._stream.flush()

    def stage_started(self, name: str, text: str) -> None:
        with self._lock:
            self._stage = {
                "name": name,
                "t0": time.monotonic(),
                "done": None,
                "total": None,
                "unit": "rows",
                "last": time.monotonic(),
            }
            if self.tty:  # one line per stage on a terminal: this one turns into its progress, then its result
                self._log.write(f"{PREFIX} {name}: {text}\n")
                self._show(f"{PREFIX} {name}: {text}")
                self._stream.flush()
            else:
                self.line(f"{PREFIX} {name}: {text}")

    def stage_finished(self, text: str) -> None:
        with self._lock:
            self._stage = None
            self.line(f"{PREFIX} {text}")

    def update(self, done: float, total: float | None, unit: str, detail: str = "") -> None:
        with self._lock:
            if self._stage is None:
                return
            self._stage["detail"] = detail
            # the rate is the average since the stage started; a stage that moves on to counting
            # something else (a sweep: the base model's eval rows, then trials) starts it again
            if self._stage["done"] is None:
                self._stage["t_unit"] = self._stage["t0"]
            elif unit != self._stage["unit"]:
                self._stage["t_unit"] = time.monotonic()
            self._stage.update(done=done, total=total, unit=unit)

    def _render(self) -> str:
        st = self._stage
        elapsed = time.monotonic() - st["t0"]
        if st["done"] is None:
            return f"{PREFIX} {st['name']}: still running, {format_seconds(elapsed)}"
        rate = _rate(st["done"], st["total"], st["unit"], time.monotonic() - st["t_unit"])
        detail = f"; {st['detail']}" if st.get("detail") else ""
        return f"{PREFIX} {st['name']}: {rate} ({format_seconds(elapsed)}){detail}"

    def _show(self, text: str) -> None:
        width = 200
        try:
            width = os.get_terminal_size(self._stream.fileno()).columns - 1
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            pass
        self._status = text[:width]
        self._stream.write("\r\033[K" + self._status)

    def _clear_status(self) -> None:
        if self._status:
            self._stream.write("\r\033[K")
            self._status = ""

    def _tick(self) -> None:
        while not self._stop.wait(1.0 if self.tty else min(self.interval, 5.0)):
            with self._lock:
                if self._stage is None:
                    continue
                if self.tty:
                    self._show(self._render())
                    self._stream.flush()
                elif time.monotonic() - self._stage["last"] >= self.interval:
                    self._stage["last"] = time.monotonic()
                    text = self._render()
                    self._log.write(text + "\n")
                    self._stream.write(text + "\n")
                    self._stream.flush()
