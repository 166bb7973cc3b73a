"""Stream ownership, fenced log heads and node membership, in etcd (through etcd3gw's HTTP/JSON gateway).

Owns every key under the prefix (default "memflow/"):
  nodes/<node_id>   {"address", "pid", "since"} under the node's lease: membership, gone when the node is
  streams/<name>    the stream record (the catalog); its create revision is the stream's *incarnation*
  owners/<name>     the owner's node_id under the owner's lease; its create revision is the owner's *epoch*
  heads/<name>      {"epoch": E, "seq": N} (canonical JSON): how far the stream's log is committed, and by whom

Promises:
- Fencing. Every change to a stream's shared state (`advance`, `drop_stream`) is one etcd transaction that
  compares owners/<name>'s create revision with the caller's epoch and its value with the caller's node_id: a
  node whose lease expired (killed, paused, partitioned) can never write again, because its key is gone and a
  new owner's key has a higher create revision. `advance` also compares the head, so two writers can never both
  move it from the same place.
- `lost()` errs towards True: it is True from the moment this node cannot prove its lease alive (no successful
  refresh sent within ttl_s), before etcd itself may have expired it. `on_lost` callbacks run once per lost
  lease, from the keepalive thread; then a new lease is granted and the node re-announces. Streams owned under
  the old lease stay lost: the node claims them again (with a new, higher epoch) if it wants them.
- Bounded: each call gives up after timeout_s with `errors.Unavailable`, trying every member it was given and
  remembering the one that answered. A retried transaction whose first try may have been applied is recognised
  (the state it left is ours) and not reported as a conflict.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as gw_errors

from memory_service import errors

log = logging.getLogger(__name__)

# gateway answers that mean "this member cannot serve now" (no leader, leader changed, shutting down, overloaded):
# another member may; any other error status is etcd's definite answer to the request itself
_RETRYABLE = (gw_errors.ConnectionFailedError, gw_errors.ConnectionTimeoutError, gw_errors.InternalServerError)


@dataclass(frozen=True)
class Owner:
    """Who owns a stream: `address` is "" when the node has not announced one."""

    node_id: str
    address: str
    epoch: int


@dataclass(frozen=True)
class Head:
    """How far a stream's log is committed (`seq`) and the epoch of the owner that committed it."""

    seq: int = 0
    epoch: int = 0

    def canonical(self) -> str:
        # the transaction compares bytes, so one spelling only
        return json.dumps({"epoch": self.epoch, "seq": self.seq}, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def parse(raw: str) -> Head:
        d = json.loads(raw)
        return Head(seq=int(d["seq"]), epoch=int(d["epoch"]))


class _LeaseGone(Exception):
    """etcd says the lease named in a request no longer exists."""


def parse_endpoints(endpoints: Sequence[str] | str) -> list[tuple[str, str, int]]:
    """'etcd://h:p', 'http(s)://h:p' or 'h:p', one per item or comma-separated -> [(protocol, host, port)]."""
    items = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    out = []
    for item in items:
        for ep in (e.strip() for e in item.split(",")):
            if not ep:
                continue
            u = urlsplit(ep if "://" in ep else "http://" + ep)
            scheme = {"etcd": "http", "http": "http", "https": "https"}.get(u.scheme)
            try:
                port = u.port or 2379
            except ValueError:
                port = None
            if scheme is None or not u.hostname or port is None:
                raise errors.InvalidArgument(
                    f"etcd endpoint {ep!r} is not valid: expected etcd://HOST:PORT or http(s)://HOST:PORT"
                )
            out.append((scheme, u.hostname, port))
    if not out:
        raise errors.InvalidArgument(f"no etcd endpoints in {endpoints!r}: expected etcd://HOST:PORT[,...]")
    return out


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def _cmp(key: str, target: str, value: Any, result: str = "EQUAL") -> dict:
    field = {"CREATE": "create_revision", "VALUE": "value"}[target]
    return {"key": _b64(key), "target": target, "result": result, field: _b64(value) if target == "VALUE" else value}


def _put(key: str, value: str, lease: int = 0) -> dict:
    req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def _get(key: str) -> dict:
    return {"request_range": {"key": _b64(key)}}


def _delete(key: str) -> dict:
    return {"request_delete_range": {"key": _b64(key)}}


def _kv(response: dict) -> Optional[dict]:
    """The one key-value of a txn's range response (value decoded, revisions as ints), or None when absent."""
    kvs = response.get("response_range", {}).get("kvs", [])
    if not kvs:
        return None
    kv = kvs[0]
    return {
        "value": _unb64(kv.get("value", "")),
        "create_revision": int(kv.get("create_revision", 0)),
        "lease": int(kv.get("lease", 0)),
    }


class Coordinator:
    """One node's view of the cluster: its lease (kept alive by a daemon thread), ownership, heads, membership."""

    def __init__(
        self,
        endpoints: Sequence[str],
        node_id: str,
        *,
        ttl_s: float = 5.0,
        prefix: str = "memflow/",
        timeout_s: float = 2.0,
    ) -> None:
        if not node_id:
            raise errors.InvalidArgument("node_id is empty: expected a name unique in the cluster")
        if ttl_s <= 0 or timeout_s <= 0:
            raise errors.InvalidArgument(f"ttl_s={ttl_s}, timeout_s={timeout_s}: expected both > 0")
        self.node_id = node_id
        self._prefix = prefix
        self._ttl_s = float(ttl_s)
        self._lease_ttl = max(1, math.ceil(ttl_s))  # etcd takes whole seconds (and may raise it to its minimum)
        self._timeout_s = float(timeout_s)
        targets = parse_endpoints(endpoints)
        self._endpoints = [f"{p}://{h}:{port}" for p, h, port in targets]
        self._targets = targets
        # etcd answers in milliseconds; a member that takes a second is stuck (no leader, paused, partitioned), and
        # another member, or the same one a moment later, is the better bet: a try never eats the whole budget
        self._per_try = self._timeout_s if len(targets) == 1 else min(1.0, self._timeout_s / 2)
        # the keepalive thread has sessions (connection pools) of its own: callers' requests never delay a refresh
        self._sessions = [[requests.Session() for _ in targets] for _ in range(2)]
        self._preferred = [0, 0]  # per session set: the member that answered last
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._regained: list[Callable[[], None]] = []
        self._address: Optional[str] = None
        self._announced_lease = 0
        self._lost_flag = False
        try:
            self.lease_id, self._last_ok = self._grant()
        except _LeaseGone as ex:  # cannot happen for a grant; keeps the types honest
            raise errors.Unavailable(str(ex)) from ex
        self._thread = threading.Thread(target=self._keepalive, name=f"etcd-keepalive-{node_id}", daemon=True)
        self._thread.start()

    # -- transport ---------------------------------------------------------------------------------------------

    def _post(self, path: str, body: dict, *, keepalive: bool = False, budget_s: Optional[float] = None) -> tuple:
        """POST to the first member that answers within the budget -> (json, retried: an earlier try failed)."""
        which = 1 if keepalive else 0
        deadline = time.monotonic() + (self._timeout_s if budget_s is None else budget_s)
        start, n, tries, last = self._preferred[which], len(self._targets), 0, None
        while True:
            i = (start + tries) % n
            protocol, host, port = self._targets[i]
            # a client per try (it is only a URL and a timeout around the shared session): no try outlasts the budget
            timeout = max(0.05, min(self._per_try, deadline - time.monotonic()))
            client = etcd3gw.client(host=host, port=port, protocol=protocol, timeout=timeout, api_path="/v3/",
                                    session=self._sessions[which][i])  # fmt: skip
            try:
                out = client.post(client.get_url(path), json=body)
                self._preferred[which] = i
                return out, tries > 0
            except _RETRYABLE as ex:
                last = f"{self._endpoints[i]}: {type(ex).__name__} {ex.detail_text or ''}".strip()
            except gw_errors.Etcd3Exception as ex:
                detail = ex.detail_text or ""
                if "lease not found" in detail:
                    raise _LeaseGone(detail) from ex
                if "429" in str(ex.args) or "Too Many Requests" in str(ex.args):
                    last = f"{self._endpoints[i]}: {detail}"
                else:
                    raise errors.Unavailable(f"etcd at {self._endpoints[i]} refused {path}: {detail}") from ex
            except (requests.RequestException, ValueError) as ex:  # a torn or garbled answer: try another member
                last = f"{self._endpoints[i]}: {type(ex).__name__} {ex}"
            tries += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.Unavailable(
                    f"etcd unreachable: no member of {', '.join(self._endpoints)} answered {path} within "
                    f"{self._timeout_s if budget_s is None else budget_s:.1f} s (node {self.node_id!r}; last: {last})"
                )
            if tries % n == 0:  # every member failed once: give a new leader a moment
                time.sleep(min(0.1, left))

    def _txn(self, compare: list, success: list, failure: list) -> tuple[bool, int, list, bool]:
        """One transaction -> (succeeded, revision after it, responses of the branch taken, retried)."""
        out, retried = self._post("/kv/txn", {"compare": compare, "success": success, "failure": failure})
        return bool(out.get("succeeded", False)), int(out["header"]["revision"]), out.get("responses", []), retried

    def _range(self, key: str, *, prefix: bool = False) -> list[tuple[str, str, int]]:
        """-> [(key, value, create_revision)] of one key, or of every key under `key` when prefix."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(key[:-1] + chr(ord(key[-1]) + 1))
        try:
            out, _ = self._post("/kv/range", body)
        except _LeaseGone as ex:  # a read names no lease
            raise errors.Unavailable(str(ex)) from ex
        return [(_unb64(kv["key"]), _unb64(kv.get("value", "")), int(kv.get("create_revision", 0)))
                for kv in out.get("kvs", [])]  # fmt: skip

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._prefix}{kind}/{name}"

    def _lease_gone(self, ex: _LeaseGone) -> errors.Unavailable:
        self._wake.set()  # the keepalive thread notices now, not at its next tick
        return errors.Unavailable(
            f"node {self.node_id!r}'s etcd lease {self.lease_id} has expired ({ex}); a new one is being granted: retry"
        )

    # -- lease -------------------------------------------------------------------------------------------------

    def _grant(self, keepalive: bool = False) -> tuple[int, float]:
        sent = time.monotonic()
        out, _ = self._post("/lease/grant", {"TTL": self._lease_ttl, "ID": 0}, keepalive=keepalive)
        return int(out["ID"]), sent

    def _keepalive(self) -> None:
        interval = self._ttl_s / 3
        while not self._closed.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            lid, sent = self.lease_id, time.monotonic()
            if sent - self._last_ok >= self._ttl_s:
                # lost() has said True already (this thread was paused, or etcd slow): whatever etcd would answer
                # now, the node was told to stop, so it starts over under a new lease
                self._lose(lid, f"no refresh for {sent - self._last_ok:.1f} s (ttl {self._ttl_s:g} s)")
                continue
            # keep trying until the moment the lease must be counted lost
            budget = self._last_ok + self._ttl_s - sent
            try:
                out, _ = self._post("/lease/keepalive", {"ID": lid}, keepalive=True, budget_s=budget)
                if int(out.get("result", {}).get("TTL", -1)) > 0:
                    self._last_ok = sent  # the send time: etcd restarted the TTL no earlier than this
                    self._announce_if_needed()
                    continue
                reason = f"etcd says lease {lid} has expired"
            except _LeaseGone as ex:
                reason = str(ex)
            except errors.Unavailable as ex:
                if time.monotonic() - self._last_ok < self._ttl_s:
                    continue
                reason = str(ex)
            self._lose(lid, reason)

    def _announce_if_needed(self) -> None:
        if self._address is not None and self._announced_lease != self.lease_id:
            try:
                self.announce(self._address)
            except errors.Unavailable as ex:  # tried again at the next refresh
                log.warning("node %s: re-announce failed: %s", self.node_id, ex)

    def _lose(self, lid: int, reason: str) -> None:
        self._lost_flag = True
        log.warning("node %s lost its etcd lease %d: %s", self.node_id, lid, reason)
        for fn in list(self._callbacks):
            try:
                fn()
            except Exception:  # noqa: BLE001 - one failing callback must not stop the others or the thread
                log.exception("node %s: on_lost callback %r failed", self.node_id, fn)
        try:  # its keys go now rather than at etcd's own expiry: the node has already given them up
            self._post("/kv/lease/revoke", {"ID": lid}, keepalive=True)
        except (errors.Unavailable, _LeaseGone):
            pass
        while not self._closed.is_set():
            try:
                new_lid, sent = self._grant(keepalive=True)
            except errors.Unavailable:
                self._closed.wait(self._ttl_s / 3)
                continue
            self.lease_id, self._last_ok = new_lid, sent
            self._announce_if_needed()
            self._lost_flag = False
            log.warning("node %s holds a new etcd lease %d", self.node_id, new_lid)
            for fn in list(self._regained):
                try:
                    fn()
                except Exception:  # noqa: BLE001 - as for on_lost
                    log.exception("node %s: on_regained callback %r failed", self.node_id, fn)
            return

    def lost(self) -> bool:
        """True while this node may not assume it owns anything (see the module doc)."""
        return self._closed.is_set() or self._lost_flag or time.monotonic() - self._last_ok >= self._ttl_s

    def on_lost(self, fn: Callable[[], None]) -> None:
        self._callbacks.append(fn)

    def on_regained(self, fn: Callable[[], None]) -> None:
        """`fn()` runs on the keepalive thread once a new lease is held after a lost one (keep it short)."""
        self._regained.append(fn)

    # -- membership --------------------------------------------------------------------------------------------

    def announce(self, address: str) -> None:
        """Put nodes/<node_id> = {address, pid, since} under the lease (again after each new lease). A lease that
        has expired is no error: the keepalive thread grants the next one and announces under it (a server whose
        lease lapsed while it started, on a loaded machine, used to exit). Unavailable when etcd cannot be reached."""
        self._address = address
        lid = self.lease_id
        value = json.dumps({"address": address, "pid": os.getpid(), "since": time.time()}, sort_keys=True)
        try:
            self._txn([], [_put(self._key("nodes", self.node_id), value, lid)], [])
        except _LeaseGone as ex:
            self._wake.set()  # the keepalive thread finds the lease gone now, not at its next tick
            log.warning("node %s: lease %d had expired when it announced %s (%s); it announces under its next lease",
                        self.node_id, lid, address, ex)
            return
        self._announced_lease = lid

    def nodes(self) -> dict[str, str]:
        """Live node_id -> address."""
        base = self._key("nodes")
        return {k[len(base):]: json.loads(v).get("address", "") for k, v, _ in self._range(base, prefix=True)}

    def _address_of(self, node_id: str) -> str:
        rows = self._range(self._key("nodes", node_id))
        return json.loads(rows[0][1]).get("address", "") if rows else ""

    # -- catalog and ownership ---------------------------------------------------------------------------------

    def create_stream(self, name: str, record: dict) -> tuple[int, int]:
        """Catalog the stream, own it and start its head, in one txn -> (incarnation, epoch) (the same revision).

        heads/<name> starts as Head(0, 0), which is also what an absent head reads as: a transaction cannot know
        its own revision, so the epoch cannot be written into the head it creates. `advance` takes Head(0, epoch)
        as the name of that head too, so the creator may start from either."""
        sk, ok, hk = self._key("streams", name), self._key("owners", name), self._key("heads", name)
        # not sorted: a spec's key spaces are ordered (their order numbers them in the store and the log)
        rec, lid = json.dumps(record, separators=(",", ":")), self.lease_id
        try:
            done, rev, resp, retried = self._txn(
                [_cmp(sk, "CREATE", 0)],
                [_put(sk, rec), _put(ok, self.node_id, lid), _put(hk, Head().canonical())],
                [_get(sk), _get(ok)],
            )
        except _LeaseGone as ex:
            raise self._lease_gone(ex) from ex
        if done:
            return rev, rev
        stream, owner = _kv(resp[0]), _kv(resp[1])
        assert stream is not None  # the compare failed: it exists
        if retried and stream["value"] == rec and owner and owner["value"] == self.node_id and owner["lease"] == lid:
            return stream["create_revision"], owner["create_revision"]  # our first try was applied
        raise errors.AlreadyExists(
            f"stream {name!r} already exists in the cluster (incarnation {stream['create_revision']}): "
            "expected a name no stream has; drop it first to reuse the name"
        )

    def catalog(self) -> dict[str, tuple[dict, int]]:
        """Every stream: name -> (record, incarnation)."""
        base = self._key("streams")
        return {k[len(base):]: (json.loads(v), rev) for k, v, rev in self._range(base, prefix=True)}

    def stream(self, name: str) -> Optional[tuple[dict, int]]:
        rows = self._range(self._key("streams", name))
        return (json.loads(rows[0][1]), rows[0][2]) if rows else None

    def owner(self, name: str) -> Optional[Owner]:
        """The stream's owner, or None while no node owns it (its owner's lease expired, or it was released)."""
        rows = self._range(self._key("owners", name))
        if not rows:
            return None
        node_id = rows[0][1]
        return Owner(node_id=node_id, address=self._address_of(node_id), epoch=rows[0][2])

    def claim(self, name: str, incarnation: Optional[int] = None) -> Optional[int]:
        """Own a stream no node owns -> the new epoch; None when another node owns it (or, with `incarnation`, when
        the catalog's stream of that name is another incarnation: dropped and created again since it was read).
        Already ours under the current lease -> its epoch."""
        sk, ok, lid = self._key("streams", name), self._key("owners", name), self.lease_id
        exists = _cmp(sk, "CREATE", 0, "GREATER") if incarnation is None else _cmp(sk, "CREATE", incarnation)
        try:
            done, rev, resp, _ = self._txn(
                [exists, _cmp(ok, "CREATE", 0)], [_put(ok, self.node_id, lid)],
                [_get(sk), _get(ok)],
            )  # fmt: skip
        except _LeaseGone as ex:
            raise self._lease_gone(ex) from ex
        if done:
            return rev
        stream, owner = _kv(resp[0]), _kv(resp[1])
        if stream is None:
            raise errors.NotFound(f"stream {name!r} is not in the cluster catalog: expected a created stream")
        if incarnation is not None and stream["create_revision"] != incarnation:
            return None
        if owner is not None and owner["value"] == self.node_id and owner["lease"] == lid:
            return owner["create_revision"]
        return None

    def release(self, name: str, epoch: int) -> None:
        """Give the stream up (delete owners/<name> if it is still ours at that epoch); a no-op otherwise."""
        ok = self._key("owners", name)
        self._txn([_cmp(ok, "CREATE", epoch), _cmp(ok, "VALUE", self.node_id)], [_delete(ok)], [])

    # -- fenced writes -----------------------------------------------------------------------------------------

    def head(self, name: str) -> Head:
        rows = self._range(self._key("heads", name))
        return Head.parse(rows[0][1]) if rows else Head()

    def _not_owner(self, name: str, epoch: int, owner: Optional[dict], what: str = "") -> errors.NotOwner:
        if owner is None:
            now, address = "no node owns it now", ""
        else:
            now = f"node {owner['value']!r} owns it at epoch {owner['create_revision']}"
            address = self._address_of(owner["value"])
        if owner is not None and owner["value"] == self.node_id and owner["create_revision"] == epoch:
            return errors.NotOwner(f"node {self.node_id!r}, owner of stream {name!r} at epoch {epoch}: {what}", address)
        return errors.NotOwner(f"node {self.node_id!r} lost stream {name!r} at epoch {epoch}: {now}", address)

    def advance(self, name: str, epoch: int, expected: Head, new: Head) -> None:
        """Move heads/<name> from `expected` to `new`, only while this node owns the stream at `epoch`.

        A stream nothing was ever committed to holds Head(0, 0) (see create_stream); its owner may name that
        head as Head(0, 0) or as Head(0, epoch), its own epoch: both mean "nothing committed yet"."""
        ok, hk = self._key("owners", name), self._key("heads", name)
        fresh = expected.seq == 0 and expected.epoch == epoch != 0
        # the common case first: the head of a fresh stream is stored as Head(0, 0)
        candidates = [Head().canonical(), expected.canonical()] if fresh else [expected.canonical()]
        for i, want in enumerate(candidates):
            done, _, resp, retried = self._txn(
                [_cmp(ok, "CREATE", epoch), _cmp(ok, "VALUE", self.node_id), _cmp(hk, "VALUE", want)],
                [_put(hk, new.canonical())],
                [_get(ok), _get(hk)],
            )
            if done:
                return
            owner, head = _kv(resp[0]), _kv(resp[1])
            ours = owner is not None and owner["value"] == self.node_id and owner["create_revision"] == epoch
            if retried and ours and head is not None and head["value"] == new.canonical():
                return  # our first try was applied (only the owner at this epoch writes this head)
            if not ours or head is None or head["value"] != candidates[-1] or i == len(candidates) - 1:
                break
        found = head["value"] if head is not None else "no head (the stream was dropped)"
        raise self._not_owner(name, epoch, owner, f"the head moved: expected {expected.canonical()}, found {found}")

    def drop_stream(self, name: str, epoch: int) -> None:
        """Delete the stream's catalog record, owner and head in one txn, only while this node owns it at `epoch`."""
        sk, ok, hk = self._key("streams", name), self._key("owners", name), self._key("heads", name)
        done, _, resp, retried = self._txn(
            [_cmp(ok, "CREATE", epoch), _cmp(ok, "VALUE", self.node_id)], [_delete(sk), _delete(ok), _delete(hk)],
            [_get(sk), _get(ok)],
        )  # fmt: skip
        if done:
            return
        stream, owner = _kv(resp[0]), _kv(resp[1])
        if stream is None:
            if retried:
                return  # our first try was applied
            raise errors.NotFound(f"stream {name!r} is not in the cluster catalog: expected a created stream")
        raise self._not_owner(name, epoch, owner)

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the keepalive thread and revoke the lease (which deletes every key under it). Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=self._timeout_s + self._ttl_s)
        try:
            self._post("/kv/lease/revoke", {"ID": self.lease_id})
        except (errors.Unavailable, _LeaseGone):
            pass  # unreachable or already expired: etcd expires it within its TTL anyway
        for session in self._sessions[0] + self._sessions[1]:
            session.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
