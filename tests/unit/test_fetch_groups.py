"""MemoryBank.fetch_groups: several fetches of one stream checked together and read in one store view - the same
bytes as one fetch each, and nothing read when any group is refused."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_entry, make_spec

from memory_service.bank import MemoryBank
from memory_service.errors import InvalidArgument, NotFound


@pytest.fixture
def bank(tmp_path):
    b = MemoryBank(str(tmp_path / "bank"))
    b.create_stream(make_spec("cam0"))
    b.put("cam0", [make_entry(s) for s in range(5)])
    yield b
    b.close()


def test_groups_read_the_bytes_one_fetch_each_would(bank):
    groups = [([0, 3], [0, 2]), ([4], [1]), ([1, 2, 0], None)]
    got = bank.fetch_groups("cam0", groups)
    for (ids, layers), res in zip(groups, got):
        one = bank.fetch("cam0", ids, layers)
        assert res.ids == one.ids and res.layers == one.layers
        assert np.array_equal(res.kv.view(np.uint16), one.kv.view(np.uint16))
    assert bank.fetch_groups("cam0", []) == ()


def test_a_refused_group_reads_nothing_into_any_buffer(bank):
    first = bank.fetch("cam0", [0], [0]).kv
    outs = [np.zeros_like(first), np.zeros_like(first)]
    with pytest.raises(NotFound, match=r"no entries \[9\]"):
        bank.fetch_groups("cam0", [([0], [0]), ([9], [0])], outs)
    with pytest.raises(InvalidArgument, match="fetch buffer 1 is"):
        bank.fetch_groups("cam0", [([0], [0]), ([1, 2], [0])], outs)
    assert not any(o.view(np.uint16).any() for o in outs), "a refused call wrote into the caller's buffers"
    bank.fetch_groups("cam0", [([0], [0]), ([1], [0])], outs)
    assert np.array_equal(outs[0].view(np.uint16), first.view(np.uint16))
