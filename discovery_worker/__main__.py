"""`python -m discovery_worker`: settings, database, migrations, gRPC server, claim loop, signals.

A bad setting ends the process at once with one line naming the variable (exit status 2) instead
of a stack trace later. SIGTERM / SIGINT: health NOT_SERVING, stop claiming, runners stop at their
next checkpoint and hand their sessions back (another worker resumes them at once), then the server
stops within the grace period.
"""

from __future__ import annotations

import asyncio
import sys

from imagetraining.rpc import install_signal_handlers
from imagetraining.settings import Settings, SettingsError, configure_logging


class StartupError(Exception):
    """The worker could not start (database unreachable, port taken, trainer not loadable)."""


async def _main(settings: Settings) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from discovery_worker.pool import PoolStartError, TrainerLoadError
    from discovery_worker.worker import run_worker

    try:
        handle = await run_worker(settings)
    except (OSError, SQLAlchemyError, TrainerLoadError, PoolStartError) as exc:
        raise StartupError(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
    install_signal_handlers(handle.server)
    try:
        await handle.server.wait()
    finally:
        await handle.stop()


def main() -> int:
    try:
        settings = Settings.from_env()
        settings.validate_worker()
    except SettingsError as exc:
        print(f"imagetraining: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        asyncio.run(_main(settings))
    except StartupError as exc:
        print(f"imagetraining: discovery worker cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
