"""``edsft`` (also ``python -m edsft``): one verb per stage, plus ``run``, ``report`` and ``config show``.

    edsft run                                   # the embedded quickstart, end to end
    edsft run --config jobs/configs/smoke.yaml output.dir=runs/smoke
    edsft select selection.name=k_center selection.budget=500
    edsft report runs/quickstart

Exit codes: 0 ok, 2 bad config or input (an :class:`edsft.errors.UserError`: its message says what
to fix, no traceback), 1 failure (anything else: a bug or the environment; with its traceback).

The console shows one line per stage (with its progress), a summary table and every error; Ray's
and the libraries' output goes to ``<output.dir>/logs/edsft.log`` (``--verbose``: also live).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .config import load_config, to_yaml
from .errors import UserError

STAGE_VERBS = ("ingest", "score", "select", "annotate", "train", "evaluate", "sweep")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edsft",
        description="Label-efficient SFT through experimental design: pick the prompts most worth annotating.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", help="YAML config (default: the embedded quickstart)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. selection.budget=200")
        sp.add_argument(
            "--verbose",
            "-v",
            action="store_true",
            help="show Ray's and the libraries' logs live (they always go to <output.dir>/logs/edsft.log)",
        )

    for verb in STAGE_VERBS:
        sp = sub.add_parser(verb, help=f"run the {verb} stage")
        common(sp)
    sp = sub.add_parser("run", help="all stages in order, skipping those already done with the same config")
    common(sp)
    sp.add_argument("--force", action="store_true", help="recompute every stage")
    sp = sub.add_parser("report", help="label-efficiency report of a run folder's sweep")
    sp.add_argument("run_dir", nargs="?", help="run folder (default: output.dir of the config)")
    common(sp)
    sp = sub.add_parser("config", help="config tools")
    csub = sp.add_subparsers(dest="config_verb", metavar="show")
    show = csub.add_parser("show", help="print the resolved config")
    common(show)
    return p


def _report_config(run_dir: str, overrides: list[str]):
    """`edsft report RUN_DIR` reports the run with the config it ran with (from its manifest)."""
    from .config import apply_overrides, config_from_dict
    from .pipeline import read_manifest
    from .storage import get_store

    manifest = read_manifest(get_store(run_dir))
    if "config" not in manifest:
        return None
    return config_from_dict(apply_overrides(manifest["config"], overrides))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb is None:
        _parser().print_help()
        return EXIT_BAD_INPUT
    try:
        overrides = list(args.overrides)
        if args.verb == "report" and args.run_dir:
            if "=" in args.run_dir:  # `edsft report key=value` without a folder
                overrides.insert(0, args.run_dir)
            else:
                overrides.append(f"output.dir={args.run_dir}")
        cfg = _report_config(args.run_dir, overrides) if args.verb == "report" and args.run_dir and not args.config else None
        cfg = cfg or load_config(args.config, overrides)
        if args.verb != "config":
            from .validate import check_config

            check_config(cfg)  # a bad config fails before anything (the log file included) is written
    except Exception as e:  # noqa: BLE001 - nothing ran yet: no console, no log file
        return _fail(e)
    if args.verb == "config":
        sys.stdout.write(to_yaml(cfg))
        return EXIT_OK
    # From here on Ray's and the libraries' output goes to the run's log file; the console shows
    # one line per stage, the summary, and every error.
    with _open_console(cfg, args.verbose) as con:
        try:
            _dispatch(args, cfg, con)
            return EXIT_OK
        except BaseException as e:  # noqa: BLE001 - the CLI boundary turns any failure into an exit code
            return _fail(e, con)
        finally:
            _stop_ray_we_started(con)


def _dispatch(args: argparse.Namespace, cfg, con) -> None:
    from . import pipeline

    if args.verb == "run":
        pipeline.run_pipeline(cfg, force=args.force)
    elif args.verb == "sweep":
        # the sweep reads the run's pool and scores: build them first when they are missing
        results = pipeline.run_pipeline(cfg, stages=["ingest", "score"], summary=False)
        results["sweep"] = pipeline.run_stage(cfg, "sweep")
        pipeline.summarize(cfg, results)
    elif args.verb == "report":
        entry = pipeline.run_stage(cfg, "report")
        con.out(json.dumps(entry["summary"], indent=2, default=str))
    else:
        pipeline.run_stage(cfg, args.verb)


def _open_console(cfg, verbose: bool):
    from .console import Console, log_path_for
    from .storage import get_store, is_remote

    upload = (
        get_store(cfg.output.dir, cfg.storage.endpoint_url, cfg.storage.region).child("logs", "edsft.log")
        if is_remote(cfg.output.dir)
        else None
    )
    con = Console(log_path_for(cfg.output.dir), verbose=verbose, upload_to=upload)
    con.ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return con


def _stop_ray_we_started(con) -> None:
    """Shut down the local Ray cluster this command started while its output still goes to the
    log (its shutdown messages would otherwise land on the console after the summary)."""
    ray = sys.modules.get("ray")
    if ray is not None and not con.ray_before and ray.is_initialized():
        ray.shutdown()


def _fail(e: BaseException, con=None) -> int:
    """Print what went wrong on the console (never only in the log) and return the exit code."""
    code = _report_failure(e, con.line if con is not None else (lambda m: print(m, file=sys.stderr, flush=True)))
    if con is not None:
        con.line(f"edsft: Ray's and the libraries' output is in {con.log_path}")
    return code


def _report_failure(e: BaseException, say) -> int:
    if isinstance(e, UserError):
        # ConfigError, PoolError, AnnotationError, ...: the message names the field or file and the fix
        say(f"edsft: {type(e).__name__}: {e}")
        return EXIT_BAD_INPUT
    if isinstance(e, FileNotFoundError):
        say(f"edsft: missing input: {e}. Run the earlier stages first (or `edsft run`).")
        return EXIT_BAD_INPUT
    if isinstance(e, KeyboardInterrupt):
        say("edsft: interrupted; re-run the same command to continue")
        return EXIT_FAILURE
    if not isinstance(e, Exception):  # SystemExit and friends: not ours to translate
        raise e
    from .pipeline import StageNotBuilt

    if isinstance(e, StageNotBuilt):
        say(f"edsft: {e}")
        return EXIT_FAILURE
    # a bug or the environment: its traceback, on the console too
    say("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip())
    say(f"edsft: failed: {type(e).__name__}: {e}")
    return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
