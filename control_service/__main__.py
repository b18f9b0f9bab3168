"""`python -m control_service`: validate settings, migrate, serve until SIGTERM / SIGINT.

A bad setting ends the process at once with one line naming the variable (exit status 2), so an
operator sees the mistake instead of a stack trace minutes later.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from control_service.server import serve, tune_gc
from imagetraining.db.engine import Database, resolve_url
from imagetraining.db.migrate import upgrade
from imagetraining.rpc import install_signal_handlers
from imagetraining.settings import Settings, SettingsError, configure_logging

log = logging.getLogger("control_service")


async def run(settings: Settings) -> None:
    db = Database.connect(await resolve_url(settings))
    try:
        await upgrade(db.engine)
        server = await serve(settings, database=db)
        install_signal_handlers(server.handle)
        host = settings.control_address.rpartition(":")[0]
        log.info("control service listening on %s:%d", host, server.port)
        await server.wait()
        log.info("control service stopped")
    finally:
        await db.dispose()


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"imagetraining: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    tune_gc()
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
