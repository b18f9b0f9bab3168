"""`imagetraining`: the command-line client of the control service, for people and for scripts: parser and entry point.

Every command is one or a few RPCs; nothing here touches the library on disk (paths are resolved to
absolute ones only so that `imagetraining train ./photos` works from the directory you are in).
Errors come back as "error: <CODE>: <message>" plus the google.rpc details, with exit code 2 for
INVALID_ARGUMENT / FAILED_PRECONDITION / NOT_FOUND (fix the request), 3 for UNAVAILABLE (try again
later) and 1 otherwise; `watch` and `train` exit 0 when the session completed and 1 when it failed or
was cancelled.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from rich.console import Console

from imagetraining.cli.client import (
    DEFAULT_ADDRESS,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    error_lines,
    exit_code_for,
    status_code,
)
from imagetraining.cli.commands import (
    JOB_STATES,
    SESSION_STATES,
    Command,
    Context,
    cmd_cancel,
    cmd_create,
    cmd_delete,
    cmd_get,
    cmd_jobs,
    cmd_list,
    cmd_pause,
    cmd_restart,
    cmd_resume,
    cmd_scan,
    cmd_select,
    cmd_similar,
    cmd_start,
    cmd_train,
    cmd_validate,
    cmd_watch,
)
from imagetraining.cli.watch import WatchGaveUp

# --- parser --------------------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The connection and output options, accepted before and after the command.

    Sub-parsers get them with SUPPRESS defaults, so a value given before the command is not reset.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=default(os.environ.get("IMAGETRAINING_CONTROL_ADDRESS") or DEFAULT_ADDRESS),
        help="control service host:port (env IMAGETRAINING_CONTROL_ADDRESS, default %(default)s)"
        if not suppress
        else "control service host:port",
    )
    group.add_argument(
        "--token",
        default=default(os.environ.get("IMAGETRAINING_AUTH_TOKEN")),
        help="bearer token sent as 'authorization: Bearer ...' (env IMAGETRAINING_AUTH_TOKEN)",
    )
    group.add_argument("--tls-ca", metavar="FILE", default=default(None), help="CA certificate (PEM): connect with TLS")
    group.add_argument(
        "--json", action="store_true", default=default(False), help="print responses as JSON (for scripts)"
    )
    group.add_argument(
        "--timeout", type=float, default=default(30.0), metavar="SECONDS", help="deadline of each call (default 30)"
    )


def _session_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", metavar="SESSION", help='session id or name ("7" or "sessions/7")')


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="display name (default: the root's base name)")
    parser.add_argument(
        "--ext", action="append", metavar="EXT", help="extension to train, repeatable or comma-separated (jpg,png)"
    )
    parser.add_argument("--no-recursive", action="store_true", help="only files directly in each subdirectory")
    parser.add_argument(
        "--near-duplicate-distance",
        type=int,
        metavar="BITS",
        help="dHash bits within which two images are near duplicates (default 4, 0..8)",
    )
    parser.add_argument(
        "--skip-near-duplicates",
        action="store_true",
        help="train only the best of near duplicates (most pixels, then largest file); exact copies are always skipped",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagetraining",
        description="Create, start and watch training sessions on the imagetraining control service.",
        epilog="Exit codes: 0 ok; 1 failed (or the session failed/was cancelled); 2 invalid request, "
        "not found or not allowed in this state; 3 server unavailable; 130 interrupted.",
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Command, help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func)
        return p

    sessions = commands.add_parser("sessions", help="create, list, inspect and control sessions", parents=[common])
    sessions_sub = sessions.add_subparsers(dest="sessions_command", metavar="ACTION", required=True)

    p = add(sessions_sub, "create", cmd_create, "create a session over ROOT")
    p.add_argument("root", metavar="ROOT", help="directory inside a library root")
    p.add_argument(
        "--subdir",
        action="append",
        metavar="PATH",
        help="subdirectory to select (absolute, or relative to ROOT), repeatable; none: all listed, unselected",
    )
    _config_args(p)

    p = add(sessions_sub, "list", cmd_list, "list sessions, newest first")
    p.add_argument("--state", choices=sorted(SESSION_STATES, key=SESSION_STATES.__getitem__))
    p.add_argument("--page-size", type=int, metavar="N", help="sessions per page (server default 50)")
    p.add_argument("--all", action="store_true", help="fetch every page")

    p = add(sessions_sub, "get", cmd_get, "show a session with its subdirectories and progress")
    _session_arg(p)
    for action, func, text in (
        ("start", cmd_start, "start a pending or failed session"),
        ("pause", cmd_pause, "pause a discovering or running session"),
        ("resume", cmd_resume, "resume a paused session where it stopped"),
        ("cancel", cmd_cancel, "cancel a session that has not finished"),
        ("delete", cmd_delete, "delete a session with its jobs (not while discovering or running)"),
    ):
        _session_arg(add(sessions_sub, action, func, text))
    p = add(sessions_sub, "restart", cmd_restart, "run a completed, cancelled or failed session again")
    _session_arg(p)
    p.add_argument("--failed-only", action="store_true", help="retrain only the failed jobs")
    p = add(sessions_sub, "select", cmd_select, "select (or --unselect) subdirectories of a session")
    _session_arg(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="subdirectory, absolute or relative to the root")
    p.add_argument("--unselect", action="store_true", help="unselect instead")

    p = add(commands, "scan", cmd_scan, "list the subdirectories of PATH with image counts")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--ext", action="append", metavar="EXT", help="extensions to count (default: the server's)")

    p = add(commands, "validate", cmd_validate, "dry run of start: would it succeed, how many images (exit 2: no)")
    _session_arg(p)

    p = add(commands, "jobs", cmd_jobs, "per-image outcomes with failure and skip reasons")
    _session_arg(p)
    p.add_argument("--state", choices=sorted(JOB_STATES, key=JOB_STATES.__getitem__))
    p.add_argument("--page-size", type=int, metavar="N", help="jobs per page (server default 100)")
    p.add_argument("--all", action="store_true", help="fetch every page")

    p = add(commands, "watch", cmd_watch, "live progress of a session until it ends (exit 0: completed)")
    _session_arg(p)
    p.add_argument("--after-sequence", type=int, default=0, metavar="N", help="resume after this sequence")
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal")

    p = add(commands, "similar", cmd_similar, "the trained images most like PATH (by their embeddings)")
    p.add_argument("path", metavar="PATH", help="a trained image (absolute, or relative to the current directory)")
    p.add_argument("--session", metavar="SESSION", help="search this session's images only (default: every image)")
    p.add_argument("-k", type=int, default=10, metavar="N", help="how many (1..1000, default 10)")
    p.add_argument("--exact", action="store_true", help="every distance computed, never the approximate index")

    p = add(commands, "train", cmd_train, "train every image under PATH: create, select, start and watch")
    p.add_argument(
        "path", metavar="PATH", help="directory inside a library root: its images and (recursively) its subdirectories'"
    )
    _config_args(p)
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    return parser


def main(argv: Sequence[str] | None = None, *, out: Console | None = None, err: Console | None = None) -> int:
    """Run one command; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or Console()
    err = err or Console(stderr=True)
    ctx = Context(args, out, err)
    func: Command = args.func
    try:
        return func(ctx)
    except grpc.RpcError as error:
        for line in error_lines(error, ctx.options.address):
            err.print(line, markup=False, highlight=False, soft_wrap=True)
        return exit_code_for(status_code(error))
    except WatchGaveUp as error:
        err.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_UNAVAILABLE if error.code in (None, grpc.StatusCode.UNAVAILABLE) else EXIT_FAILURE
    except OSError as error:  # e.g. an unreadable --tls-ca file
        err.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
