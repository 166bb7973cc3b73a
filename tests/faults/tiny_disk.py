"""The `tiny_disk` fixture of the full-disk tests: a real, tiny filesystem to fill up.

A module of its own, imported by name (`from tiny_disk import tiny_disk`), not a conftest.py: every conftest.py
under tests/ is module "conftest", and the tests import the root one's helpers by that name.
"""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs mounted for one test (needs permission to mount: root, as on CI); skips cleanly elsewhere."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
