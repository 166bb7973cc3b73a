"""MemoryServicer: the thin layer between gRPC and the MemoryBank.

Owns nothing but translation: every method resolves the caller's tenant, converts the request
(wire/convert.py, where every message is read and built), delegates to the bank and converts the answer.
Errors are raised as MemFlowError and turned into status codes by the interceptor (service/interceptors.py),
in one place. K/V bytes move on the
data plane the request names: SHM (offsets into a registered client arena, one copy between the arena and
LMDB's memory map; service/arenas.py decides how, so that a client can never make the service fault) or STREAM
(chunks of at most `chunk_bytes`, framing.CHUNK_BYTES: each message fits the 4 MiB a stock gRPC client accepts;
records - one layer of one entry - are packed into full chunks across their boundaries, service/packing.py).
Per-tenant quotas (streams, stored bytes: service/quotas.py; arenas: service/arenas.py) are checked here, before
the bank is touched. A tenant's whole-bank Stats covers its own streams; the bank's map and disk sizes are
shown only to the operator (no auth).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional, cast

import numpy as np

from memory_service.bank import MemoryBank
from memory_service.buffers import Buffers
from memory_service.config import TenantQuotas
from memory_service.errors import DeadlineExceeded, NotFound, ResourceExhausted, StaleLayout
from memory_service.query_fetch import FetchPlan
from memory_service.service.arenas import ArenaRegistry
from memory_service.service.auth import ANONYMOUS, Authenticator, Identity
from memory_service.service.metrics import Metrics
from memory_service.service.packing import Packer
from memory_service.service.quotas import TenantLedger
from memory_service.types import StreamSpec, kv_numpy_dtype
from memory_service.validate import check_kv_layout
from memory_service.wire import convert
from memory_service.wire.framing import CHUNK_BYTES

SHM = convert.SHM_PLANE
# A streaming-plane fetch group of small records up to this many chunks is read in one batched fetch (a temporary
# copy of at most 16 MiB): per record, the store's read view and header checks cost ~45 us, more than a 12 KiB
# record's bytes.
BATCHED_CHUNKS = 4
# Stream-plane messages of about 1 MiB: 287.5 MB frames went 1.24-1.28x raw gRPC's 4 MiB chunks against 0.84-0.86x
# in 4 MiB messages (benchmarks/transport.py's frame rows, same runs): smaller messages keep both ends busy.
PACK_TARGET = 1 << 20
PUT_BUFFERS, PUT_BUFFER_BYTES = 2, 256 << 20


class MemoryServicer:
    """One method per MemoryService RPC (convert.method_handlers serves them by the proto's method names)."""

    def __init__(self, bank: MemoryBank, auth: Optional[Authenticator], metrics: Metrics,
                 max_put_bytes: int = 16 << 30, chunk_bytes: int = CHUNK_BYTES,
                 quotas: Optional[TenantQuotas] = None, max_arenas: int = 256) -> None:
        self.bank = bank
        self.auth = auth
        self.metrics = metrics
        quotas = quotas or TenantQuotas()
        self.ledger = TenantLedger(bank, quotas)
        if auth is not None and quotas.max_arenas is not None:  # tenants within their quotas always fit
            max_arenas = max(max_arenas, len(auth.tenants) * quotas.max_arenas)
        self.arenas = ArenaRegistry(max_arenas, quotas.max_arenas, quotas.max_arena_bytes)
        self.max_put_bytes = max_put_bytes
        self.chunk_bytes = chunk_bytes
        # stream-plane puts gather into these: a 64-entry put of 35 MB spent ~25% of its service time faulting in a
        # fresh buffer. At most PUT_BUFFERS of at most PUT_BUFFER_BYTES each stay allocated between puts.
        self._put_buffers = Buffers(PUT_BUFFERS, max_bytes=PUT_BUFFER_BYTES)
        self.local_socket = ""  # the local socket's name, once MemoryServer listens there (RegisterArena says it)
        kv_numpy_dtype("bfloat16")  # imports ml_dtypes now, not in the first CreateStream or Put (0.5-0.9 s)

    def _who(self, context, method: str) -> Identity:
        identity = self.auth.identify(context.invocation_metadata()) if self.auth else ANONYMOUS
        identity.check_write(method)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"{method} reached the service after its deadline had passed")
        return identity

    def _name(self, identity: Identity, name: str, must_exist: bool = True) -> str:
        """The bank's name for the caller's stream. A tenant's NotFound lists only its own streams (the bank's
        message would list every tenant's)."""
        qualified = identity.qualify(name)
        if must_exist and identity.tenant:
            try:
                self.bank.spec(qualified)
            except NotFound:
                mine = sorted(identity.local(s.name) for s in self.bank.list_streams() if identity.owns(s.name))
                shown = mine[:10] + (["..."] if len(mine) > 10 else [])
                raise NotFound(f"stream {name!r} not found; existing streams: {shown}") from None
        return qualified

    # -- streams ------------------------------------------------------------------------------------
    def CreateStream(self, request, context):
        who = self._who(context, "CreateStream")
        spec = convert.spec_from_pb(request.spec)
        name = self._name(who, spec.name, must_exist=False)
        with self.ledger.creating_stream(who.tenant):
            self.bank.create_stream(convert.renamed(spec, name))
        return convert.empty_response("CreateStream")

    def DropStream(self, request, context):
        who = self._who(context, "DropStream")
        self.bank.drop_stream(self._name(who, request.stream))
        return convert.empty_response("DropStream")

    def ListStreams(self, request, context):
        who = self._who(context, "ListStreams")
        specs = [convert.renamed(s, who.local(s.name)) for s in self.bank.list_streams() if who.owns(s.name)]
        return convert.list_streams_response(specs)

    # -- put ----------------------------------------------------------------------------------------
    def Put(self, request_iterator, context):
        who = self._who(context, "Put")
        header = convert.put_header_of(next(request_iterator, None))
        convert.enum_from_pb(header.plane, "PutHeader.plane")
        stream = self._name(who, header.stream)
        spec = self.bank.spec(stream)
        n_kv = 0
        for i, e in enumerate(header.entries):
            if e.has_kv:
                check_kv_layout(spec, e.kv_dtype, e.kv_shape, f"entry {i}")
                n_kv += 1
        placed, key_bytes = None, 0
        if header.keys_in_arena or header.keys_in_chunks:
            placed, key_bytes = convert.keys_apart(header)
            if key_bytes > self.max_put_bytes:
                raise ResourceExhausted(f"Put of {key_bytes} key bytes exceeds the service limit of "
                                        f"{self.max_put_bytes}")
        kv, keys, total = None, None, 0
        if n_kv:
            total = n_kv * spec.kv.layers * _layer_bytes(spec)
            if total > self.max_put_bytes:
                raise ResourceExhausted(f"Put of {total} K/V bytes exceeds the service limit of {self.max_put_bytes}")
        if header.plane == SHM:
            if n_kv:
                with self.arenas.use(who.tenant, header.arena_id, int(header.arena_offset), total) as source:
                    raw = source.read()  # sealed: the mapping itself; otherwise a private copy
            convert.expect_end(request_iterator)
            if placed is not None:
                with self.arenas.use(who.tenant, header.arena_id, int(header.keys_offset), key_bytes) as source:
                    keys = convert.keys_from_bytes(placed, source.read(), len(header.entries))
            self.metrics.bytes("shm", "put", total)
        elif n_kv or placed is not None:
            # K/V, then the keys (keys_in_chunks), into a warm buffer when one is free (buffers.py)
            raw = convert.gather_chunks(request_iterator, total + key_bytes, self._put_buffers.take)
            if placed is not None:
                keys = convert.keys_from_bytes(placed, raw[total:], len(header.entries), copy=False)
            self.metrics.bytes("stream", "put", total)
        else:
            convert.expect_end(request_iterator)
        if n_kv:
            kv = raw[:total].view(kv_numpy_dtype(spec.kv.dtype)).reshape(n_kv, *spec.kv.shape)
        entries = convert.entries_from_pb(header.entries, kv, keys)
        with self.ledger.storing(who.tenant, total + len(entries) * _key_bytes(spec)):
            ids = self.bank.put(stream, entries)
        return convert.put_response(ids)

    # -- query / fetch ------------------------------------------------------------------------------
    def Query(self, request, context):
        who = self._who(context, "Query")
        args = convert.query_args_from_pb(request)
        result = self.bank.query(self._name(who, request.stream), request.space, **args)
        return convert.result_to_pb(result)

    def Fetch(self, request, context) -> Iterator[Any]:
        who = self._who(context, "Fetch")
        convert.enum_from_pb(request.plane, "FetchRequest.plane")
        stream = self._name(who, request.stream)
        spec = self.bank.spec(stream)
        layers = list(request.layers) or None
        if request.plane == SHM and spec.kv is not None:
            n_layers = len(layers) if layers else spec.kv.layers
            nbytes = len(request.ids) * n_layers * _layer_bytes(spec)
            if nbytes > request.arena_bytes:
                raise StaleLayout(
                    f"fetch needs {nbytes} bytes but the client reserved {request.arena_bytes} in its arena: the "
                    f"client's layout of stream {request.stream!r} is stale; reload it and retry"
                )
            with self.arenas.use(who.tenant, request.arena_id, int(request.arena_offset), nbytes) as target:
                ids = convert.ids_from_pb(request.ids)
                if target.view is not None:  # a sealed segment, mapped: one memcpy from LMDB's map into it
                    out = target.view.view(kv_numpy_dtype(spec.kv.dtype)).reshape(len(request.ids), n_layers,
                                                                                  *spec.kv.layer_shape)
                    result = self.bank.fetch(stream, ids, layers, out=out)
                    got_ids, got_layers, shape = result.ids, result.layers, result.kv.shape
                else:  # never mapped (the client could shrink it under the copy): pwrite from LMDB's map
                    got_ids, got_layers, shape, _ = self.bank.fetch_layout(stream, ids, layers)
                    for _ in self.bank.iter_fetch(stream, ids, layers, max(1, _layer_bytes(spec)), target.write):
                        pass
            # counted before the yield: the client may have its answer (and scrape) before the generator resumes
            self.metrics.bytes("shm", "fetch", nbytes)
            yield convert.fetch_header(got_ids, got_layers, spec.kv.dtype, shape, nbytes)
            return
        ids = convert.ids_from_pb(request.ids)
        got_ids, got_layers, shape, dtype = self.bank.fetch_layout(stream, ids, layers)
        assert spec.kv is not None, "fetch_layout refuses a keys-only stream"
        nbytes = math.prod(shape) * dtype.itemsize
        yield convert.fetch_header(got_ids, got_layers, spec.kv.dtype, shape, nbytes)
        yield from self._packed(stream, [(got_ids, got_layers)])

    def QueryFetch(self, request, context) -> Iterator[Any]:
        """Query, then the K/V of the pairs query_fetch.FetchPlan picks (as MemoryBank.query_fetch), on the
        request's data plane: one header (ranking + groups), then the groups' bytes back to back."""
        who = self._who(context, "QueryFetch")
        convert.enum_from_pb(request.plane, "QueryFetchRequest.plane")
        stream = self._name(who, request.query.stream)
        query = convert.query_args_from_pb(request.query)
        plan = FetchPlan(self.bank.spec(stream), query["k"], **convert.query_fetch_args_from_pb(request))
        if plan.include:  # an unknown or keys-only id fails before the query records its hits
            self.bank.fetch_layout(stream, plan.include, plan.layers)
        if request.plane == SHM:
            yield self._query_fetch_shm(who.tenant, request, stream, query, plan)  # the one message (the proto)
            return
        result = self.bank.query(stream, request.query.space, **query, record=False)
        groups, shapes, sizes, headers = self._planned(stream, plan, result)
        for ids, layers in groups:  # what a fetch would raise, before the header goes
            self.bank.fetch_layout(stream, ids, layers)
        yield convert.query_fetch_header(result, headers, sum(sizes))
        yield from self._packed(stream, groups)
        self.bank.record_hits(stream, result.ids)  # the whole answer went out: its hits count

    def _planned(self, stream: str, plan: FetchPlan, result) -> tuple[Any, list, list[int], list]:
        """(groups, their shapes, their sizes in bytes, their FetchHeaders) that `plan` picks from a ranking."""
        groups = plan.groups(result.ids)
        spec = self.bank.spec(stream)
        assert spec.kv is not None, "FetchPlan refuses a keys-only stream"
        layer_bytes = _layer_bytes(spec)
        shapes = [(len(ids), len(layers), *spec.kv.layer_shape) for ids, layers in groups]
        sizes = [len(ids) * len(layers) * layer_bytes for ids, layers in groups]
        headers = [convert.fetch_header(ids, layers, spec.kv.dtype, shape, n)
                   for (ids, layers), shape, n in zip(groups, shapes, sizes)]
        return groups, shapes, sizes, headers

    def _query_fetch_shm(self, tenant: str, request, stream: str, query: dict, plan: FetchPlan):
        """QueryFetch on SHM: the groups' K/V back to back in the client's arena; returns the header. The arena
        (registered, the tenant's, the reserved range inside it) is checked before the query records its hits: a
        client whose arena the service lost (a restart) registers it again and retries, and its hits must not
        count twice."""
        arena: Any = (self.arenas.use(tenant, request.arena_id, int(request.arena_offset), int(request.arena_bytes))
                      if request.arena_bytes else contextlib.nullcontext())
        with arena as target:
            result = self.bank.query(stream, request.query.space, **query, record=False)
            groups, shapes, sizes, headers = self._planned(stream, plan, result)
            nbytes = sum(sizes)
            if nbytes > request.arena_bytes:
                raise StaleLayout(
                    f"query_fetch needs {nbytes} bytes but the client reserved {request.arena_bytes} in its arena: "
                    f"the client's layout of stream {request.query.stream!r} is stale; reload it and retry")
            spec = self.bank.spec(stream)
            assert spec.kv is not None, "FetchPlan refuses a keys-only stream"
            dtype, layer_bytes = kv_numpy_dtype(spec.kv.dtype), _layer_bytes(spec)
            if target.view is not None:  # sealed and mapped: one memcpy from LMDB's map into it, one read view
                starts = np.cumsum([0, *sizes[:-1]]).tolist()
                outs = [target.view[at:at + n].view(dtype).reshape(shape)
                        for at, n, shape in zip(starts, sizes, shapes)]
                self.bank.fetch_groups(stream, groups, outs)
            else:  # never mapped: pwrite from LMDB's map, in order
                for ids, layers in groups:
                    for _ in self.bank.iter_fetch(stream, ids, layers, max(1, layer_bytes), target.write):
                        pass
        if nbytes:
            self.metrics.bytes("shm", "fetch", nbytes)
        self.bank.record_hits(stream, result.ids)  # the K/V is in the arena: its hits count
        return convert.query_fetch_header(result, headers, nbytes)

    def _packed(self, stream: str, groups) -> Iterator[bytes]:
        """The groups' bytes, in order, as kv_chunk messages of about PACK_TARGET bytes (packing.Packer). Groups of
        small records (under a quarter of that) up to BATCHED_CHUNKS chunks are read in one batched fetch (one read
        view, as the SHM plane reads); other groups record by record (one layer of one entry, read whole inside
        the store's view, its messages sent after the view is closed), so a fetch of many 287.5 MB frames never
        sits in memory whole."""
        spec = self.bank.spec(stream)
        record = max(1, _layer_bytes(spec))  # iter_fetch hands each layer in one piece; the packer cuts it
        packer = Packer(self.chunk_bytes, lambda n: self.metrics.bytes("stream", "fetch", n), PACK_TARGET)  # as read
        for ids, layers in groups:
            if record < packer.target // 4 and len(ids) * len(layers) * record <= BATCHED_CHUNKS * self.chunk_bytes:
                kv = self.bank.fetch(stream, ids, layers).kv  # [n, layers, 2, T, H, D]
                yield from packer.record(kv.reshape(-1).view(np.uint8).data)
                continue
            for messages in self.bank.iter_fetch(stream, ids, layers, record, packer.record):
                yield from cast(list, messages)
        yield from packer.finish()

    # -- the rest -----------------------------------------------------------------------------------
    def Delete(self, request, context):
        who = self._who(context, "Delete")
        return convert.delete_response(self.bank.delete(self._name(who, request.stream),
                                                        convert.ids_from_pb(request.ids)))

    def Pin(self, request, context):
        who = self._who(context, "Pin")
        self.bank.pin(self._name(who, request.stream), convert.ids_from_pb(request.ids), request.pinned)
        return convert.empty_response("Pin")

    def Prune(self, request, context):
        who = self._who(context, "Prune")
        result = self.bank.prune(self._name(who, request.stream))
        self.metrics.pruned(len(result.evicted))
        return convert.prune_to_pb(result)

    def Stats(self, request, context):
        who = self._who(context, "Stats")
        if request.stream:
            s = self.bank.stats(self._name(who, request.stream))
            return convert.stats_response([(s, who.local(s.name))], s.entries, s.payload_bytes)
        bank = self.bank.stats()
        mine = [s for s in bank.streams if who.owns(s.name)]
        # the LMDB map and file sizes are the whole bank's, every tenant's together: only the operator (a service
        # without auth) sees them; a tenant's answer has 0 there
        operator = not who.tenant
        return convert.stats_response(
            [(s, who.local(s.name)) for s in mine], sum(s.entries for s in mine), sum(s.payload_bytes for s in mine),
            map_size=bank.map_size if operator else 0, disk_bytes=bank.disk_bytes if operator else 0,
        )

    def ListEntries(self, request, context):
        who = self._who(context, "ListEntries")
        metas = self.bank.entries(self._name(who, request.stream))
        return convert.list_entries_response(metas)

    def RegisterArena(self, request, context):
        who = self._who(context, "RegisterArena")
        arena_id = self.arenas.register(who.tenant, request.shm_name, int(request.size), bytes(request.nonce))
        return convert.register_arena_response(arena_id, self.local_socket)

    def ReleaseArena(self, request, context):
        who = self._who(context, "ReleaseArena")
        self.arenas.release(who.tenant, request.arena_id)
        return convert.empty_response("ReleaseArena")


def _layer_bytes(spec: StreamSpec) -> int:
    # Python ints: KVLayout.layer_bytes (numpy) wraps around for absurd layouts and would pass the size limits
    assert spec.kv is not None, "callers pass only streams with a KVLayout"
    return math.prod(spec.kv.layer_shape) * kv_numpy_dtype(spec.kv.dtype).itemsize


def _key_bytes(spec: StreamSpec) -> int:
    """Stored key bytes of one entry (what a tenant's stored-bytes quota counts beside its payload)."""
    return sum(spec.layers_of(name) * ks.dim * np.dtype(ks.dtype).itemsize for name, ks in spec.key_spaces.items())
