"""A drop that committed is answered OK: removing the stream's index snapshots afterwards is best effort, and a
snapshot that cannot be removed is logged, never raised (the client would take a committed drop for a failed
one). A real bank, a real LMDB directory."""

from __future__ import annotations

import logging
import os

from conftest import make_entry, make_spec

from memory_service import LocalMemory


def test_a_committed_drop_is_not_failed_by_a_snapshot_it_cannot_remove(tmp_path, caplog):
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(make_spec())
        m.put("cam0", [make_entry(i) for i in range(3)])
        sid = m.bank._streams["cam0"].sid
        # a snapshot path os.remove refuses (a directory), even for root
        os.makedirs(os.path.join(str(tmp_path), "snapshots", f"stream{sid}-space0.npz", "x"))
        caplog.set_level(logging.WARNING, logger="memflow.bank")
        m.drop_stream("cam0")  # committed: no error
        assert [s.name for s in m.list_streams()] == []
        assert any("its index snapshots stay on disk" in r.getMessage() for r in caplog.records)
        m.create_stream(make_spec())  # the name is free again, with a fresh id
        assert m.stats("cam0").entries == 0
    with LocalMemory(str(tmp_path)) as m:  # and the drop survives a reopen
        assert m.stats("cam0").entries == 0
