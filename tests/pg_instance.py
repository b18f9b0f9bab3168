"""A PostgreSQL server of a test's own, which the test may stop, crash, restart or hold in recovery.

The shared test server (tests/conftest.py) must never go away under other tests; faults that take
the database down (kill -9, a fast shutdown, a server that answers "the database system is starting
up") need a server that belongs to one test. This one runs the binaries the `pgserver` wheel ships,
so nothing needs installing, and it is driven directly (the postmaster is a child process of the
test) so that a test knows its pid, can SIGKILL it like a crash, and waits for conditions, never for
a fixed time.

    pg = PgInstance(tmp_path / "pg")
    pg.init()                       # initdb once into base_dir/data
    pg.start()                      # 127.0.0.1:<free port> plus a unix socket in base_dir; waits until ready
    pg.url                          # postgresql://postgres@127.0.0.1:PORT/postgres (trust auth)
    pg.kill9()                      # SIGKILL the postmaster (a crash); its backends die with it
    pg.start()                      # crash recovery, then ready again; same port
    pg.make_standby_unavailable()   # running but every connection gets SQLSTATE 57P03, until stop()
    pg.stop("fast")                 # sessions ended with 57P01, then down
    pg.close()                      # stop (whatever state) and release the socket directory

Use it with a fixture whose finaliser calls `close()` (tests/conftest.py `pg_instance`), so no
postgres process outlives its test.

Running as root: PostgreSQL refuses to run as root, so initdb and postgres run as the system user
`pgserver` (created if missing), and the path to base_dir is opened to it, exactly as pgserver
itself does (pgserver/postgres_server.py).

"Starting up" on demand (`make_standby_unavailable`): the same data directory started with a
`standby.signal` file and `hot_standby=off` is a server in recovery that waits for WAL for ever and
refuses every connection with SQLSTATE 57P03 ("the database system is not accepting connections",
or "... is starting up" in its first moments), the class of error a client meets while a crashed
server replays its WAL. Unlike a real crash recovery, which lasts milliseconds on a small database,
this state lasts until the test ends it: `stop()` then `start()` brings the primary back (the
standby.signal file is removed on stop).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from tests.ports import free_port as _free_port

INITDB_OPTIONS = ("--encoding=utf8", "--no-sync", "-U", "postgres")
# pg_isready's exit statuses.
READY, REJECTING, NO_RESPONSE = 0, 1, 2
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
# A unix socket path is limited to 107 bytes on Linux; ".s.PGSQL.65535" is 14 of them.
_MAX_SOCKET_DIR = 90


def _until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Wait for `condition` with a deadline (synchronous: start/stop run in a thread or a fixture)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class PgInstance:
    """One PostgreSQL server in `base_dir` (data directory, socket directory, log), started and stopped at will."""

    def __init__(self, base_dir: Path, *, settings: Mapping[str, str] | None = None, port: int | None = None) -> None:
        with warnings.catch_warnings():  # as in imagetraining.db.engine.start_embedded
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from pgserver._commands import POSTGRES_BIN_PATH

        self.base_dir = Path(base_dir).resolve()
        self.data = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.bin = Path(POSTGRES_BIN_PATH)
        # Extra server settings (`-c name=value`); fsync is off because the crashes simulated here are
        # process crashes, after which the kernel still holds every write.
        self.settings = {"fsync": "off", "max_connections": "100", **(settings or {})}
        self._port = port
        self._fixed_port = port is not None
        self._started_once = False
        # How many spawns the latest start() needed (1 unless a restart had to be retried).
        self.start_attempts = 0
        self._socket_dir: Path | None = None
        self._own_socket_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0
        self._user = "pgserver" if os.geteuid() == 0 else None
        atexit.register(self._last_resort)

    # ---- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = _free_port()
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def socket_dir(self) -> Path:
        """base_dir/sock, or a short directory in the temp dir when base_dir is too deep for a socket path."""
        if self._socket_dir is None:
            wanted = self.base_dir / "sock"
            if len(str(wanted)) <= _MAX_SOCKET_DIR:
                wanted.mkdir(parents=True, exist_ok=True)
                self._socket_dir = wanted
            else:
                self._socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))
                self._own_socket_dir = True
            self._give(self._socket_dir)
        return self._socket_dir

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def running(self) -> bool:
        return self.pid is not None

    # ---- lifecycle -----------------------------------------------------------------------------

    def init(self) -> None:
        """initdb into base_dir/data, once (a second call finds PG_VERSION and does nothing)."""
        if (self.data / "PG_VERSION").exists():
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(exist_ok=True)
        self._prepare_root()
        self._give(self.data)
        subprocess.run(
            self._as_user(
                [str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "--auth-local=trust", *INITDB_OPTIONS]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the primary and wait until it accepts connections (after crash recovery, if any).

        The port is chosen free at the first start and kept (clients' URLs stay valid across
        restarts); should another process take it between the choice and the bind, the first
        start picks another.
        """
        self._remove_standby_signal()
        attempts = 5 if self._started_once else 3
        failures: list[str] = []
        for attempt in range(attempts):
            self._spawn({})
            try:
                self._wait_ping(READY, timeout, "PostgreSQL to accept connections")
                self._started_once = True
                self.start_attempts = attempt + 1
                return
            except RuntimeError as exc:
                failures.append(f"attempt {attempt + 1}: {exc}")
                log = self.log_since_start()
                last = attempt == attempts - 1
                if self._started_once and not last:
                    # A restart after a crash: the dead server's last processes may still hold its
                    # shared memory or port for a moment. Try again, as an operator would.
                    self._reap()
                    time.sleep(1.0)  # backoff between start attempts, not a synchronisation
                    continue
                taken = "could not bind" in log or "already in use" in log
                if self._started_once or self._fixed_port or not taken or last:
                    raise RuntimeError("\n".join(failures)) from None
                self._reap()
                self._port = None

    def make_standby_unavailable(self, *, timeout: float = 60.0) -> None:
        """Run the server so that it refuses every connection with SQLSTATE 57P03, until `stop()`.

        Stops a running server first (fast). See the module docstring for how and why.
        """
        if self.running():
            self.stop("fast")
        (self.data / "standby.signal").touch()
        self._give(self.data / "standby.signal")
        self._spawn({"hot_standby": "off"})
        self._wait_ping(REJECTING, timeout, "PostgreSQL to run in recovery, refusing connections")

        def in_standby() -> bool:
            return "entering standby mode" in self.log_since_start()

        _until(in_standby, timeout, "PostgreSQL to enter standby mode")

    def stop(self, mode: str = "fast", *, timeout: float = 60.0) -> None:
        """Shut down with `mode` (smart, fast or immediate) and wait until the postmaster is gone.

        `fast` is what an operator's restart does: every session is ended with SQLSTATE 57P01
        ("terminating connection due to administrator command"). Falls back to SIGKILL after `timeout`.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(_STOP_SIGNALS[mode])
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                return
        self._reap()
        self._remove_standby_signal()

    def kill9(self, *, timeout: float = 30.0) -> None:
        """SIGKILL the postmaster, like a crash, and wait until its processes are gone.

        The backends notice their postmaster's death and exit on their own (ending their clients'
        connections); the shared memory they hold would stop a new postmaster from starting, so
        this waits for them, and SIGKILLs any still there after `timeout`.
        """
        import psutil

        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._reap()
            return
        # Stopped first, so that no backend is forked between listing the children and the kill (one
        # missed would keep the shared memory and stop the next start).
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.kill()
        proc.wait(timeout)
        _gone, alive = psutil.wait_procs(children, timeout=timeout)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(alive, timeout=timeout)
        self._reap()

    def close(self) -> None:
        """Stop the server whatever its state (fast, then SIGKILL) and remove a temporary socket directory."""
        try:
            self.stop("fast", timeout=30.0)
        finally:
            if self._own_socket_dir and self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None
                self._own_socket_dir = False

    def __enter__(self) -> PgInstance:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def log_since_start(self) -> str:
        """What the server logged since its latest start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    # ---- internals -----------------------------------------------------------------------------

    def _spawn(self, extra: Mapping[str, str]) -> None:
        if self.running():
            raise RuntimeError(f"PostgreSQL in {self.data} is already running (pid {self.pid})")
        if not (self.data / "PG_VERSION").exists():
            raise RuntimeError(f"{self.data} is not initialised: call init() first")
        self._reap()
        options = {
            **self.settings,
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "logging_collector": "off",
            **extra,
        }
        args = [str(self.bin / "postgres"), "-D", str(self.data)]
        for name, value in options.items():
            args += ["-c", f"{name}={value}"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._log_offset = self._log.tell()
        self._give(self.log_path)
        self._proc = subprocess.Popen(
            self._as_user(args),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C meant for pytest reaches the test's finaliser, which stops it.
            start_new_session=True,
            cwd=self.data,
        )

    def _as_user(self, args: list[str]) -> list[str]:
        """`args` run as the PostgreSQL user, switched by setpriv after exec (root only).

        Not Popen's `user=`: that calls setreuid in the forked child, between fork and exec, and the
        chaos run starts PostgreSQL from a thread of a process full of threads (asyncio, gRPC); a
        restart there once died with SIGSEGV before PostgreSQL wrote a line, three times in a row.
        setpriv execs PostgreSQL in its place, so the pid is still the postmaster's.
        """
        if self._user is None:
            return args
        return ["setpriv", f"--reuid={self._user}", f"--regid={self._user}", "--init-groups", *args]

    def _ping(self) -> int:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-t", "2"],
            capture_output=True,
            timeout=10,
        )
        return result.returncode

    def _wait_ping(self, wanted: int, timeout: float, what: str) -> None:
        def reached() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(
                    f"PostgreSQL exited (status {self._proc.returncode if self._proc else '?'}) while waiting for "
                    f"{what}; its log since this start:\n{self.log_since_start()[-3000:] or '(nothing)'}"
                )
            return self._ping() == wanted

        try:
            _until(reached, timeout, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; PostgreSQL's log ends:\n{self.log_tail()}") from None

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            if self._proc.poll() is not None:
                self._proc = None
        if self._proc is None and self._log is not None:
            self._log.close()
            self._log = None

    def _remove_standby_signal(self) -> None:
        if not self.running():
            (self.data / "standby.signal").unlink(missing_ok=True)

    def _prepare_root(self) -> None:
        """As root: the `pgserver` user must exist and reach base_dir and the binaries (as pgserver does)."""
        if self._user is None:
            return
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(self._user)
        ensure_prefix_permissions(self.data)
        ensure_prefix_permissions(self.bin)
        read, execute = 0o044, 0o011
        ensure_folder_permissions(self.bin, execute | read)
        ensure_folder_permissions(self.bin.parent / "lib", read)
        self._give(self.base_dir)

    def _give(self, path: Path) -> None:
        """Hand `path` to the user PostgreSQL runs as (root only)."""
        if self._user is None:
            return
        import pwd

        entry = pwd.getpwnam(self._user)
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def _last_resort(self) -> None:
        """At interpreter exit: no postgres process outlives the tests, even when a finaliser did not run."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                self.kill9(timeout=5.0)
