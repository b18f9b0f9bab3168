"""Chaos run: faults injected at random into a real cluster while subscribers watch, then everything checked.

    python -m tests.chaos [--quick] [--rounds N] [--images N] [--workers N] [--seed N]
    make chaos          (3 rounds over 10,000+ images)
    make chaos-quick    (1 round; CI runs it)

The cluster is real: a PostgreSQL of its own (tests/pg_instance.py, so it can be killed and
restarted), `python -m control_service` and several `python -m discovery_worker` processes, a
library of at least 10,000 images (plus corrupt files, exact duplicates, and symlinks to files and
folders outside the root), and WatchSession subscribers that reconnect with `after_sequence`.

Each round trains the library as a new session while an injector, every few seconds, picks one of:
kill -9 a worker (the session's owner when it has one), freeze it (SIGSTOP past its lease, then
SIGCONT), kill -9 and restart the control service, kill -9 and restart PostgreSQL, rename the
library away and back (the session must pause as offline; it is resumed once the library is back),
pause and resume as a client. It prints what it injected and how long the session took to make
progress again. After the round it checks, from the database and from the streams:
- the session completed; every image file has exactly one asset and one job; every counter equals
  the jobs table; corrupt files failed with their class, no job failed `vanished`/`unreadable`;
- no job was trained twice (each finished job was written once: `attempts = 1`);
- nothing outside the root was opened (inotify on the outside files, for the whole run);
- every subscriber saw strictly increasing sequences ending in the terminal state with the true counters.
A failed check prints what it found and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagetraining.db.engine import with_database
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests.images import Library, build_library, photo_folders, write_jpeg
from tests.inotify import IN_ACCESS, IN_OPEN, Watch
from tests.pg_instance import PgInstance
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = (pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_CANCELLED, pb.SESSION_STATE_FAILED)
FAULTS = ("kill_worker", "freeze_worker", "restart_control", "restart_database", "library_away", "pause_resume")
LEASE_SECONDS = 4.0
SUBSCRIBERS = 3


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Service:
    """A service process (`python -m control_service` / `discovery_worker`) with its log in a file."""

    def __init__(self, module: str, env: dict[str, str], log: Path) -> None:
        self.module = module
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Injection:
    round: int
    fault: str
    detail: str
    at: float
    recovered_after: float | None = None


@dataclass
class Finding:
    round: int
    problem: str


@dataclass
class Subscriber:
    events: list[pb.SessionEvent] = field(default_factory=list)
    reconnects: int = 0
    heard_at: float = 0.0


async def until(predicate: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = await predicate()
            if value:
                return value
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    def __init__(self, scratch: Path, images: int, workers: int, rng: random.Random) -> None:
        self.scratch = scratch
        self.images = images
        self.worker_count = workers
        self.rng = rng
        self.root = scratch / "library"
        self.outside = scratch / "outside"
        self.pg = PgInstance(scratch / "pg")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers: list[Service] = []
        self.control: Service | None = None
        self.library: Library | None = None
        self.url = ""
        self._spawned = itertools.count()

    # ---- set-up ------------------------------------------------------------------------------

    def build_library(self) -> None:
        lib = build_library(self.root)
        per_folder = 100
        folders = max(1, -(-(self.images - len(lib.image_files)) // per_folder))
        photo_folders(self.root / "bulk", folders=folders, per_folder=per_folder)
        lib.good.extend(sorted((self.root / "bulk").rglob("*.jpg")))
        # Symlinks out of the root: a file and a folder. The walk must refuse them, nothing may open them.
        write_jpeg(self.outside / "secret.jpg", 32, 24, seed=77)
        write_jpeg(self.outside / "folder" / "inner.jpg", 32, 24, seed=78)
        (self.root / "album0" / "escape.jpg").symlink_to(self.outside / "secret.jpg")
        (self.root / "album1" / "escape").symlink_to(self.outside / "folder", target_is_directory=True)
        self.library = lib

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETRAINING_")}
        env.update(
            DATABASE_URL=self.url,
            IMAGETRAINING_LIBRARY_ROOTS=str(self.root),
            IMAGETRAINING_DATA_DIR=str(self.scratch / "data"),
            IMAGETRAINING_CONTROL_ADDRESS=self.address,
            IMAGETRAINING_WORKER_ADDRESS="127.0.0.1:0",
            IMAGETRAINING_LEASE_SECONDS=str(LEASE_SECONDS),
            IMAGETRAINING_HEARTBEAT_SECONDS="0.5",
            IMAGETRAINING_POLL_SECONDS="0.5",
            IMAGETRAINING_POOL_SIZE="1",
            IMAGETRAINING_MAX_ATTEMPTS="100",
            IMAGETRAINING_TRAINER="tests.trainers:PacedTrainer",
            IMAGETRAINING_DATABASE_WAIT_SECONDS="120",
            IMAGETRAINING_GRACE_SECONDS="1",
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            HOME=str(self.scratch),
        )
        return env

    async def start(self) -> None:
        say(f"building a library of {self.images:,} images in {self.root}")
        await asyncio.to_thread(self.build_library)
        await asyncio.to_thread(self.pg.init)
        await asyncio.to_thread(self.pg.start)
        admin = await asyncpg.connect(self.pg.url)
        try:
            await admin.execute('CREATE DATABASE "chaos"')
        finally:
            await admin.close()
        self.url = with_database(self.pg.url, "chaos")
        self.control = await self.start_control()
        for _ in range(self.worker_count):
            self.workers.append(self.start_worker())

    def start_worker(self) -> Service:
        return Service("discovery_worker", self.env(), self.scratch / f"worker{next(self._spawned)}.log")

    async def start_control(self) -> Service:
        control = Service("control_service", self.env(), self.scratch / f"control{next(self._spawned)}.log")

        async def serving() -> bool:
            if not control.alive():
                raise RuntimeError(f"the control service died:\n{control.tail()}")
            async with grpc.aio.insecure_channel(self.address) as channel:
                check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return bool(check.status == health_pb2.HealthCheckResponse.SERVING)

        await until(serving, 120, "the control service to serve")
        return control

    async def stop(self) -> None:
        for service in [*self.workers, *([self.control] if self.control else [])]:
            service.kill()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.pg.stop)

    # ---- database reads (retried: the database itself is one of the things that fails) ---------

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        for attempt in range(600):
            try:
                conn = await asyncpg.connect(self.url, timeout=5)
                try:
                    return list(await conn.fetch(sql, *args))
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if attempt == 599:
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def row(self, sid: int) -> asyncpg.Record:
        return (await self.query("SELECT * FROM training_sessions WHERE id = $1", sid))[0]

    async def owner(self, sid: int) -> Service | None:
        owner = (await self.row(sid))["owner_id"]
        if not owner:
            return None
        pid = int(owner.split(":")[1])
        return next((w for w in self.workers if w.pid == pid and w.alive()), None)

    # ---- RPCs (retried across control restarts) --------------------------------------------------

    async def call(self, method: str, request: Any, *, retry_on: tuple[grpc.StatusCode, ...] = ()) -> Any:
        codes = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, *retry_on)
        for attempt in itertools.count():
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    stub = api_grpc.TrainingSessionServiceStub(channel)
                    return await getattr(stub, method)(request, timeout=10)
            except grpc.aio.AioRpcError as err:
                if err.code() not in codes or attempt > 300:
                    raise
                await asyncio.sleep(0.3)
        raise AssertionError("unreachable")


class Round:
    def __init__(self, cluster: Cluster, number: int, findings: list[Finding], injections: list[Injection]) -> None:
        self.c = cluster
        self.number = number
        self.findings = findings
        self.injections = injections
        self.sid = 0
        self.name = ""
        self.subscribers = [Subscriber() for _ in range(SUBSCRIBERS)]
        self.ended = asyncio.Event()
        self._mark: Callable[[int | None], Awaitable[None]] = self._no_mark

    async def _no_mark(self, before: int | None) -> None:
        return None

    def find(self, problem: str) -> None:
        say(f"FINDING (round {self.number}): {problem}")
        self.findings.append(Finding(self.number, problem))

    async def run(self, gap: tuple[float, float], faults: tuple[str, ...]) -> None:
        c = self.c
        # Every image decodes again in every round (otherwise later rounds reuse the stored hashes).
        await c.query("UPDATE image_assets SET hashed_mtime_ns = NULL")
        tops = sorted(str(p) for p in c.root.iterdir() if p.is_dir())
        created = await c.call("CreateSession", api.CreateSessionRequest(root_path=str(c.root), subdirectories=tops))
        self.name = created.session.name
        self.sid = int(self.name.split("/")[1])
        watchers = [asyncio.create_task(self.watch(s)) for s in self.subscribers]
        await c.call("StartSession", api.StartSessionRequest(name=self.name))
        say(f"round {self.number}: {self.name} started over {len(tops)} folders")
        began = time.monotonic()
        while not await self.terminal():
            await asyncio.sleep(c.rng.uniform(*gap))
            if await self.terminal():
                break
            await self.inject(c.rng.choice(faults))
        say(f"round {self.number}: {(await c.row(self.sid))['state']} after {time.monotonic() - began:.0f} s")
        try:
            await asyncio.wait_for(asyncio.gather(*watchers), timeout=120)
        except TimeoutError:
            self.find("a subscriber did not see the end of the stream within 120 s")
            for w in watchers:
                w.cancel()
        await self.check()

    async def terminal(self) -> bool:
        return (await self.c.row(self.sid))["state"] in ("completed", "failed", "cancelled")

    async def progress(self) -> tuple[int, str]:
        row = await self.c.row(self.sid)
        done = int(row["processed_images"] + row["failed_images"] + row["skipped_images"] + row["images_found"])
        return done, str(row["state"])

    async def inject(self, fault: str) -> None:
        """Inject one fault and time the recovery from the moment the fault is in place (`self.mark`).

        Recovery is progress in the database (a counter moves or the session ends), watched while the
        fault goes on (a takeover during a freeze counts); after a control restart it is every
        subscriber having a message again.
        """
        _, state = await self.progress()
        if state == "paused":
            return
        watcher: asyncio.Task[float | None] | None = None

        async def mark(before: int | None = None) -> None:
            nonlocal watcher
            at = time.monotonic()
            if fault == "restart_control":
                watcher = asyncio.create_task(self._heard_again(at))
            else:
                watcher = asyncio.create_task(self._moved(before, at))

        self._mark = mark
        at = time.monotonic()
        detail = await getattr(self, fault)()
        if watcher is None:
            await mark()
        assert watcher is not None
        if detail is None:
            watcher.cancel()
            return
        injection = Injection(self.number, fault, detail, at)
        self.injections.append(injection)
        try:
            injection.recovered_after = await watcher
        except TimeoutError:
            self.find(f"no recovery within 180 s after {fault} ({detail})")
        say(
            f"round {self.number}: {fault:<16} {detail:<48} recovered after "
            + (f"{injection.recovered_after:5.1f} s" if injection.recovered_after is not None else "never")
        )

    async def _moved(self, before: int | None, at: float) -> float:
        base = before if before is not None else (await self.progress())[0]

        async def moved() -> bool:
            done, now = await self.progress()
            return done > base or now in ("completed", "failed", "cancelled")

        await until(moved, 180, "progress")
        return time.monotonic() - at

    async def _heard_again(self, at: float) -> float:
        async def heard() -> bool:
            return all(sub.heard_at > at for sub in self.subscribers) or await self.terminal()

        await until(heard, 180, "every subscriber to get a message")
        return time.monotonic() - at

    async def mark(self, before: int | None = None) -> None:
        """The fault is in place now: start the recovery clock (`before`: progress read before the fault)."""
        await self._mark(before)

    # ---- the faults ---------------------------------------------------------------------------

    async def _victim(self) -> Service:
        c = self.c
        owner = await c.owner(self.sid)
        return owner or c.rng.choice([w for w in c.workers if w.alive()])

    async def kill_worker(self) -> str:
        c = self.c
        victim = await self._victim()
        victim.kill()
        await self.mark()
        c.workers.remove(victim)
        c.workers.append(c.start_worker())
        return f"kill -9 worker pid {victim.pid}"

    async def freeze_worker(self) -> str:
        victim = await self._victim()
        os.kill(victim.pid, signal.SIGSTOP)
        await self.mark()
        await asyncio.sleep(LEASE_SECONDS + 2)  # the injected fault's length, not a synchronisation
        os.kill(victim.pid, signal.SIGCONT)
        return f"SIGSTOP worker pid {victim.pid} for {LEASE_SECONDS + 2:.0f} s"

    async def restart_control(self) -> str:
        c = self.c
        assert c.control is not None
        old = c.control.pid
        c.control.kill()
        await self.mark()
        c.control = await c.start_control()
        return f"kill -9 control pid {old}, restarted"

    async def restart_database(self) -> str:
        c = self.c
        await asyncio.to_thread(c.pg.kill9)
        # Progress is read again once the database answers (backends commit until the very end, so a
        # figure read before the kill would make the recovery look shorter than it was).
        await self.mark()
        await asyncio.to_thread(c.pg.start)
        retried = f" (started at attempt {c.pg.start_attempts})" if c.pg.start_attempts > 1 else ""
        return f"kill -9 PostgreSQL, restarted (crash recovery){retried}"

    async def library_away(self) -> str | None:
        c = self.c
        away = c.root.with_name("library.away")
        os.rename(c.root, away)
        gone = time.monotonic()
        try:

            async def paused() -> str | None:
                row = await c.row(self.sid)
                return str(row["state"]) if row["state"] in ("paused", "completed", "failed", "cancelled") else None

            try:
                state = await until(paused, 60, "the session to pause as offline")
                noticed = time.monotonic() - gone
            except TimeoutError:
                self.find("the library was away for 60 s and the session did not pause")
                return "library renamed away: no pause"
            row = await c.row(self.sid)
            if state == "paused" and not str(row["state_reason"]).startswith(f"library offline: {c.root}"):
                self.find(f"paused with an unexpected reason: {row['state_reason']!r}")
            if state in ("completed", "failed"):
                self.find(f"the session ended {state} while its library was away")
        finally:
            os.rename(away, c.root)
        if state == "paused":
            await c.call("ResumeSession", api.ResumeSessionRequest(name=self.name))
            await self.mark()
        return f"library away: {state} after {noticed:.1f} s; back, resumed"

    async def pause_resume(self) -> str:
        c = self.c
        try:
            await c.call("PauseSession", api.PauseSessionRequest(name=self.name))
        except grpc.aio.AioRpcError as err:
            return f"PauseSession refused: {err.code().name}"
        await asyncio.sleep(c.rng.uniform(0.2, 1.0))  # how long the client keeps it paused
        await c.call("ResumeSession", api.ResumeSessionRequest(name=self.name))
        await self.mark()
        return "PauseSession, then ResumeSession"

    # ---- subscribers and checks -----------------------------------------------------------------

    async def watch(self, sub: Subscriber) -> None:
        last = 0
        while True:
            try:
                async with grpc.aio.insecure_channel(self.c.address) as channel:
                    stub = api_grpc.TrainingSessionServiceStub(channel)
                    async for response in stub.WatchSession(
                        api.WatchSessionRequest(name=self.name, after_sequence=last)
                    ):
                        sub.events.append(response.event)
                        sub.heard_at = time.monotonic()
                        last = response.event.sequence
                        if response.event.state in TERMINAL:
                            return
            except grpc.aio.AioRpcError:
                pass
            sub.reconnects += 1
            await asyncio.sleep(0.2)  # a client's reconnect backoff

    async def check(self) -> None:
        c = self.c
        lib = c.library
        assert lib is not None
        row = await c.row(self.sid)
        if row["state"] != "completed":
            self.find(f"ended {row['state']}: {row['state_reason']}")
        images = len(lib.image_files)
        jobs = await c.query(
            """
            SELECT count(*) AS n, count(DISTINCT asset_id) AS assets, max(attempts) AS most,
                   count(*) FILTER (WHERE state = 'completed') AS completed,
                   count(*) FILTER (WHERE state = 'failed') AS failed,
                   count(*) FILTER (WHERE state = 'skipped') AS skipped,
                   count(*) FILTER (WHERE state = 'pending') AS pending,
                   count(*) FILTER (WHERE error_class IN ('vanished', 'unreadable')) AS lost
              FROM training_jobs WHERE session_id = $1
            """,
            self.sid,
        )
        j = jobs[0]
        assets = (await c.query("SELECT count(*) AS n FROM image_assets"))[0]["n"]
        expect = {
            "jobs": (j["n"], images),
            "distinct assets of jobs": (j["assets"], images),
            "assets in the database": (assets, images),
            "total_images": (row["total_images"], images),
            "images_found": (row["images_found"], images),
            "processed_images = completed jobs": (row["processed_images"], j["completed"]),
            "failed_images = failed jobs": (row["failed_images"], j["failed"]),
            "skipped_images = skipped jobs": (row["skipped_images"], j["skipped"]),
            "failed jobs = corrupt files": (j["failed"], len(lib.failures)),
            "pending jobs": (j["pending"], 0),
            "jobs lost as vanished or unreadable": (j["lost"], 0),
            "most writes of one job (trained twice?)": (j["most"], 1),
        }
        for what, (got, want) in expect.items():
            if got != want:
                self.find(f"{what}: {got}, expected {want}")
        for i, sub in enumerate(self.subscribers):
            seqs = [e.sequence for e in sub.events]
            if any(a >= b for a, b in itertools.pairwise(seqs)):
                self.find(f"subscriber {i}: sequences not strictly increasing")
            if not sub.events or sub.events[-1].state != pb.SESSION_STATE_COMPLETED:
                self.find(f"subscriber {i}: the stream did not end with COMPLETED")
                continue
            last = sub.events[-1].training
            got = (last.processed_images, last.failed_images, last.skipped_images, last.total_images)
            want = (row["processed_images"], row["failed_images"], row["skipped_images"], row["total_images"])
            if got != want:
                self.find(f"subscriber {i}: last message counters {got}, the database says {want}")
        say(
            f"round {self.number}: checked: {images:,} images, {j['completed']:,} completed, {j['failed']} failed, "
            f"{j['skipped']} skipped; subscribers saw {[len(s.events) for s in self.subscribers]} messages, "
            f"reconnected {[s.reconnects for s in self.subscribers]} times"
        )


async def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    findings: list[Finding] = []
    injections: list[Injection] = []
    with tempfile.TemporaryDirectory(prefix="imagetraining-chaos-") as tmp:
        scratch = Path(tmp)
        os.chmod(scratch, 0o755)
        cluster = Cluster(scratch, args.images, args.workers, rng)
        watch: Watch | None = None
        try:
            await cluster.start()
            watch = Watch(
                [cluster.outside, cluster.outside / "folder", cluster.outside / "secret.jpg"], IN_OPEN | IN_ACCESS
            )
            for number in range(1, args.rounds + 1):
                await Round(cluster, number, findings, injections).run((args.gap_min, args.gap_max), FAULTS)
            opened = watch.events()
            if opened:
                findings.append(Finding(0, f"files outside the library root were opened: {opened[:5]}"))
        except Exception as exc:
            findings.append(Finding(0, f"the run itself failed: {type(exc).__name__}: {exc}"))
            for service in [*cluster.workers, *([cluster.control] if cluster.control else [])]:
                say(f"last lines of {service.log_path.name}:\n{service.tail()}")
        finally:
            if watch is not None:
                watch.close()
            await cluster.stop()
    print()
    print(f"{'round':>5}  {'fault':<16}  {'detail':<60}  {'recovered after':>20}")
    for i in injections:
        after = f"{i.recovered_after:.1f} s" if i.recovered_after is not None else "never"
        print(f"{i.round:>5}  {i.fault:<16}  {i.detail[:60]:<60}  {after:>20}")
    by_fault: dict[str, list[float]] = {}
    for i in injections:
        if i.recovered_after is not None:
            by_fault.setdefault(i.fault, []).append(i.recovered_after)
    print()
    for fault, times in sorted(by_fault.items()):
        times.sort()
        print(f"{fault:<16} n={len(times):<3} median {times[len(times) // 2]:5.1f} s   max {times[-1]:5.1f} s")
    print()
    if findings:
        print(f"FAILED: {len(findings)} finding(s)")
        for f in findings:
            print(f"  round {f.round}: {f.problem}")
        return 1
    print(f"OK: {len(injections)} faults injected over {args.rounds} round(s); every check passed")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round (CI)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--gap-min", type=float, default=3.0, help="seconds between faults, at least")
    parser.add_argument("--gap-max", type=float, default=8.0, help="seconds between faults, at most")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    say(f"chaos: seed {args.seed}, {args.rounds} round(s), {args.images:,} images, {args.workers} workers")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
