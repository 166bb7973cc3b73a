"""The etcd Coordinator against real etcd members: catalog, ownership, fencing of dead and paused nodes, lost
leases, member failover. Each test works under a prefix of its own, so tests share one 3-member cluster.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid

import etcd3gw
import pytest
from etcd_servers import EtcdCluster
from ports import free_ports
from etcd_servers import etcd_cluster  # noqa: F401 - the fixture, found by pytest through this name

from memory_service import errors
from memory_service.cluster.etcd import Coordinator, Head, Owner, parse_endpoints

REC = {"name": "cam0", "dim": 32}


def wait_until(pred, what: str, within_s: float = 15.0, every_s: float = 0.05):
    """Poll until pred() is truthy (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {within_s} s")


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}/"


@pytest.fixture
def coords(etcd_cluster, prefix):
    """coords(node_id, **kw) -> a Coordinator on the shared cluster under this test's prefix, closed at the end."""
    made: list[Coordinator] = []

    def make(node_id: str, endpoints=None, **kw) -> Coordinator:
        kw.setdefault("ttl_s", 2)
        c = Coordinator(endpoints or etcd_cluster.endpoints, node_id, prefix=prefix, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# A node in a process of its own: creates a stream, writes one head, then obeys commands on stdin.
NODE = r"""
import json, sys, threading, time
from memory_service import errors
from memory_service.cluster.etcd import Coordinator, Head
endpoints, prefix, name, ttl = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
c = Coordinator(endpoints, "doomed", prefix=prefix, ttl_s=ttl)
lost = threading.Event()
c.on_lost(lost.set)
c.announce("doomed:1")
_, epoch = c.create_stream(name, {"by": "doomed"})
c.advance(name, epoch, Head(0, 0), Head(1, epoch))
first_lease = c.lease_id
print("EPOCH", epoch, flush=True)
for line in sys.stdin:
    if line.strip() == "advance":
        try:
            c.advance(name, epoch, Head(1, epoch), Head(2, epoch))
            print("OK", flush=True)
        except errors.NotOwner as ex:
            print("NOTOWNER", json.dumps({"owner": ex.owner, "message": str(ex)}), flush=True)
    elif line.strip() == "lost":
        fired = lost.wait(15)
        deadline = time.monotonic() + 15
        while c.lease_id == first_lease and time.monotonic() < deadline:  # granted just after on_lost
            time.sleep(0.05)
        print("LOST", fired, c.lease_id != first_lease, flush=True)
"""


def start_node(endpoints, prefix: str, name: str, ttl: float = 1) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(
        [sys.executable, "-c", NODE, json.dumps(endpoints), prefix, name, str(ttl)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    words = read_line(p).split()
    assert words[0] == "EPOCH", words
    return p, int(words[1])


def read_line(p: subprocess.Popen, within_s: float = 30.0) -> str:
    ready, _, _ = select.select([p.stdout], [], [], within_s)
    assert ready, f"node process {p.pid} said nothing within {within_s} s"
    line = p.stdout.readline()
    assert line, f"node process {p.pid} exited (rc {p.poll()})"
    return line.strip()


def test_parse_endpoints():
    assert parse_endpoints(["etcd://127.0.0.1:2379"]) == [("http", "127.0.0.1", 2379)]
    assert parse_endpoints("etcd://a:1,http://b:2, c:3") == [("http", "a", 1), ("http", "b", 2), ("http", "c", 3)]
    with pytest.raises(errors.InvalidArgument, match="not valid"):
        parse_endpoints(["ftp://a:1"])
    with pytest.raises(errors.InvalidArgument, match="no etcd endpoints"):
        parse_endpoints([])


def test_unreachable_etcd_at_start_is_unavailable():
    (port,) = free_ports(1)
    with pytest.raises(errors.Unavailable, match=f"127.0.0.1:{port}"):
        Coordinator([f"etcd://127.0.0.1:{port}"], "n1", timeout_s=0.5)


def test_create_catalog_owner_nodes_claim(coords):
    a, b = coords("A"), coords("B")
    a.announce("a:1")
    b.announce("b:2")
    inc, epoch = a.create_stream("s", REC)
    assert inc == epoch > 0
    for who in (b, a):  # a name is taken cluster-wide, also for its own creator
        with pytest.raises(errors.AlreadyExists, match="'s' already exists in the cluster"):
            who.create_stream("s", {"other": 1})
    assert b.catalog() == {"s": (REC, inc)}
    assert b.stream("s") == (REC, inc) and b.stream("nope") is None
    assert b.owner("s") == Owner("A", "a:1", epoch) and b.owner("nope") is None
    assert b.nodes() == {"A": "a:1", "B": "b:2"}
    assert b.head("s") == Head(0, 0) and b.head("nope") == Head(0, 0)
    assert b.claim("s") is None  # owned by A
    assert a.claim("s") == epoch  # already A's, under its current lease
    with pytest.raises(errors.NotFound, match="'nope' is not in the cluster catalog"):
        b.claim("nope")

    a.close()  # revokes the lease: A's ownership and membership go at once; the catalog stays
    a.close()  # idempotent
    assert a.lost()
    assert b.nodes() == {"B": "b:2"} and b.owner("s") is None
    assert b.catalog() == {"s": (REC, inc)}
    epoch_b = b.claim("s")
    assert epoch_b is not None and epoch_b > epoch
    assert b.owner("s") == Owner("B", "b:2", epoch_b)


def test_advance_compares_owner_epoch_and_head(coords):
    a, b = coords("A"), coords("B")
    a.announce("a:1")
    _, epoch = a.create_stream("s", REC)
    a.advance("s", epoch, Head(0, 0), Head(1, epoch))
    a.advance("s", epoch, Head(1, epoch), Head(2, epoch))
    assert b.head("s") == Head(2, epoch)
    with pytest.raises(errors.NotOwner, match="head moved") as ex:  # a stale expected head
        a.advance("s", epoch, Head(1, epoch), Head(3, epoch))
    assert ex.value.owner == "a:1"
    with pytest.raises(errors.NotOwner, match="lost stream 's'"):  # a wrong epoch
        a.advance("s", epoch + 1000, Head(2, epoch), Head(3, epoch))
    with pytest.raises(errors.NotOwner, match="node 'B' lost stream 's'") as ex:  # not the owner's node_id
        b.advance("s", epoch, Head(2, epoch), Head(3, epoch))
    assert ex.value.owner == "a:1"
    assert b.head("s") == Head(2, epoch)  # none of the rejected writes moved it


def test_a_fresh_head_may_be_named_with_the_owners_epoch(coords):
    a = coords("A")
    _, epoch = a.create_stream("s", REC)
    assert a.head("s") == Head(0, 0)
    a.advance("s", epoch, Head(0, epoch), Head(1, epoch))  # "nothing committed yet", as its creator knows it
    assert a.head("s") == Head(1, epoch)
    with pytest.raises(errors.NotOwner, match="head moved"):  # but never once something was committed
        a.advance("s", epoch, Head(0, epoch), Head(2, epoch))
    _, epoch_t = a.create_stream("t", REC)
    a.advance("t", epoch_t, Head(0, 0), Head(0, epoch_t))  # a head stored as Head(0, epoch) also matches itself
    a.advance("t", epoch_t, Head(0, epoch_t), Head(1, epoch_t))
    assert a.head("t") == Head(1, epoch_t) and a.head("s") == Head(1, epoch)


def test_killed_owner_is_fenced_and_replaced(etcd_cluster, coords, prefix):
    p, epoch = start_node(etcd_cluster.endpoints, prefix, "s")
    try:
        b = coords("B")
        b.announce("b:2")
        assert b.owner("s") == Owner("doomed", "doomed:1", epoch)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        wait_until(lambda: b.owner("s") is None, "the killed owner's lease expires")
        assert "doomed" not in b.nodes()
        epoch_b = b.claim("s")
        assert epoch_b is not None and epoch_b > epoch
        assert b.head("s") == Head(1, epoch)  # what the dead owner committed stays
        b.advance("s", epoch_b, Head(1, epoch), Head(2, epoch_b))

        # the dead node's late writes, from a process that still believes it is node "doomed" at its old epoch
        zombie = coords("doomed")
        for expected in (Head(1, epoch), Head(2, epoch_b)):  # neither the head it knew nor the current one helps
            with pytest.raises(errors.NotOwner, match=f"node 'doomed' lost stream 's' at epoch {epoch}") as ex:
                zombie.advance("s", epoch, expected, Head(9, epoch))
            assert ex.value.owner == "b:2"
        with pytest.raises(errors.NotOwner):
            zombie.drop_stream("s", epoch)
        zombie.release("s", epoch)  # a no-op: the key is B's now
        assert b.head("s") == Head(2, epoch_b)
        assert b.owner("s") == Owner("B", "b:2", epoch_b)
        assert b.catalog() == {"s": ({"by": "doomed"}, epoch)}
    finally:
        p.kill()
        p.wait()


def test_paused_owner_is_fenced_when_it_resumes(etcd_cluster, coords, prefix):
    p, epoch = start_node(etcd_cluster.endpoints, prefix, "s")
    try:
        b = coords("B")
        b.announce("b:2")
        os.kill(p.pid, signal.SIGSTOP)  # paused past its lease: it cannot know it lost it
        wait_until(lambda: b.owner("s") is None, "the paused owner's lease expires")
        epoch_b = b.claim("s")
        assert epoch_b is not None and epoch_b > epoch
        b.advance("s", epoch_b, Head(1, epoch), Head(5, epoch_b))
        os.kill(p.pid, signal.SIGCONT)
        p.stdin.write("advance\n")
        p.stdin.flush()
        verdict, _, detail = read_line(p).partition(" ")
        assert verdict == "NOTOWNER", (verdict, detail)
        assert json.loads(detail)["owner"] == "b:2"
        p.stdin.write("lost\n")
        p.stdin.flush()
        assert read_line(p) == "LOST True True"  # on_lost fired, and it holds a new lease
        assert b.head("s") == Head(5, epoch_b)  # only the new owner's write is visible
        wait_until(lambda: "doomed" in b.nodes(), "the resumed node re-announces under its new lease")
        assert b.owner("s") == Owner("B", "b:2", epoch_b)
    finally:
        p.kill()
        p.wait()


def test_revoked_lease_is_lost_then_replaced(etcd_cluster, coords):
    a = coords("A", ttl_s=2)
    seen: list[bool] = []
    a.on_lost(lambda: seen.append(a.lost()))
    a.announce("a:1")
    _, epoch = a.create_stream("s", REC)
    old = a.lease_id
    assert not a.lost()
    other = etcd3gw.client(host="127.0.0.1", port=etcd_cluster.client_ports[1], api_path="/v3/", timeout=5)
    other.post(other.get_url("/kv/lease/revoke"), json={"ID": old})  # out from under it
    wait_until(lambda: seen, "on_lost is called")
    assert seen == [True]  # lost() was already True inside the callback
    wait_until(lambda: a.lease_id != old and not a.lost(), "a new lease is granted")
    wait_until(lambda: a.nodes().get("A") == "a:1", "the node re-announces")
    assert a.owner("s") is None  # not re-claimed by itself
    with pytest.raises(errors.NotOwner, match="lost stream 's'"):
        a.advance("s", epoch, Head(0, 0), Head(1, epoch))
    epoch2 = a.claim("s")  # but it may own streams again
    assert epoch2 is not None and epoch2 > epoch
    a.advance("s", epoch2, Head(0, 0), Head(1, epoch2))
    assert a.head("s") == Head(1, epoch2) and seen == [True]


def test_an_announce_under_an_expired_lease_is_made_under_the_next_one(etcd_cluster, coords):
    """A lease that lapses just before the node announces (a server starting on a loaded machine) is not an error:
    the node announces under the lease the keepalive thread grants next."""
    a, b = coords("A", ttl_s=2), coords("B")
    old = a.lease_id
    other = etcd3gw.client(host="127.0.0.1", port=etcd_cluster.client_ports[1], api_path="/v3/", timeout=5)
    other.post(other.get_url("/kv/lease/revoke"), json={"ID": old})
    a.announce("a:1")  # raised Unavailable ("a new one is being granted: retry") before
    wait_until(lambda: b.nodes().get("A") == "a:1", "the node is announced under its next lease")
    assert a.lease_id != old and not a.lost()


def test_unreachable_etcd_means_lost_then_recovers(tmp_path, prefix):
    solo = EtcdCluster(tmp_path / "solo", n=1)
    try:
        a = Coordinator(solo.endpoints, "A", ttl_s=2, timeout_s=0.5, prefix=prefix)
        lost_calls: list[int] = []
        a.on_lost(lambda: lost_calls.append(1))
        a.announce("a:1")
        solo.kill(0)
        wait_until(a.lost, "lost() once the lease cannot be refreshed")
        wait_until(lambda: lost_calls, "on_lost is called")
        with pytest.raises(errors.Unavailable, match="etcd unreachable"):
            a.head("s")
        solo.restart(0)
        wait_until(lambda: not a.lost(), "a new lease once etcd is back")
        wait_until(lambda: a.nodes() == {"A": "a:1"}, "the node re-announces")
        assert lost_calls == [1]
        a.close()
    finally:
        solo.stop()


@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_calls_fail_over_when_a_member_dies(etcd_cluster, coords, victim):
    leader = etcd_cluster.leader()
    dead = leader if victim == "leader" else next(i for i in range(3) if i != leader)
    # the member it talks to first is the one that dies; a leader's death also costs an election
    endpoints = [etcd_cluster.endpoints[dead]] + [e for i, e in enumerate(etcd_cluster.endpoints) if i != dead]
    a = coords("A", endpoints=endpoints, ttl_s=5, timeout_s=10)
    lost_calls: list[int] = []
    a.on_lost(lambda: lost_calls.append(1))
    a.announce("a:1")
    _, epoch = a.create_stream("s", REC)
    a.advance("s", epoch, Head(0, 0), Head(1, epoch))
    etcd_cluster.kill(dead)
    try:
        for seq in range(2, 6):
            a.advance("s", epoch, Head(seq - 1, epoch), Head(seq, epoch))
        assert a.head("s") == Head(5, epoch)
        assert a.owner("s") == Owner("A", "a:1", epoch)
        assert a.catalog() == {"s": (REC, epoch)} and a.nodes() == {"A": "a:1"}
        _, epoch2 = a.create_stream("t", REC)
        a.drop_stream("t", epoch2)
        assert not a.lost() and lost_calls == []
    finally:
        etcd_cluster.restart(dead)


def test_drop_stream_and_release(coords):
    a, b = coords("A"), coords("B")
    inc, epoch = a.create_stream("s", REC)
    a.advance("s", epoch, Head(0, 0), Head(3, epoch))
    with pytest.raises(errors.NotOwner, match="node 'B' lost stream 's'"):
        b.drop_stream("s", epoch)
    a.drop_stream("s", epoch)
    assert b.catalog() == {} and b.owner("s") is None and b.head("s") == Head(0, 0)
    with pytest.raises(errors.NotFound):
        a.drop_stream("s", epoch)
    inc2, epoch2 = b.create_stream("s", REC)  # the name is free again: a new incarnation
    assert inc2 > inc
    b.release("s", epoch2)
    assert a.owner("s") is None and a.stream("s") == (REC, inc2)
    epoch3 = a.claim("s")
    assert epoch3 is not None and epoch3 > epoch2
    b.release("s", epoch2)  # B's old epoch: leaves A's ownership alone
    assert b.owner("s") == Owner("A", "", epoch3)  # A never announced an address
