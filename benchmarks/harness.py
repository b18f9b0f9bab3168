"""What every case needs: a fresh database, generated data, the real services as processes, statistics.

Nothing here asserts on a time: the benchmarks measure and print.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
from PIL import Image

from imagetraining.db.engine import Database, start_embedded, to_libpq_url, with_database
from imagetraining.db.migrate import upgrade
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc

ROOT = Path(__file__).resolve().parent.parent
LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float))) if values else float("nan")


# ---------------------------------------------------------------- database


async def _reachable(url: str) -> bool:
    try:
        conn = await asyncpg.connect(to_libpq_url(url), timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def admin_url(explicit: str | None, scratch: Path) -> tuple[str, str]:
    """(server URL, where it came from): --database-url, DATABASE_URL, 127.0.0.1:5432, or embedded pgserver."""
    if explicit:
        return to_libpq_url(explicit), "--database-url"
    if os.environ.get("DATABASE_URL"):
        return to_libpq_url(os.environ["DATABASE_URL"]), "DATABASE_URL"
    if await _reachable(LOCAL_URL):
        return LOCAL_URL, "127.0.0.1:5432"
    url = await asyncio.to_thread(start_embedded, scratch / "pgdata")
    return url, "embedded pgserver"


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> Any:
    """A new database `imagetraining_bench_<pid>` with the migrations applied; dropped afterwards."""
    name = f"imagetraining_bench_{os.getpid()}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(server_url, name)
    db = Database.connect(url, pool_size=4, max_overflow=4)
    try:
        await upgrade(db.engine)
        yield db
    finally:
        await db.dispose()
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def server_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def reset_sessions(url: str) -> None:
    """Forget every session, job and asset (between repeats, with no worker owning anything)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE training_sessions, image_assets, idempotency_keys RESTART IDENTITY CASCADE")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def session_row(url: str, sid: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow("SELECT * FROM training_sessions WHERE id = $1", sid)
    finally:
        await conn.close()
    assert row is not None
    return dict(row)


# ---------------------------------------------------------------- data


