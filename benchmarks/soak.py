"""Soak: the long forms of the reliability tests, as the outside harness of issue 10 ran them.

Runs, with MEMFLOW_SOAK=1 (the same tests `make test` runs, at their short scale):
- tests/faults/test_server_kill.py - 50 SIGKILLs of `memflow-service serve` under writes on both data planes
  while the LMDB map grows from 1 MiB; every acknowledged entry checked bit for bit after the restarts;
- tests/service/test_load.py - 32 clients (both planes) x 4 streams of mixed put / query / fetch / delete for
  75 s, with exact final counts;
- tests/faults/test_disk_full.py - the full-disk tests (a 4 MiB tmpfs; skipped where tmpfs cannot be mounted).
Prints the JSON lines the tests print (one per kill round and a summary per test) and one line per test file
with its outcome; exits non-zero if any failed. Takes about 5 minutes on 2 cores.

    python benchmarks/soak.py [--only kill|load|disk]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = {
    "kill": "tests/faults/test_server_kill.py",
    "load": "tests/service/test_load.py",
    "disk": "tests/faults/test_disk_full.py",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(TESTS), action="append", help="run only these (repeatable)")
    args = ap.parse_args()
    env = dict(os.environ, MEMFLOW_SOAK="1")
    failed = 0
    for name in args.only or list(TESTS):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                               "-o", "timeout=1800", TESTS[name]], cwd=REPO, env=env, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
        ok = proc.returncode == 0
        failed += not ok
        print(json.dumps({"soak": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 1),
                          "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""}), flush=True)
        if not ok:
            sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-2000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
