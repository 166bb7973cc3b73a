"""A query_fetch counts its hits only when the whole call succeeded: a failed one leaves the bank as it was."""

from __future__ import annotations

import pytest

from conftest import make_entry, make_spec

from memory_service.bank import MemoryBank
from memory_service.errors import MemFlowError
from memory_service.store.base import Commit


def test_a_failed_query_fetch_counts_no_hits_and_a_good_one_does(tmp_path):
    bank = MemoryBank(str(tmp_path / "bank"))
    try:
        bank.create_stream(make_spec("cam0"))
        bank.put("cam0", [make_entry(s) for s in range(4)])
        q = make_entry(0).keys["nam"]
        good = bank.query_fetch("cam0", "nam", q, 1)
        assert good.query.ids[0, 0] == 0
        assert {m.entry_id: m.hit_count for m in bank.entries("cam0")}[0] == 1
        s = bank._streams["cam0"]
        with s.lock:  # entry 0's payload goes from under the bank's feet: its fetch will fail after the query
            bank.store.commit(s.layout, Commit(record=s.record(), degrade=((s.entries[0], "keys_only"),)))
        before = {m.entry_id: (m.hit_count, m.last_hit) for m in bank.entries("cam0")}
        with pytest.raises(MemFlowError):
            bank.query_fetch("cam0", "nam", q, 1)
        assert {m.entry_id: (m.hit_count, m.last_hit) for m in bank.entries("cam0")} == before
    finally:
        bank.close()
