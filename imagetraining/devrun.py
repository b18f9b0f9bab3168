"""`make run`: the control service and one discovery worker on this machine, until Ctrl-C.

Why a supervisor instead of two terminals: a first-time user gets a working pair with one command,
on the embedded PostgreSQL, with a library to try it on, and sees exactly what to type next. It
starts `python -m control_service` and `python -m discovery_worker` as child processes with one
shared environment, so they are configured exactly as in production (same variables, same
validation); with DATABASE_URL unset both join one embedded pgserver in IMAGETRAINING_DATA_DIR.

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
import collections
import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import shlex
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from imagetraining.settings import Settings, SettingsError

if TYPE_CHECKING:
    from PIL import Image

CONTROL_SERVICE = "imagetraining.v1.TrainingSessionService"
WORKER_SERVICE = "imagetraining.v1.DiscoveryWorkerService"
ROOTS_VARIABLE = "IMAGETRAINING_LIBRARY_ROOTS"
DEMO_DIR_NAME = "demo-library"
TRAINER_VARIABLE = "IMAGETRAINING_TRAINER"
DEMO_TRAINER = "discovery_worker.trainer:DemoTrainer"
_DEMO_MARKER = ".generated"
_TAIL_LINES = 20
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# (folder, how many images, file extension); sizes and content vary per image.
_DEMO_LAYOUT: tuple[tuple[str, int, str], ...] = (
    ("animals/cats", 4, "jpg"),
    ("animals/dogs", 4, "png"),
    ("animals/birds/parrots", 3, "jpg"),
    ("landscapes/mountains", 4, "jpg"),
    ("landscapes/mountains", 1, "JPG"),  # upper-case extensions count too
    ("landscapes/sea", 4, "jpeg"),
    ("people", 5, "png"),
    ("scans/2024/january", 4, "jpg"),
)
_DEMO_DUPLICATE = ("animals/cats/cats-01.jpg", "landscapes/sea/copy-of-cat.jpg")
_DEMO_NON_IMAGE = "notes.txt"


# --- the demo library -------------------------------------------------------------------------


def _demo_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A small image with seeded shapes on a gradient, distinct enough for perceptual hashes."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size)
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(height - 1, 1)
        draw.line([(0, y), (width, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    for _ in range(rng.randrange(3, 7)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(8, width // 2), y0 + rng.randrange(8, height // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    return image


def demo_image_count() -> int:
    """Image files in the demo library, the duplicate included."""
    return sum(count for _folder, count, _ext in _DEMO_LAYOUT) + 1


def ensure_demo_library(data_dir: Path) -> Path:
    """The demo library under data_dir, generated on first use; returns its root.

    Written to a temporary directory and renamed into place, so an interrupted first run never
    leaves a half library that later runs would take as complete.
    """
    root = data_dir / DEMO_DIR_NAME
    if (root / _DEMO_MARKER).exists():
        return root
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = data_dir / f".{DEMO_DIR_NAME}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    seed = 0
    per_folder: dict[str, int] = collections.Counter()
    for folder, count, ext in _DEMO_LAYOUT:
        directory = staging / folder
        directory.mkdir(parents=True, exist_ok=True)
        stem = folder.split("/")[-1]
        for _ in range(count):
            seed += 1
            per_folder[folder] += 1
            image = _demo_image(seed, (64 + 8 * (seed % 5), 48 + 6 * (seed % 4)))
            path = directory / f"{stem}-{per_folder[folder]:02}.{ext}"
            fmt = "PNG" if ext.lower() == "png" else "JPEG"
            if fmt == "JPEG":
                image.save(path, fmt, quality=85)
            else:
                image.save(path, fmt)
    original, copy = _DEMO_DUPLICATE
    shutil.copyfile(staging / original, staging / copy)
    (staging / _DEMO_NON_IMAGE).write_text(
        "Demo library generated by `make run`: small JPEG and PNG images in nested folders,\n"
        f"one exact duplicate ({copy} is a copy of {original}) and this non-image file.\n"
    )
    (staging / _DEMO_MARKER).write_text("ok\n")
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    return root


# --- settings ---------------------------------------------------------------------------------


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


# --- embedded PostgreSQL handle bookkeeping ---------------------------------------------------


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


# --- child processes --------------------------------------------------------------------------


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
    """The grpc.health.v1 status of the whole server at `address`, or why there is none."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from imagetraining.rpc import channel_credentials

    creds = channel_credentials(settings)
    channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError as err:
        return str(err.code().name)
    finally:
        await channel.close()


async def _wait_until_serving(children: Sequence[Child], settings: Settings, deadline: float) -> bool:
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


# --- the banner -------------------------------------------------------------------------------


def _grpcurl() -> str:
    exe = Path(sys.executable).parent / "grpcurl"
    with contextlib.suppress(ValueError):
        return str(exe.relative_to(Path.cwd()))
    return str(exe)


def _example_selections(root: Path, demo: bool, settings: Settings) -> list[str]:
    if demo:
        return ["animals", "landscapes"]
    from imagetraining.walk import list_subdirectories

    with contextlib.suppress(OSError):
        subdirs, _more = list_subdirectories(str(root), settings.library_roots, limit=2)
        if subdirs:
            return [os.path.basename(s) for s in subdirs]
    return ["."]


def banner(settings: Settings, demo: Path | None, control: str, worker: str, database: str) -> str:
    g = _grpcurl()
    flags = ["-plaintext"]
    if settings.tls_cert_file is not None:
        flags = ["-cacert", str(settings.tls_ca_file or settings.tls_cert_file)]
    if settings.auth_token:
        flags += ["-H", '"authorization: Bearer $IMAGETRAINING_AUTH_TOKEN"']
    flag_text = " ".join(f if f.startswith('"') else shlex.quote(f) for f in flags)
    root = settings.library_roots[0]
    selections = _example_selections(root, demo is not None, settings)
    svc = CONTROL_SERVICE
    name = "sessions/1"

    def call(method: str, body: dict[str, object] | None = None, service: str = svc) -> str:
        data = f"-d {shlex.quote(json.dumps(body))} " if body is not None else ""
        return f"  {g} {flag_text} {data}{control} {service}/{method}"

    roots = os.pathsep.join(str(r) for r in settings.library_roots)
    lines = [
        "",
        "imagetraining is serving (Ctrl-C to stop)",
        f"  control service   {control}   {CONTROL_SERVICE}",
        f"  discovery worker  {worker}   {WORKER_SERVICE}",
        f"  database          {database}",
        f"  library roots     {roots}" + ("   (the generated demo library)" if demo else ""),
        "",
        "Try it with grpcurl (server reflection: no .proto file needed):",
        f"  {g} {flag_text} {control} list",
        call("CreateSession", {"display_name": "first try", "root_path": str(root)}),
        "  # use the name CreateSession returned; a fresh database starts at sessions/1",
        call("UpdateSubdirectories", {"name": name, "selections": [{"path": s, "selected": True} for s in selections]}),
        call("ValidateSession", {"name": name}),
        call("StartSession", {"name": name}),
        call("GetSession", {"name": name}),
        call("WatchSession", {"name": name}),
        "",
    ]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


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
        await child.start(env)
    exits = {asyncio.create_task(child.wait()): child for child in children}
    stop_task = asyncio.create_task(stop.wait())
    ready = asyncio.create_task(_wait_until_serving(children, settings, time.monotonic() + ready_timeout))

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


if __name__ == "__main__":
    raise SystemExit(main())
