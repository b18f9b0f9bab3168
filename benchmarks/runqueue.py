"""How long processes wait for a core: CPU use and run-queue wait per second, from /proc schedstat.

    python benchmarks/runqueue.py PID [PATTERN ...]

Samples every 0.5 s until PID exits: PID itself (e.g. a benchmark run) and the first process whose
command line matches each PATTERN (default: "python -m control_service"), found when it appears.
Per process and interval it prints the CPU used (% of one core) and the time its threads spent
runnable but waiting for a core (ms per second), summed over all threads. Linux only. Used for case
2 in docs/performance.md: a latency tail with a high run-queue wait is CPU contention, not work.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time


def _find(pattern: str) -> int | None:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in found if int(p) != os.getpid()]
    return pids[0] if pids else None


def _sample(pid: int) -> tuple[int, int]:
    cpu = wait = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                run_ns, wait_ns, _slices = f.read().split()
        except (OSError, ValueError):
            continue  # the thread ended between glob and open
        cpu += int(run_ns)
        wait += int(wait_ns)
    return cpu, wait


def main() -> None:
    target = int(sys.argv[1])
    patterns = sys.argv[2:] or ["python -m control_service"]
    watched: dict[str, int] = {"pid " + str(target): target}
    previous: dict[int, tuple[int, int]] = {target: _sample(target)}
    last = time.monotonic()
    while os.path.exists(f"/proc/{target}"):
        time.sleep(0.5)
        for pattern in patterns:
            if pattern not in watched and (pid := _find(pattern)) is not None:
                watched[pattern] = pid
                previous[pid] = _sample(pid)
        now = time.monotonic()
        cells = []
        for name, pid in watched.items():
            current = _sample(pid)
            cpu, wait = current[0] - previous[pid][0], current[1] - previous[pid][1]
            previous[pid] = current
            if cpu < 0 or wait < 0:  # the process ended
                continue
            seconds = now - last
            cells.append(f"{name}: cpu {cpu / 1e7 / seconds:5.1f}% run-queue wait {wait / 1e6 / seconds:6.1f} ms/s")
        last = now
        print(time.strftime("%H:%M:%S"), " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
