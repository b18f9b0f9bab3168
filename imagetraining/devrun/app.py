"""`make run` from start to stop: the settings, the embedded PostgreSQL, both children, the stop.

Behaviour:
- IMAGETRAINING_LIBRARY_ROOTS unset: a small demo library is generated once under the data
  directory (nested folders, ~30 small JPEG/PNG images, one exact duplicate, one non-image) and
  used, and the user is told so.
- Waits (with a deadline) until both servers answer `grpc.health.v1` SERVING, then prints both
  addresses, the library roots and grpcurl lines to try.
- Ctrl-C / SIGTERM / SIGHUP: forwards the signal to both children, waits for their graceful stop
  (a second signal kills them), exits 0.
- A child that dies stops the other; the exit is non-zero and repeats the child's last output
  lines (a settings error is the child's one line naming the variable).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from imagetraining.devrun.banner import CONTROL_SERVICE, WORKER_SERVICE, banner
from imagetraining.devrun.demo import demo_image_count, ensure_demo_library
from imagetraining.devrun.pgdata import forget_dead_handles
from imagetraining.devrun.supervisor import Child, wait_until_serving
from imagetraining.settings import Settings, SettingsError

ROOTS_VARIABLE = "IMAGETRAINING_LIBRARY_ROOTS"
TRAINER_VARIABLE = "IMAGETRAINING_TRAINER"
DEMO_TRAINER = "discovery_worker.trainer:DemoTrainer"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def load_settings(env: dict[str, str]) -> tuple[Settings, Path | None]:
    """Validate the environment with the services' own parser; default the library to the demo.

    Returns the settings and the demo library root when it was used. `env` is updated in place
    with the demo root so that the children see the same value.
    """
    demo: Path | None = None
    if not env.get(ROOTS_VARIABLE, "").strip():
        # Everything but the roots is validated here, to learn where the data directory is.
        probe = Settings.from_env(env, library_roots=())
        demo = ensure_demo_library(probe.data_dir)
        env[ROOTS_VARIABLE] = str(demo)
    settings = Settings.from_env(env)
    settings.validate_worker()
    for variable, address in (
        ("IMAGETRAINING_CONTROL_ADDRESS", settings.control_address),
        ("IMAGETRAINING_WORKER_ADDRESS", settings.worker_address),
    ):
        if address.rpartition(":")[2] == "0":
            raise SettingsError(variable, "make run needs a fixed port to print and check; port 0 is not supported")
    return settings, demo


def child_env(env: dict[str, str], module: str, settings: Settings) -> dict[str, str]:
    """The environment of one child: the worker serves its metrics on the port after the control
    service's (IMAGETRAINING_METRICS_ADDRESS names the control service's), so both can be on."""
    if module != "discovery_worker" or not settings.metrics_address:
        return env
    host, _, port = settings.metrics_address.rpartition(":")
    return {**env, "IMAGETRAINING_METRICS_ADDRESS": f"{host}:{int(port) + 1 if int(port) else 0}"}


def dial_address(listen: str) -> str:
    """Where a local client reaches a server listening on `listen` (wildcards -> loopback)."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::", "*"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def run(ready_timeout: float) -> int:
    env = dict(os.environ)
    try:
        settings, demo = load_settings(env)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if demo is not None:
        paced = not env.get(TRAINER_VARIABLE, "").strip()
        if paced:
            env[TRAINER_VARIABLE] = DEMO_TRAINER
        print(
            f"{ROOTS_VARIABLE} is not set: using the demo library in {demo} "
            f"({demo_image_count()} images in nested folders, one exact duplicate, one non-image file). "
            + (
                f"It trains at a walking pace (0.2 s per image, {DEMO_TRAINER}) so that its progress can be "
                f"watched; set {TRAINER_VARIABLE} for another trainer. "
                if paced
                else ""
            )
            + f"Set {ROOTS_VARIABLE} to use your own directories.",
            flush=True,
        )
    env.setdefault("PYTHONUNBUFFERED", "1")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        if stop.is_set():  # a second Ctrl-C: do not wait for the graceful stop
            for child in children:
                child.signal(signal.SIGKILL)
        stop.set()

    children = [
        Child("control", "control_service", dial_address(settings.control_address), CONTROL_SERVICE),
        Child("worker ", "discovery_worker", dial_address(settings.worker_address), WORKER_SERVICE),
    ]
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)

    pgdata = settings.data_dir / "pgdata"
    if settings.database_url:
        database = f"DATABASE_URL {mask_password(settings.database_url)}"
    else:
        # Joined first here so that initdb runs once, before the children start, and the server
        # lives as long as this supervisor; the children join the same server.
        database = f"embedded PostgreSQL in {pgdata}"
        print(f"starting the embedded PostgreSQL in {pgdata} ...", flush=True)
        from imagetraining.db.engine import start_embedded

        await asyncio.to_thread(forget_dead_handles, pgdata)
        try:
            await asyncio.to_thread(start_embedded, pgdata)
        except Exception as exc:
            print(
                f"error: could not start the embedded PostgreSQL in {pgdata}: {type(exc).__name__}: {exc}; "
                f"its log is {pgdata / 'log'} (or set DATABASE_URL to use another PostgreSQL)",
                file=sys.stderr,
            )
            return 1
    if stop.is_set():
        return 0

    for child in children:
        await child.start(child_env(env, child.module, settings))
    exits = {asyncio.create_task(child.wait()): child for child in children}
    stop_task = asyncio.create_task(stop.wait())
    ready = asyncio.create_task(wait_until_serving(children, settings, time.monotonic() + ready_timeout))

    code = 0
    done, _ = await asyncio.wait({ready, stop_task, *exits}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done and ready.result():
        print(banner(settings, demo, children[0].address, children[1].address, database), flush=True)
        done, _ = await asyncio.wait({stop_task, *exits}, return_when=asyncio.FIRST_COMPLETED)
    elif ready in done:
        code = 1
        print(f"error: the services did not report SERVING within {ready_timeout:.0f} s", file=sys.stderr)
        for child in children:
            print("\n".join(f"  {child.label} | {line}" for line in child.tail), file=sys.stderr)
    ready.cancel()

    died = [task for task in exits if task in done]
    for task in died:
        child = exits[task]
        rc = task.result()
        print(f"error: {child.post_mortem(rc)}", file=sys.stderr)
        code = rc if rc > 0 else 1

    # Forward the signal (SIGTERM when a child died or never became ready) and wait.
    forward: int = received[0] if received else signal.SIGTERM
    for child in children:
        child.signal(forward)
    grace = settings.grace_seconds + 10.0
    for task, child in exits.items():
        try:
            rc = await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            print(f"{child.module} did not stop within {grace:.0f} s: killing it", file=sys.stderr)
            child.signal(signal.SIGKILL)
            rc = await task
        if task not in died and rc not in (0, -forward, -signal.SIGKILL) and code == 0:
            print(f"error: {child.post_mortem(rc)}", file=sys.stderr)
            code = 1
    if any(task.result() == -signal.SIGKILL for task in exits):
        # A killed child never released its handle on the embedded server: release it for it.
        await asyncio.to_thread(forget_dead_handles, pgdata)
    stop_task.cancel()
    if code == 0:
        print("stopped", flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagetraining.devrun",
        description="Run the control service and a discovery worker until Ctrl-C (what `make run` does).",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for both services to report SERVING (default 120)",
    )
    args = parser.parse_args(argv)
    return asyncio.run(run(args.ready_timeout))
