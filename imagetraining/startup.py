"""What both `python -m control_service` and `python -m discovery_worker` do before serving, and how they fail.

An operator who starts a service with a mistake should read one line that names the variable to fix
and get exit status 2, not a 125-line traceback: a bad value (imagetraining.settings), a database
that does not come up within IMAGETRAINING_DATABASE_WAIT_SECONDS, a port already taken, a trainer
that cannot be loaded. A database that is merely slower to start than the service (compose, a
reboot, a crash restart) is waited for, with a log line saying so, instead of being a failure.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from imagetraining import tracing
from imagetraining.db import faults
from imagetraining.db.engine import Database, DatabaseUnreachable, resolve_url, wait_for_database
from imagetraining.db.migrate import upgrade
from imagetraining.settings import Settings, SettingsError, configure_logging

EXIT_BAD_SETTING = 2
EXIT_INTERRUPTED = 130


class StartupError(SettingsError):
    """A setting names something the process cannot use (a database, a port, a trainer); the message names it."""


def database_variable(settings: Settings) -> str:
    """The variable that says where the database is: DATABASE_URL, or the embedded server's data directory."""
    return "DATABASE_URL" if settings.database_url else "IMAGETRAINING_DATA_DIR"


def database_failure(settings: Settings, what: str, exc: BaseException) -> StartupError:
    """A database error during start-up as one line naming the variable (never the URL's password)."""
    return StartupError(database_variable(settings), f"{what}: {faults.describe(exc)}")


def is_database_error(exc: BaseException) -> bool:
    """Raised by the database layer (SQLAlchemy, asyncpg) or by a connection that failed."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        import asyncpg
    except ImportError:  # pragma: no cover - a dependency
        return isinstance(exc, SQLAlchemyError) or faults.is_unavailable(exc)
    return isinstance(exc, SQLAlchemyError | asyncpg.PostgresError | asyncpg.InterfaceError) or faults.is_unavailable(
        exc
    )


async def reach_database(settings: Settings, log: logging.Logger) -> str:
    """The database URL once PostgreSQL accepts connections (the embedded server started first if unset).

    Waits up to `settings.database_wait_seconds`; raises StartupError naming DATABASE_URL (or
    IMAGETRAINING_DATA_DIR for the embedded server) when it does not come up.
    """
    variable = database_variable(settings)
    try:
        url = await resolve_url(settings)
    except Exception as exc:  # the embedded server: initdb or pg_ctl failed, the directory is unusable
        pgdata = settings.data_dir / "pgdata"
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StartupError(variable, f"cannot start the embedded PostgreSQL in {pgdata}: {text}") from None
    try:
        await wait_for_database(url, settings.database_wait_seconds, log)
    except DatabaseUnreachable as exc:
        raise StartupError(variable, str(exc)) from None
    return url


async def migrate(db: Database, settings: Settings) -> None:
    """Apply the migrations; a database failure is a StartupError naming the database variable."""
    try:
        await upgrade(db.engine)
    except Exception as exc:
        if is_database_error(exc):
            raise database_failure(settings, "cannot apply the schema migrations", exc) from None
        raise


def run_service(
    main: Callable[[Settings], Coroutine[Any, Any, None]],
    *,
    validate: Callable[[Settings], None] | None = None,
    prepare: Callable[[], None] | None = None,
    service: str = "imagetraining",
) -> int:
    """Parse the settings, run `main` until it returns; a SettingsError at any point is one line and status 2.

    `validate` adds checks of one role (the worker's lease and heartbeat); `prepare` runs once
    logging is configured (process-wide tuning). Ctrl-C before the server is up ends quietly.
    """
    try:
        settings = Settings.from_env()
        if validate is not None:
            validate(settings)
    except SettingsError as err:
        return fail(err)
    configure_logging(settings.log_level, settings.log_format)
    if settings.metrics_address:
        from imagetraining import metrics

        try:
            metrics.serve(settings.metrics_address)
        except OSError as exc:
            return fail(
                SettingsError("IMAGETRAINING_METRICS_ADDRESS", f"cannot listen on {settings.metrics_address}: {exc}")
            )
    try:
        tracing.configure(service)  # off unless OTEL_* variables configure an exporter
    except ValueError as exc:
        return fail(SettingsError("OTEL_TRACES_EXPORTER", str(exc)))
    if prepare is not None:
        prepare()
    try:
        asyncio.run(main(settings))
    except SettingsError as err:
        return fail(err)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def fail(err: SettingsError) -> int:
    """Print the one line ("imagetraining: VARIABLE: problem") and return the exit status for it."""
    print(f"imagetraining: {err}", file=sys.stderr, flush=True)
    return EXIT_BAD_SETTING
