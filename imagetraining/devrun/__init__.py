"""`make run` (`python -m imagetraining.devrun`): the control service and one discovery worker, until Ctrl-C.

Why a supervisor instead of two terminals: a first-time user gets a working pair with one command,
on the embedded PostgreSQL, with a library to try it on, and sees exactly what to type next. It
starts `python -m control_service` and `python -m discovery_worker` as child processes with one
shared environment, so they are configured exactly as in production (same variables, same
validation); with DATABASE_URL unset both join one embedded pgserver in IMAGETRAINING_DATA_DIR.

Modules: `app` (settings, the run from start to stop, `main`), `demo` (the generated demo library),
`supervisor` (the child processes and their health checks), `pgdata` (pgserver's list of handle
holders), `banner` (what is printed once both serve). `__main__` runs `app.main`.
"""

from __future__ import annotations
