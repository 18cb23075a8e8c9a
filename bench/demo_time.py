"""Wall time of `liandong demo`, end to end (set-up, three node processes, scenario, stop).

    python -m bench.demo_time [--runs 3] [--json]

Runs ``python -m node.cli demo`` (what the ``liandong demo`` script runs) ``--runs``
times in a row and prints each wall time and the median. A run that exits non-zero
is reported with its last output lines and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_time", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    times: list[float] = []
    failures: list[dict[str, object]] = []
    for number in range(1, args.runs + 1):
        load = os.getloadavg()[0]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "node.cli", "demo"],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
        seconds = time.monotonic() - started
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-8:]
            failures.append({"run": number, "exit": done.returncode, "tail": tail})
            print(f"run {number}: FAILED (exit {done.returncode}) after {seconds:.2f} s")
            print("  " + "\n  ".join(tail))
            continue
        times.append(seconds)
        if not args.json:
            print(f"run {number}: {seconds:.2f} s   (1-min load average before: {load:.1f})")
    result = {
        "runs": args.runs,
        "seconds": times,
        "median_seconds": statistics.median(times) if times else None,
        "failures": failures,
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    elif times:
        print(f"liandong demo: median {statistics.median(times):.2f} s over {len(times)} run(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
