"""MemoryClient over several node addresses (routing.RoutedClient) against real single-node MemoryServers.

Real servers on 127.0.0.1 (the make_server fixture); a dead address is a loopback port nobody listens on. What
a bug would break: the client finds the live node and its results are LocalMemory's, bit for bit, on both data
planes; a client whose every node is dead says Unavailable (not a hang, not another class); a write answered
UNAVAILABLE after it was sent is raised and never resent to another node, while a read is; target parsing.
Following NotOwner between the nodes of a real cluster is tested by the cluster tests (tests/cluster/).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from svc_util import DIM, LAYERS, SMALL_ARENA, make_entry, make_spec

from memory_service import LocalMemory
from memory_service.client import MemoryClient, parse_targets
from memory_service.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from memory_service.protocol import METHODS
from memory_service.routing import RoutedClient


def dead_address() -> str:
    """A loopback port that was free a moment ago: nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def kept(meta):
    """An entry's metadata without its clock readings (two banks, two clocks)."""
    return dataclasses.replace(meta, created=0.0, last_hit=0.0, lfu=0.0)


# ---- target parsing ----------------------------------------------------------------------------------------

def test_parse_targets_strings_lists_spaces_and_repeats():
    assert parse_targets("127.0.0.1:5000") == ("127.0.0.1:5000",)
    assert parse_targets("h1:1,h2:2") == ("h1:1", "h2:2")
    assert parse_targets(" h1:1 ,  h2:2 ") == ("h1:1", "h2:2")
    assert parse_targets(["h1:1", "h2:2, h3:3"]) == ("h1:1", "h2:2", "h3:3")
    assert parse_targets(("[::1]:7", "h1:1", "[::1]:7")) == ("[::1]:7", "h1:1")  # order kept, repeats dropped
    for bad in ("", "h1:1,,h2:2", "h1:1,", [], ["h1:1", ""]):
        with pytest.raises(InvalidArgument, match="empty address"):
            parse_targets(bad)
    with pytest.raises(InvalidArgument, match="sequence of"):
        parse_targets(["h1:1", 5])  # type: ignore[list-item]


def test_one_address_builds_the_single_node_client(server):
    for target in (server.address, [server.address], f" {server.address} ", f"{server.address},{server.address}"):
        with MemoryClient(target, plane="stream") as c:
            assert type(c) is MemoryClient and c.target == server.address
            assert c.list_streams() == []


def test_several_addresses_build_a_routed_client_with_the_protocols_signatures(server):
    with MemoryClient(f"{dead_address()}, {server.address}", plane="stream", failover_timeout_s=5) as c:
        assert type(c) is RoutedClient and isinstance(c, MemoryClient)
        assert c.failover_timeout_s == 5 and c.addresses[1] == server.address
    for name in (*METHODS, "arena_array", "arena_usage"):  # each one overridden, none left to the one-node code
        assert name in RoutedClient.__dict__, name
        if name != "close":
            assert inspect.signature(getattr(RoutedClient, name)) == inspect.signature(getattr(MemoryClient, name))


# ---- finding the live node ---------------------------------------------------------------------------------

@pytest.mark.parametrize("plane", ["shm", "stream"])
def test_a_dead_first_node_is_skipped_and_results_are_local_memorys(server, tmp_path, plane):
    entries = [make_entry(i) for i in range(10)]
    q = np.random.default_rng(3).standard_normal((LAYERS, DIM)).astype(np.float32)
    with LocalMemory(str(tmp_path / "local")) as local, \
            MemoryClient([dead_address(), server.address], plane=plane, arena_bytes=SMALL_ARENA,
                         failover_timeout_s=20) as routed:
        assert routed.list_streams() == []
        for m in (local, routed):
            m.create_stream(make_spec())
        assert routed.owner_of("cam0") == server.address
        assert list(routed.nodes()) == [server.address]  # the dead node got no connection of its own
        assert routed.nodes()[server.address].plane == plane
        assert routed.put("cam0", entries[:6]) == local.put("cam0", entries[:6]) == list(range(6))
        assert routed.put("cam0", entries[6:]) == local.put("cam0", entries[6:])
        assert routed.list_streams() == local.list_streams()

        got, want = routed.query("cam0", "nam", q, 4), local.query("cam0", "nam", q, 4)
        assert np.array_equal(got.ids, want.ids) and got.scores.tobytes() == want.scores.tobytes()
        fetched = routed.fetch("cam0", [7, 1, 4], layers=[3, 0])
        assert fetched.ids == (7, 1, 4) and fetched.kv.tobytes() == local.fetch("cam0", [7, 1, 4], [3, 0]).kv.tobytes()
        assert routed.fetch("cam0", list(range(10))).kv.tobytes() == np.stack([e.kv for e in entries]).tobytes()
        both = routed.query_fetch("cam0", "nam", q, 4, resident=[int(want.ids[0, 0])])
        ref = local.query_fetch("cam0", "nam", q, 4, resident=[int(want.ids[0, 0])])
        assert np.array_equal(both.query.ids, ref.query.ids)
        assert [(g.ids, g.layers, g.kv.tobytes()) for g in both.fetched] == \
            [(g.ids, g.layers, g.kv.tobytes()) for g in ref.fetched]

        routed.pin("cam0", [2]), local.pin("cam0", [2])
        assert routed.delete("cam0", [0, 1]) == local.delete("cam0", [0, 1]) == 2
        assert routed.prune("cam0") == local.prune("cam0")
        assert [kept(m) for m in routed.entries("cam0")] == [kept(m) for m in local.entries("cam0")]
        assert routed.stats("cam0") == local.stats("cam0")
        assert routed.stats().streams == local.stats().streams
        assert routed.arena_usage().arenas == (1 if plane == "shm" else 0)
        buf = routed.arena_array((2, 3), np.float32)  # ordinary memory: the owner's connection copies it at put
        assert buf.shape == (2, 3) and buf.dtype == np.float32
        with pytest.raises(NotFound):
            routed.fetch("nope", [0])  # the owner's answer, not a failover
        routed.drop_stream("cam0")
        assert routed.owner_of("cam0") is None and routed.list_streams() == []
    with pytest.raises(Exception, match="closed"):
        routed.list_streams()


