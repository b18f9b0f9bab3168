"""`python -m control_service`: validate settings, wait for the database, migrate, serve until SIGTERM / SIGINT.

A bad setting or an unusable resource (database not up within IMAGETRAINING_DATABASE_WAIT_SECONDS,
port taken) ends the process with one line naming the variable (exit status 2), so an operator sees
the mistake instead of a stack trace (imagetraining.startup).
"""

from __future__ import annotations

import logging
import sys

from control_service.server import serve, tune_gc
from imagetraining import startup
from imagetraining.db.engine import Database
from imagetraining.rpc import ListenError, install_signal_handlers
from imagetraining.settings import Settings

log = logging.getLogger("control_service")


async def run(settings: Settings) -> None:
    db = Database.connect(await startup.reach_database(settings, log), custom_plans=True)
    try:
        await startup.migrate(db, settings)
        try:
            server = await serve(settings, database=db)
        except ListenError as exc:
            raise startup.StartupError("IMAGETRAINING_CONTROL_ADDRESS", str(exc)) from None
        install_signal_handlers(server.handle)
        host = settings.control_address.rpartition(":")[0]
        log.info("control service listening on %s:%d", host, server.port)
        await server.wait()
        log.info("control service stopped")
    finally:
        await db.dispose()


def main() -> int:
    return startup.run_service(run, prepare=tune_gc, service="imagetraining-control")


if __name__ == "__main__":
    sys.exit(main())
