"""One writer per data directory: a second `serve`, or a LocalMemory, on a directory a service holds is refused.

The refusal is one line naming the holder's PID, exit code 2, and the running service is untouched (its ids go
on from where they were; nothing it acknowledged is lost). `memflow-service inspect` reads the directory
beside it, takes no lock and writes nothing. The lock dies with its holder, even by SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from svc_util import REPO, make_entry, make_spec, serve_cmd

from memory_service import LocalMemory
from memory_service.client import MemoryClient
from memory_service.config import BankConfig
from memory_service.errors import PermissionDenied, Unavailable


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMFLOW_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


LOCAL_OPEN = """
import sys
from memory_service import LocalMemory
from memory_service.errors import MemFlowError
try:
    LocalMemory(sys.argv[1]).close()
except MemFlowError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("opened")
"""


def files_of(directory: str) -> dict:
    """Every file under `directory` but LMDB's own (data.mdb changes under a live writer; lock.mdb is
    LMDB's reader table, shared by design): path -> (size, mtime, bytes)."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if name in ("data.mdb", "lock.mdb"):
                continue
            st = os.stat(path)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, f.read())
    return out


@pytest.mark.slow
def test_second_serve_and_local_memory_are_refused_and_inspect_reads_beside(serve, tmp_path):
    bank = str(tmp_path / "bank")
    first = serve(bank)
    with MemoryClient(first.target, plane="stream") as c:
        c.create_stream(make_spec())
        assert c.put("cam0", [make_entry(0), make_entry(1)]) == [0, 1]

        second = run(serve_cmd(bank))
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr  # one clear line, no traceback
        assert f"process {first.proc.pid}" in lines[0] and bank in lines[0], lines[0]

        local = run([sys.executable, "-c", LOCAL_OPEN, bank])
        assert local.returncode == 3, local.stdout + local.stderr
        assert local.stdout.startswith("Unavailable") and f"process {first.proc.pid}" in local.stdout, local.stdout

        before = files_of(bank)
        shown = run([sys.executable, "-m", "memory_service.cli", "inspect", "--data-dir", bank])
        assert shown.returncode == 0, shown.stderr[-3000:]
        rows = [json.loads(line) for line in shown.stdout.splitlines()]
        assert rows[0]["stream"] == "cam0" and rows[0]["entries"] == 2 and rows[-1]["entries"] == 2
        assert files_of(bank) == before  # no snapshot, no lock taken over, the holder's PID still in LOCK

        assert c.put("cam0", [make_entry(2)]) == [2]  # the first service is untouched: ids go on
    assert first.terminate() == 0, first.stderr()[-3000:]

    with LocalMemory(bank) as m:  # free again once the holder is gone
        assert [e.entry_id for e in m.entries("cam0")] == [0, 1, 2]
        with pytest.raises(Unavailable, match=f"process {os.getpid()}"):
            LocalMemory(bank)  # a second writer in the same process is refused the same way
    again = serve(bank)
    with MemoryClient(again.target, plane="stream") as c:
        assert c.put("cam0", [make_entry(3)]) == [3]


@pytest.mark.slow
def test_the_lock_dies_with_a_killed_holder(serve, tmp_path):
    bank = str(tmp_path / "bank")
    first = serve(bank)
    with MemoryClient(first.target, plane="stream") as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(0)])
    first.kill()  # SIGKILL: no close, no unlock
    again = serve(bank)
    with MemoryClient(again.target, plane="stream") as c:
        assert c.put("cam0", [make_entry(1)]) == [1]


def test_inspect_of_a_missing_directory_is_refused_and_creates_nothing(tmp_path):
    missing = tmp_path / "nothing-here"
    r = run([sys.executable, "-m", "memory_service.cli", "inspect", "--data-dir", str(missing)])
    assert r.returncode == 2 and "no memory bank" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not missing.exists()


def test_read_only_local_memory_writes_nothing(tmp_path):
    bank = str(tmp_path / "bank")
    with LocalMemory(bank) as m:
        m.create_stream(make_spec())
        m.put("cam0", [make_entry(0)])
    before = files_of(bank)
    with LocalMemory(bank, read_only=True) as ro:
        assert [e.entry_id for e in ro.entries("cam0")] == [0]
        ro.query("cam0", "emb", make_entry(0).keys["emb"], k=1)  # hits are recorded in memory only
        with pytest.raises(PermissionDenied, match="read-only"):
            ro.put("cam0", [make_entry(1)])
    assert files_of(bank) == before


@pytest.mark.slow
def test_read_only_bank_follows_a_growing_writer(serve, tmp_path):
    """A read-only bank open beside a service keeps reading after the service's LMDB map grows past the size
    the reader mapped (LMDB says MDB_MAP_RESIZED until the reader adopts the new size)."""
    config = tmp_path / "small-map.json"
    config.write_text(json.dumps({"bank": {"map_size": 256 << 10}}))
    bank = str(tmp_path / "bank")
    proc = serve(bank, "--config", str(config))
    with MemoryClient(proc.target, plane="stream") as c:
        c.create_stream(make_spec())
        c.put("cam0", [make_entry(0)])
        with LocalMemory(bank, BankConfig(map_size=256 << 10), read_only=True) as ro:  # maps 256 KiB for now
            want = ro.fetch("cam0", [0]).kv.tobytes()
            for start in range(1, 1001, 100):  # ~2 MiB of keys and K/V: the 256 KiB map doubles several times
                c.put("cam0", [make_entry(i) for i in range(start, start + 100)])
            assert c.stats().map_size >= 4 * (256 << 10)
            assert ro.fetch("cam0", [0]).kv.tobytes() == want


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """flock belongs to the open file, which fork shares: without care a child (a DataLoader worker forked
    from a generator holding a LocalMemory) would hold the directory after its parent closed the bank."""
    bank = str(tmp_path / "bank")
    memory = LocalMemory(bank)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: wait until told, touch nothing
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    try:
        os.close(read_end)
        memory.close()
        other = run([sys.executable, "-c", LOCAL_OPEN, bank])  # while the child still lives
        assert other.returncode == 0 and "opened" in other.stdout, other.stdout + other.stderr
    finally:
        os.write(write_end, b"x")
        os.close(write_end)
        os.waitpid(child, 0)
