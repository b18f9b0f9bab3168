"""`python -m discovery_worker`: settings, database, migrations, gRPC server, claim loop, signals.

A bad setting or an unusable resource (database not up within IMAGETRAINING_DATABASE_WAIT_SECONDS,
port taken, trainer not loadable) ends the process with one line naming the variable (exit status
2) instead of a stack trace (imagetraining.startup). SIGTERM / SIGINT: health NOT_SERVING, stop
claiming, runners stop at their next checkpoint and hand their sessions back (another worker
resumes them at once), then the server stops within the grace period.
"""

from __future__ import annotations

import logging
import sys

from imagetraining import startup
from imagetraining.rpc import ListenError, install_signal_handlers
from imagetraining.settings import Settings

log = logging.getLogger("discovery_worker")


async def _main(settings: Settings) -> None:
    from discovery_worker.pool import PoolStartError, TrainerLoadError
    from discovery_worker.worker import run_worker

    await startup.reach_database(settings, log)
    try:
        handle = await run_worker(settings)
    except ListenError as exc:
        raise startup.StartupError("IMAGETRAINING_WORKER_ADDRESS", str(exc)) from None
    except TrainerLoadError as exc:
        raise startup.StartupError("IMAGETRAINING_TRAINER", str(exc).splitlines()[0]) from None
    except PoolStartError as exc:
        raise startup.StartupError("IMAGETRAINING_POOL_SIZE", str(exc)) from None
    except Exception as exc:
        if startup.is_database_error(exc):
            raise startup.database_failure(settings, "cannot prepare the database", exc) from None
        raise
    install_signal_handlers(handle.server)
    try:
        await handle.server.wait()
    finally:
        await handle.stop()


def main() -> int:
    return startup.run_service(_main, validate=Settings.validate_worker, service="imagetraining-worker")


if __name__ == "__main__":
    sys.exit(main())
