"""Surgery on pgserver's private state: its list of the processes holding the embedded server.

pgserver stops the embedded server when the last holder exits normally, but never while a killed
process (SIGKILL, OOM) is still listed as a holder. So `make run` drops dead holders from that list
at start and after it had to kill a child. The list is pgserver's implementation detail: everything
here is best effort.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_dead_handles(pgdata: Path) -> None:
    """Drop processes that no longer exist from pgserver's list of handle holders.

    pgserver stops the server when the last holder exits normally, but a holder that was killed
    (SIGKILL, OOM) stays in its list forever and the server would never stop. Best effort: the
    list is pgserver's implementation detail, so any surprise leaves it untouched.
    """
    pids_file = pgdata / ".handle_pids.json"
    if not pids_file.exists():
        return
    try:
        with warnings.catch_warnings():  # platformdirs' XDG_RUNTIME_DIR note: see db.engine.start_embedded
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from pgserver.postgres_server import PostgresServer

        with PostgresServer._lock:
            pids = json.loads(pids_file.read_text())
            alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
            if alive != pids:
                pids_file.write_text(json.dumps(alive))
    except Exception as exc:  # pragma: no cover - depends on pgserver internals
        print(f"note: could not tidy {pids_file}: {exc}", file=sys.stderr)