def test_every_node_dead_is_unavailable_for_reads_and_writes():
    with MemoryClient([dead_address(), dead_address()], plane="stream", failover_timeout_s=1.0) as routed:
        with pytest.raises(Unavailable, match="cannot be reached"):
            routed.list_streams()
        with pytest.raises(Unavailable, match="cannot be reached"):
            routed.put("cam0", [make_entry(0)])  # never sent anywhere, so Unavailable, not an ambiguous write
        assert routed.nodes() == {}


def test_a_node_that_went_down_is_left_for_the_next(make_server):
    """Stream on A; A stops. A read and a write both go to B (nothing was sent to A: its channel is down), and
    B's answer (it has no such stream) is what the caller gets."""
    a, b = make_server(), make_server()
    with MemoryClient([a.address, b.address], plane="stream", failover_timeout_s=20) as routed:
        routed.create_stream(make_spec())
        assert routed.owner_of("cam0") == a.address
        a.stop(0)
        with pytest.raises(NotFound, match="cam0"):
            routed.query("cam0", "emb", np.ones(make_spec().key_spaces["emb"].dim, np.float32), 1)
        with pytest.raises(NotFound, match="cam0"):
            routed.put("cam0", [make_entry(0)])
        routed.create_stream(make_spec())
        assert routed.owner_of("cam0") == b.address and [s.name for s in routed.list_streams()] == ["cam0"]


def test_a_write_answered_unavailable_after_it_was_sent_is_not_resent(make_server):
    """A draining node answers every call UNAVAILABLE (interceptors.py) after it arrived: for a write the client
    cannot tell that from a node that died mid-call, so it raises and B, which has the same stream, gets nothing;
    a read is resent to B."""
    a, b = make_server(), make_server()
    with MemoryClient(a.address, plane="stream") as ca, MemoryClient(b.address, plane="stream") as cb:
        ca.create_stream(make_spec())
        cb.create_stream(make_spec())
        cb.put("cam0", [make_entry(7)])
    with MemoryClient([a.address, b.address], plane="stream", failover_timeout_s=20) as routed:
        assert routed.stats("cam0").entries == 0  # served by A, now the stream's believed owner
        a.interceptor.draining.set()  # lame duck: connected, answering UNAVAILABLE
        for write in (lambda: routed.put("cam0", [make_entry(1)]), lambda: routed.delete("cam0", [0]),
                      lambda: routed.pin("cam0", [0]), lambda: routed.prune("cam0"),
                      lambda: routed.drop_stream("cam0")):
            with pytest.raises(Unavailable, match="shutting down"):
                write()
        assert routed.stats("cam0").entries == 1  # the read went on to B: its one entry, and no put landed there
        assert routed.owner_of("cam0") == b.address
    with MemoryClient(b.address, plane="stream") as cb:
        assert [e.frame_index for e in cb.entries("cam0")] == [7]


def test_a_paused_node_is_left_after_its_deadline_and_a_write_cut_off_mid_call_is_not_resent(serve, tmp_path):
    """Two `memflow-service serve` processes with a stream of the same name (A: empty, B: one entry). A is
    paused (SIGSTOP): a put to it runs out its deadline, is raised, and the next call starts at B. A second
    client's put is in flight on A when A is killed: it is raised as Unavailable, never sent on to B."""
    a, b = serve(tmp_path / "a"), serve(tmp_path / "b")
    for node, n in ((a, 0), (b, 1)):
        with MemoryClient(node.target, plane="stream") as direct:
            direct.create_stream(make_spec())
            if n:
                direct.put("cam0", [make_entry(s) for s in range(n)])
    with MemoryClient([a.target, b.target], plane="stream", timeout=2.0, failover_timeout_s=20) as first, \
            MemoryClient([a.target, b.target], plane="stream", failover_timeout_s=20) as second:
        assert first.stats("cam0").entries == second.stats("cam0").entries == 0  # both served by A
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DeadlineExceeded):
                first.put("cam0", [make_entry(5)])
            assert first.owner_of("cam0") is None
            assert first.stats("cam0").entries == 1 and first.owner_of("cam0") == b.target

            outcome: list[BaseException] = []

            def put_on_a():
                try:
                    second.put("cam0", [make_entry(6)])
                except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
                    outcome.append(exc)

            writer = threading.Thread(target=put_on_a)
            writer.start()
            time.sleep(2.0)  # let the put reach A's socket (A is paused: it sits there)
            a.kill()
            writer.join(60)
            assert not writer.is_alive() and len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
        finally:
            a.kill()
    with MemoryClient(b.target, plane="stream") as direct:
        assert [e.frame_index for e in direct.entries("cam0")] == [0]  # neither put landed on B
