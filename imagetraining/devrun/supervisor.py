"""The service processes `make run` supervises: started, relayed, signalled, waited for, health-checked.

Each child is `python -m <module>` with the one shared environment, in a session of its own so that
the terminal's Ctrl-C reaches only the supervisor, which forwards it once; on Linux a child also
gets SIGTERM if the supervisor itself is killed. Its output is relayed with a prefix and its last
lines kept, so that a child that dies can be reported with them (a settings error is the child's
one line naming the variable).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from imagetraining.settings import Settings

_TAIL_LINES = 20


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that makes a child get SIGTERM when this supervisor dies (Linux).

    The children run in a session of their own (see `Child.start`), so if the supervisor is killed
    outright (SIGKILL, OOM) nothing else would stop them. libc and prctl are resolved here, in the
    parent, so the hook itself only makes one system call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


class Child:
    """One service process: output relayed with a prefix, the last lines kept for a post-mortem."""

    def __init__(self, label: str, module: str, address: str, service: str) -> None:
        self.label = label
        self.module = module
        self.address = address
        self.service = service
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.proc: asyncio.subprocess.Process | None = None
        self._relay: asyncio.Task[None] | None = None

    async def start(self, env: Mapping[str, str]) -> None:
        # A session of its own: the terminal's Ctrl-C reaches only the supervisor, which forwards
        # it once, instead of every process receiving it twice.
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
            limit=1 << 20,
        )
        self._relay = asyncio.create_task(self._relay_output())

    async def _relay_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        stream = self.proc.stdout
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit: take what is buffered
                raw = await stream.read(1 << 20)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            print(f"{self.label} | {line}", file=sys.stderr, flush=True)

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._relay is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._relay, 5)
        return code

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def post_mortem(self, code: int) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        lines = list(self.tail) or ["(no output)"]
        return f"{self.module} {how}; its last output:\n" + "\n".join(f"  {line}" for line in lines)


async def _health_status(address: str, settings: Settings, timeout: float) -> str:
    """The grpc.health.v1 status of the whole server at `address`, or why there is none.

    The check of compose's healthchecks (imagetraining.healthcheck): TLS, the certificate's name
    and the auth token as the services' settings say.
    """
    from imagetraining.healthcheck import check

    return (await check(address, settings, timeout=timeout)).status


async def wait_until_serving(children: Sequence[Child], settings: Settings, deadline: float) -> bool:
    """True once every child's server answers SERVING; False when `deadline` (monotonic) comes first."""
    pending = list(children)
    while pending:
        if time.monotonic() >= deadline:
            return False
        for child in list(pending):
            if await _health_status(child.address, settings, timeout=1.0) == "SERVING":
                pending.remove(child)
        if pending:
            await asyncio.sleep(0.2)
    return True
