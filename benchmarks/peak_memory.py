"""Run a command and print its wall time and the machine's peak memory growth while it ran.

Flower simulation spreads over detached processes (SuperLink, SuperExec, the simulation process, Ray workers),
so a process-tree RSS misses part of it; this samples system-wide used memory (MemTotal - MemAvailable) every
0.5 s and reports the peak above the level before the command started. Run it on an otherwise idle machine.

    python -m benchmarks.peak_memory -- make demo
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time


def used_bytes() -> int:
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: python -m benchmarks.peak_memory -- <command> [args...]")
    baseline, peak, done = used_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], used_bytes())
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    start = time.time()
    rc = subprocess.call(args)
    done.set()
    gib = 1024 ** 3
    print(f"[peak_memory] rc={rc} wall={time.time() - start:.0f}s baseline={baseline / gib:.2f}GiB "
          f"peak={peak[0] / gib:.2f}GiB growth={(peak[0] - baseline) / gib:.2f}GiB", flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
