"""The worker's process pool for the training step: CPU work off the event loop, crash-proof.

Why processes: decoding and hashing are CPU-bound Python + C work; on the event loop they would
freeze heartbeats, gRPC streams and pause/cancel (the seed's bug), and threads would serialise on
the GIL for the Python parts. Why this wrapper instead of a bare `ProcessPoolExecutor`:

- Start method: `forkserver` (or `spawn` where forkserver does not exist), never `fork`. The worker
  runs grpc and asyncio threads, and grpc does not support fork. The forkserver preloads only Pillow,
  numpy and imagehash (through `discovery_worker.hashing`), so replacing a dead process is a cheap
  fork of a small clean process rather than a new interpreter. (As with any non-fork start method,
  the program's `__main__` module is imported again in each process unless it was run with `-m`, so
  it must do its work under `if __name__ == "__main__":`.)
- Each process loads the trainer once (initializer), enforces the Pillow policy of
  `discovery_worker.hashing`, lowers its own CPU priority (the parent's event loop must win the CPU
  for heartbeats and streams), ignores SIGINT (the parent shuts the pool down) and exits at once
  when the worker dies, even by SIGKILL (a lifeline pipe), so crash tests leave no orphans.
- A process that dies (segfault in a decoder, `os._exit` in a trainer, the OOM killer) breaks a
  `ProcessPoolExecutor` for good and fails every item queued in it. This pool replaces the executor
  and retries the items that were in flight one at a time, alone in the pool, so the one file that
  kills a process gets `decoder_crash` and every other file its real result. An item that runs
  longer than `item_timeout` gets its process killed the same way and fails alone.
- At most `2 * size` tasks of one `process` call are in the executor at a time: enough to keep every
  process busy, few enough that a crash sends little work down the one-at-a-time path, and a
  cancelled `process` (pause, cancel, shutdown) leaves at most one task per process running. A task
  is one image for photos; small images go several to a task (about GROUP_SECONDS of work, measured
  as the pool runs), because one round trip through the executor's queues costs about as much as a
  thumbnail-sized image. Every image of a task caught in a crash is a suspect and is retried alone.
- Starting and replacing processes happens in a thread (`asyncio.to_thread`), never on the loop.
- One pool can serve several sessions: concurrent `process` calls share the processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from discovery_worker.hashing import ImageResult, configure_pillow, process_batch
from discovery_worker.trainer import load_trainer
from imagetraining import metrics
from imagetraining.vectors import Provenance

if TYPE_CHECKING:
    from discovery_worker.trainer import Trainer

log = logging.getLogger(__name__)

# A crash while the item ran together with others is not proof; after this many crashes it is.
MAX_CRASHES_PER_ITEM: Final = 3
# An image that takes longer than this (a decoder or trainer stuck in a loop) gets its process killed
# and fails as decoder_crash, so no job and no session waits forever.
ITEM_TIMEOUT_SECONDS: Final = 120.0
# How long an isolated retry waits for other calls' items in flight to finish before running anyway.
DRAIN_SECONDS: Final = 30.0
# How long starting a generation of processes (imports + trainer load) may take.
START_TIMEOUT_SECONDS: Final = 120.0
# Small images are sent to a process several at a time, about this much work per task: one round
# trip through the executor's queues costs about what a 32x32 JPEG does, so one image per task
# spent most of the pool's time on traffic. Photos (tens of milliseconds each) still go one by one,
# which keeps crash isolation and cancellation at one image per process for them.
GROUP_SECONDS: Final = 0.02
MAX_GROUP: Final = 16
# Pool processes run at this niceness relative to the worker's event loop.
PROCESS_NICENESS: Final = 5
# Modules the forkserver imports once, so every forked pool process starts with them loaded.
FORKSERVER_PRELOAD: Final = ["discovery_worker.hashing", "discovery_worker.trainer"]


class TrainerLoadError(ValueError):
    """The configured trainer cannot be loaded in the pool processes (a setting to fix, not an image)."""


class PoolStartError(RuntimeError):
    """Pool processes die or hang while starting, before any image is involved."""


class PoolClosedError(RuntimeError):
    """`process` was called on, or interrupted by, a closed pool."""


# ---- inside a pool process -------------------------------------------------------------------

_limits: tuple[int, int] = (0, 0)
_roots: tuple[Path, ...] | None = None
_trainer: Trainer | None = None
_trainer_error: str | None = None


def _watch_parent(lifeline: Connection) -> None:
    """Exit as soon as the worker is gone, even after SIGKILL.

    `lifeline` is the read end of a pipe whose only write end the worker holds and never writes:
    end-of-file means the worker died. Watching `os.getppid()` is not enough: under the forkserver
    the parent is the forkserver, which itself only exits once its children do, and the pool
    processes block forever on the task queue, whose write end they hold themselves.
    """
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()  # returns only at end-of-file: nobody ever writes
    os._exit(0)


def _init_process(
    lifeline: Connection,
    max_file_bytes: int,
    max_image_pixels: int,
    trainer_spec: str,
    roots: tuple[Path, ...] | None = None,
) -> None:
    global _limits, _roots, _trainer, _trainer_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(AttributeError, OSError):  # no os.nice on Windows
        os.nice(PROCESS_NICENESS)
    threading.Thread(target=_watch_parent, args=(lifeline,), name="lifeline", daemon=True).start()
    # Pillow's UserWarnings about damaged metadata ("Corrupt EXIF data", TIFF tags) would flood the
    # worker's stderr; the image's outcome is what counts. The bomb warning is a RuntimeWarning and
    # configure_pillow, called after this, puts its "error" filter in front.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
    configure_pillow(max_image_pixels)
    _limits = (max_file_bytes, max_image_pixels)
    _roots = roots
    try:
        _trainer = load_trainer(trainer_spec)
        _trainer.setup()  # the model is loaded here, once per process
    except ValueError as exc:
        # Reported through _probe, so the parent raises one clear TrainerLoadError instead of
        # seeing processes die in a loop.
        _trainer_error = str(exc)
    except Exception as exc:
        _trainer_error = f"trainer {trainer_spec!r}: setup() failed: {type(exc).__name__}: {exc}"


def _probe() -> tuple[str | None, tuple[Provenance, int] | None]:
    """Run once per process at start: (the trainer error, None) or (None, (provenance, batch size))."""
    if _trainer_error is not None or _trainer is None:
        return _trainer_error or "no trainer", None
    return None, (Provenance.of(_trainer), _trainer.batch_size)


def _work_group(paths: list[str]) -> tuple[list[ImageResult], float]:
    """Several images in one task (one round trip through the executor, one trainer batch); returns
    their CPU time too."""
    if _trainer_error is not None:
        raise TrainerLoadError(_trainer_error)
    started = time.perf_counter()
    results = process_batch(
        paths, max_file_bytes=_limits[0], max_image_pixels=_limits[1], trainer=_trainer, roots=_roots
    )
    return results, time.perf_counter() - started


# ---- in the worker process ---------------------------------------------------------------------


def _mp_context() -> BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the forkserver first starts
        return ctx
    return multiprocessing.get_context("spawn")


@dataclass(eq=False)
class _Generation:
    """One ProcessPoolExecutor; replaced as a whole when one of its processes dies."""

    executor: ProcessPoolExecutor
    number: int
    lifeline: tuple[Connection, Connection]  # (read end for the processes, write end kept here)
    submitted: int = 0
    # Futures not done yet; discarded from the executor's threads, so only len() is read.
    live: set[Future[Any]] = field(default_factory=set)


class _Retry(Exception):
    """The item never ran (its executor was replaced while it waited): submit it again."""


class _Crashed(Exception):
    """The item was in flight when a pool process died."""


class TrainingPool:
    """Runs `process_image` for batches of (job_id, path) in worker processes; see the module doc."""

    def __init__(
        self,
        size: int,
        *,
        max_file_bytes: int,
        max_image_pixels: int,
        trainer_spec: str,
        item_timeout: float = ITEM_TIMEOUT_SECONDS,
        roots: Sequence[Path] | None = None,
        batch_size: int = 0,
    ) -> None:
        if size < 0:
            raise ValueError(f"pool size must be >= 0 (0: one process per CPU), not {size}")
        module, sep, attr = trainer_spec.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"trainer {trainer_spec!r} is not of the form 'module.path:ClassName'")
        self.size: int = size or os.cpu_count() or 1
        self.max_file_bytes = max_file_bytes
        self.max_image_pixels = max_image_pixels
        self.trainer_spec = trainer_spec
        self.item_timeout = item_timeout
        # Images per trainer batch: the setting, or (0) what the trainer asks for (known once started).
        self.batch_size = batch_size
        # Which trainer the processes run (from their start-up probe): what every result was made by.
        self.provenance: Provenance | None = None
        # Files are opened within these (never through a symlink out of them); None: as given (tests).
        self.roots = None if roots is None else tuple(roots)
        # Smoothed seconds of work per image, from the groups' own timing: sizes the next groups.
        self.item_seconds = 0.05
        # Counters for logs and tests: processes that died, generations started.
        self.crashes = 0
        self.generations = 0
        self._ctx = _mp_context()
        self._gen: _Generation | None = None
        self._starting: asyncio.Task[_Generation] | None = None
        self._closed = False
        self._fatal: Exception | None = None
        # Isolation of crash suspects: one at a time, with every other submission held back.
        self._isolation = asyncio.Lock()
        self._open = asyncio.Event()
        self._open.set()

    # -- lifecycle --

    async def start(self) -> None:
        """Start the processes and load the trainer now (otherwise the first `process` does it).

        Raises TrainerLoadError (a ValueError) when the trainer cannot be loaded, PoolStartError
        when processes die while starting.
        """
        await self._generation()

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop the processes: queued items are cancelled, running ones get `grace` seconds, then SIGKILL."""
        self._closed = True
        if self._starting is not None:
            await asyncio.wait([self._starting])  # it sees _closed and shuts its executor down
        gen, self._gen = self._gen, None
        if gen is not None:
            await asyncio.to_thread(_shutdown, gen, grace)

    async def __aenter__(self) -> TrainingPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _generation(self, replace: _Generation | None = None) -> _Generation:
        """The current executor; a new one when there is none or `replace` (a broken one) is current.

        Starting runs in a task shared by every caller, so a caller that is cancelled meanwhile
        (pause, cancel) neither leaks the processes being started nor starts them twice.
        """
        gen = self._gen
        if gen is not None and replace is None and not self._closed:
            return gen
        if self._closed:
            raise PoolClosedError("the training pool is closed")
        if self._fatal is not None:
            raise self._fatal
        if gen is not None and gen is replace:
            self._gen = None
            gen.executor.shutdown(wait=False, cancel_futures=True)  # already broken: does not block
            _close_lifeline(gen)
        elif gen is not None:
            return gen
        if self._starting is None:
            self._starting = asyncio.create_task(self._start_next(), name="training-pool-start")
            self._starting.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._starting)

    async def _start_next(self) -> _Generation:
        try:
            gen = await asyncio.to_thread(self._start_generation, self.generations + 1)
        except TrainerLoadError as exc:
            self._fatal = exc
            raise
        finally:
            self._starting = None
        if self._closed:
            await asyncio.to_thread(_shutdown, gen, 0.0)
            raise PoolClosedError("the training pool is closed")
        self.generations += 1
        metrics.POOL_STARTS.inc()
        self._gen = gen
        return gen

    def _start_generation(self, number: int) -> _Generation:
        """Create an executor and start all its processes (blocking: runs in a thread)."""
        lifeline = self._ctx.Pipe(duplex=False)
        executor = ProcessPoolExecutor(
            max_workers=self.size,
            mp_context=self._ctx,
            initializer=_init_process,
            initargs=(lifeline[0], self.max_file_bytes, self.max_image_pixels, self.trainer_spec, self.roots),
        )
        gen = _Generation(executor=executor, number=number, lifeline=lifeline)
        try:
            # One probe per process: ProcessPoolExecutor starts a process per submit while none is idle.
            probes = [executor.submit(_probe) for _ in range(self.size)]
            answers = [f.result(timeout=START_TIMEOUT_SECONDS) for f in probes]
            errors = {error for error, _info in answers if error}
        except BrokenProcessPool as exc:
            _shutdown(gen, 0.0)
            raise PoolStartError(f"training pool processes die while starting: {exc}") from exc
        except TimeoutError as exc:
            _shutdown(gen, 0.0)
            raise PoolStartError(f"training pool processes did not start within {START_TIMEOUT_SECONDS}s") from exc
        if errors:
            _shutdown(gen, 0.0)
            raise TrainerLoadError(sorted(errors)[0])
        infos = {info for _error, info in answers if info is not None}
        if len(infos) != 1:
            _shutdown(gen, 0.0)
            raise TrainerLoadError(
                f"trainer {self.trainer_spec!r}: the pool processes report different trainers: {infos}"
            )
        provenance, batch = infos.pop()
        self.provenance = provenance
        self.batch_size = self.batch_size or batch
        log.debug("training pool generation %d: %d processes", number, self.size)
        return gen

    # -- work --

    async def process(self, items: Sequence[tuple[int, str]]) -> list[tuple[int, ImageResult]]:
        """One result per (job_id, path), in the order given. Never raises for what an image does.

        Raises TrainerLoadError / PoolStartError for a broken setup and PoolClosedError after close().
        Cancelling the call cancels the items not started yet; at most one per process finishes
        in the background.
        """
        if not items:
            return []
        results: list[ImageResult | None] = [None] * len(items)
        suspects = await self._run_parallel(items, results)
        for i in suspects:
            results[i] = await self._run_isolated(items[i][1])
        out: list[tuple[int, ImageResult]] = []
        for (job_id, _path), result in zip(items, results, strict=True):
            assert result is not None
            out.append((job_id, result))
        return out

    def _group_size(self) -> int:
        """A trainer batch, or more for small images (several per round trip; see GROUP_SECONDS)."""
        return max(self.batch_size, 1, min(MAX_GROUP, int(GROUP_SECONDS / max(self.item_seconds, 1e-4))))

    def _submit_group(self, gen: _Generation, paths: list[str]) -> asyncio.Future[tuple[list[ImageResult], float]]:
        future = gen.executor.submit(_work_group, paths)  # raises BrokenProcessPool if gen is already broken
        gen.submitted += 1
        gen.live.add(future)
        future.add_done_callback(gen.live.discard)
        return asyncio.wrap_future(future)

    def _group_outcome(
        self, future: asyncio.Future[tuple[list[ImageResult], float]], paths: list[str]
    ) -> list[ImageResult]:
        """The results of a finished group; raises _Crashed / _Retry for the pool's own failures."""
        if future.cancelled():
            if self._closed:
                raise PoolClosedError("the training pool was closed while processing")
            raise _Retry
        exc = future.exception()
        if exc is None:
            results, seconds = future.result()
            per_item = seconds / max(len(results), 1)
            self.item_seconds = 0.7 * self.item_seconds + 0.3 * per_item
            return results
        if isinstance(exc, BrokenProcessPool):
            raise _Crashed
        if isinstance(exc, TrainerLoadError):
            raise exc
        # Not an image failure (process_image never raises): e.g. a result that cannot be pickled.
        log.error("training pool: a group of %d images failed outside process_image: %r", len(paths), exc)
        failed = ImageResult(ok=False, error_class="internal", error_message=f"{type(exc).__name__}: {exc}"[:500])
        return [failed for _p in paths]

    async def _run_parallel(self, items: Sequence[tuple[int, str]], results: list[ImageResult | None]) -> list[int]:
        """Run every item with a bounded window of groups in flight; return the indices caught in a crash.

        A group is one image for photos and several for small images (`_group_size`); a crash or a
        timeout makes every image of the groups in flight a suspect, isolated one by one afterwards.
        """
        window = 2 * self.size
        queue = list(range(len(items) - 1, -1, -1))  # a stack: pop() gives items in order
        pending: dict[asyncio.Future[tuple[list[ImageResult], float]], tuple[list[int], _Generation]] = {}
        suspects: list[int] = []
        try:
            while queue or pending:
                while queue and len(pending) < window:
                    if not self._open.is_set():  # another call is isolating a suspect: let it run alone
                        if pending:
                            break
                        await self._open.wait()
                    gen = await self._generation()
                    take = queue[-self._group_size() :][::-1]  # the next items, in order
                    try:
                        future = self._submit_group(gen, [items[i][1] for i in take])
                    except BrokenProcessPool:
                        await self._replace(gen)
                        continue
                    del queue[-len(take) :]
                    pending[future] = (take, gen)
                timeout = self.item_timeout * max(len(t) for t, _g in pending.values())
                done, _ = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    # Stuck: kill the processes; the items in flight fail as crashed and are isolated,
                    # where the one that hangs again is timed out alone.
                    for gen in {g for _i, g in pending.values()}:
                        _kill_processes(gen, f"no image finished within {timeout:g}s")
                    continue
                broken: set[_Generation] = set()
                for future in done:
                    take, gen = pending.pop(future)
                    try:
                        outcome = self._group_outcome(future, [items[i][1] for i in take])
                        for i, result in zip(take, outcome, strict=True):
                            results[i] = result
                    except _Retry:
                        queue.extend(reversed(take))
                    except _Crashed:
                        suspects.extend(take)
                        broken.add(gen)
                for gen in broken:
                    await self._replace(gen)
        finally:
            for future in pending:
                future.cancel()
        suspects.sort()
        return suspects

    async def _replace(self, gen: _Generation) -> None:
        if self._gen is gen:
            self.crashes += 1
            metrics.POOL_CRASHES.inc()
            log.warning("training pool: a process died; replacing the pool (generation %d)", gen.number)
        await self._generation(replace=gen)

    async def _run_isolated(self, path: str) -> ImageResult:
        """Run an item that was in flight during a crash alone, to learn whether it is the cause.

        Alone in the whole pool: other `process` calls stop submitting (`_open`) and what they have
        in flight drains first, so a crash now is proof and one crash is the verdict. If draining
        takes too long (a stuck trainer elsewhere), the item runs anyway and a crash only counts as
        proof after MAX_CRASHES_PER_ITEM of them.
        """
        async with self._isolation:
            self._open.clear()
            try:
                return await self._isolated(path)
            finally:
                self._open.set()

    async def _isolated(self, path: str) -> ImageResult:
        crashes = 0
        while True:
            gen = await self._generation()
            others = tuple(gen.live)  # a copy taken under the GIL; the set shrinks from other threads
            if others:
                await asyncio.wait([asyncio.wrap_future(f) for f in others], timeout=DRAIN_SECONDS)
            if self._gen is not gen:
                continue
            alone = not gen.live
            submitted_before = gen.submitted
            try:
                future = self._submit_group(gen, [path])  # a group of one
            except BrokenProcessPool:
                await self._replace(gen)
                continue
            timed_out = False
            try:
                await asyncio.wait([future], timeout=self.item_timeout)
                if not future.done():
                    timed_out = True
                    _kill_processes(gen, f"{path} did not finish within {self.item_timeout:g}s")
                    await asyncio.wait([future])
            finally:
                future.cancel()  # no-op when done; cancels the queued item if we were cancelled
            try:
                return self._group_outcome(future, [path])[0]
            except _Retry:
                continue
            except _Crashed:
                crashes += 1
                # Proof: nothing else ran in that executor from our submit until it broke.
                certain = alone and gen.submitted == submitted_before + 1
                await self._replace(gen)
                if certain or crashes >= MAX_CRASHES_PER_ITEM:
                    log.warning("training pool: %s kills the decoding process (%d crashes)", path, crashes)
                    if timed_out:
                        message = f"decoding did not finish within {self.item_timeout:g}s; its process was killed"
                    else:
                        message = (
                            "the process decoding this file died (crash, os._exit or out-of-memory kill); "
                            "other files were not affected"
                        )
                    return ImageResult(ok=False, error_class="decoder_crash", error_message=message)


def _shutdown(gen: _Generation, grace: float) -> None:
    """Shut a generation down: cancel what is queued, give running items `grace` seconds, then kill."""
    executor = gen.executor
    # _processes is private, but it is the only handle on the processes for a bounded shutdown.
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(1.0)
    _close_lifeline(gen)


def _kill_processes(gen: _Generation, reason: str) -> None:
    """SIGKILL a generation's processes: the executor then fails its items in flight as broken."""
    log.warning("training pool: %s; killing the pool processes (generation %d)", reason, gen.number)
    for process in list((getattr(gen.executor, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError):
            process.kill()


def _close_lifeline(gen: _Generation) -> None:
    """Closing the write end makes any process of this generation still around exit by itself."""
    for conn in gen.lifeline:
        conn.close()