def scratch_parent() -> str | None:
    """RAM-backed /dev/shm when writable (file creation on some disks costs about 1 ms)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="imagetraining-bench-", dir=scratch_parent()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def photo_image(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image that a codec treats like a photograph (smooth field, blobs, grain)."""
    from PIL import ImageChops

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    base = base.resize((width, height), Image.Resampling.BICUBIC)
    bw, bh = max(2, width // 48), max(2, height // 48)
    blobs = Image.fromarray(rng.integers(0, 256, (bh, bw, 3), dtype=np.uint8), "RGB")
    blobs = blobs.resize((width, height), Image.Resampling.BILINEAR)
    picture = Image.blend(base, blobs, 0.25)
    tile = rng.integers(0, 21, (64, 64, 1), dtype=np.uint8)
    grain = np.tile(tile, (-(-height // 64), -(-width // 64), 3))[:height, :width]
    return ImageChops.add(picture, Image.fromarray(np.ascontiguousarray(grain), "RGB"), offset=-10)


def tiny_jpegs(count: int = 64, size: int = 32) -> list[bytes]:
    """`count` distinct small JPEG byte strings, copied to many paths by `make_library`."""
    out = []
    for seed in range(count):
        buf = io.BytesIO()
        photo_image(size, size, seed=10_000 + seed).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


@dataclass
class Library:
    root: Path
    subdirectories: list[str]  # the root's immediate subdirectories (a session selects them all)
    files: int
    folders: int


def make_library(root: Path, files: int, folders: int, blobs: Sequence[bytes], tops: int = 20) -> Library:
    """`files` tiny JPEGs spread evenly over `folders` leaf folders under `tops` top-level folders."""
    tops = max(1, min(tops, folders))
    per_top = -(-folders // tops)
    per_folder = -(-files // folders)
    written = 0
    leaf = 0
    for t in range(tops):
        for f in range(per_top):
            if leaf >= folders or written >= files:
                break
            d = root / f"top{t:02d}" / f"album{f:04d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(min(per_folder, files - written)):
                fd = os.open(d / f"img{i:04d}.jpg", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, blobs[(written * 7 + leaf) % len(blobs)])
                finally:
                    os.close(fd)
                written += 1
            leaf += 1
    subdirs = sorted(str(p) for p in root.iterdir() if p.is_dir())
    return Library(root=root, subdirectories=subdirs, files=written, folders=leaf)


# ---------------------------------------------------------------- services as processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(db_url: str, roots: Sequence[Path], data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETRAINING_")}
    env.update(
        DATABASE_URL=db_url,
        IMAGETRAINING_LIBRARY_ROOTS=os.pathsep.join(str(r) for r in roots),
        IMAGETRAINING_DATA_DIR=str(data_dir),
        IMAGETRAINING_LOG_LEVEL="WARNING",
        IMAGETRAINING_GRACE_SECONDS="1",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra)
    return env


@dataclass
class Service:
    """`python -m control_service` or `python -m discovery_worker`, its output in a log file."""

    module: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def problems(self) -> list[str]:
        """The log's warnings, errors and tracebacks (a benchmark reports them; it asserts nothing)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        words = ("WARNING", "ERROR", "CRITICAL", "Traceback")
        return [line for line in lines if any(w in line for w in words)]

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            for _ in range(150):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def serving(address: str, service: Service) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def up() -> bool:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.module} exited:\n{service.tail()}")
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                check = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
                return bool(check.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError:
            return False

    await wait_for(up, timeout=90, what=f"{service.module} to serve", interval=0.1)


class Cluster:
    """The control service and (on demand) discovery workers, as real processes on one database.

    `worker` is the first worker; `start_worker` again starts more (case 8: one session over many
    workers), each with its own log and any extra environment (IMAGETRAINING_WORKER_ID, ...).
    """

    def __init__(self, db_url: str, roots: Sequence[Path], scratch: Path, *, worker_env: dict[str, str]) -> None:
        self.db_url = db_url
        self.roots = list(roots)
        self.scratch = scratch
        self.worker_extra = worker_env
        self.control: Service | None = None
        self.worker: Service | None = None
        self.extra_workers: list[Service] = []
        self.address = ""
        self._runs = 0

    def env(self, **extra: str) -> dict[str, str]:
        return service_env(self.db_url, self.roots, self.scratch / "data", **extra)

    async def start_control(self, **extra: str) -> str:
        self.address = f"127.0.0.1:{free_port()}"
        self._runs += 1
        self.control = Service(
            "control_service",
            self.env(IMAGETRAINING_CONTROL_ADDRESS=self.address, **extra),
            self.scratch / f"control{self._runs}.log",
        )
        await serving(self.address, self.control)
        return self.address

    async def start_worker(self, **extra: str) -> Service:
        """The first worker (`self.worker`), or one more (`self.extra_workers`) when one runs already."""
        self._runs += 1
        address = f"127.0.0.1:{free_port()}"
        # Quick pickup for the latency cases; a case may set its own (case 8 runs the shipped defaults).
        settings = {
            "IMAGETRAINING_POLL_SECONDS": "0.2",
            "IMAGETRAINING_HEARTBEAT_SECONDS": "0.5",
            "IMAGETRAINING_LEASE_SECONDS": "5",
            "IMAGETRAINING_BATCH_SIZE": "2000",
        }
        env = self.env(IMAGETRAINING_WORKER_ADDRESS=address, **{**settings, **self.worker_extra, **extra})
        service = Service("discovery_worker", env, self.scratch / f"worker{self._runs}.log")
        if self.worker is None:
            self.worker = service
        else:
            self.extra_workers.append(service)
        await serving(address, service)  # pool started, claim loop running
        return service

    async def stop_extra_workers(self) -> None:
        while self.extra_workers:
            await self.extra_workers.pop().stop()

    async def stop_worker(self) -> None:
        await self.stop_extra_workers()
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None

    async def stop(self) -> None:
        await self.stop_worker()
        if self.control is not None:
            await self.control.stop()
            self.control = None


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


async def create_session(stub: api_grpc.TrainingSessionServiceStub, library: Library, name: str = "bench") -> str:
    response = await stub.CreateSession(
        api.CreateSessionRequest(display_name=name, root_path=str(library.root), subdirectories=library.subdirectories)
    )
    return str(response.session.name)


def session_id(name: str) -> int:
    return int(name.split("/")[1])


# ---------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table: a median over repeats, optionally against a baseline from the same run."""

    case: str
    metric: str
    value: float
    unit: str
    samples: list[float] = field(default_factory=list)
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    ratio_kind: str = "x"  # "x": value / baseline; "faster": how many times better than the baseline
    aim: str = ""
    met: bool | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 10_000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def table(rows: Sequence[Row]) -> str:
    header = ("case", "metric", "median", "baseline (same run)", "ratio", "aim", "")
    lines = []
    for r in rows:
        base = f"{r.baseline}: {fmt(r.baseline_value, r.unit)}" if r.baseline else ""
        ratio = ""
        if r.ratio is not None and r.ratio == r.ratio:
            if r.ratio_kind != "faster":
                ratio = f"{r.ratio:.2f}x"
            elif r.ratio >= 100:
                ratio = f"{r.ratio:,.0f}x faster"
            elif r.ratio >= 1:
                ratio = f"{r.ratio:.2f}x faster"
            else:
                ratio = f"{1 / r.ratio:.2f}x SLOWER"
        met = "" if r.met is None else ("met" if r.met else "MISSED")
        lines.append((r.case, r.metric, fmt(r.value, r.unit), base, ratio, r.aim, met))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def render(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [render(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines]
    notes = [f"- {r.case} {r.metric}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["", *notes] if notes else []))


def machine() -> dict[str, Any]:
    import platform

    import grpc as grpc_module
    import PIL
    import sqlalchemy

    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": grpc_module.__version__,
        "pillow": PIL.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "asyncpg": asyncpg.__version__,
        "scratch": scratch_parent() or tempfile.gettempdir(),
    }
