"""A stock gRPC client - default channel options, the generated stub, nothing of MemoryClient - moves Wan-sized
layers on the streaming plane.

Stock clients (grpc-js, Go, Java, C++, Python) refuse a received message over 4 MiB unless told otherwise, and
the limit counts the whole serialized message. One Wan2.1-1.3B layer of one frame is 9.58 MB, so every chunk the
service streams must fit 4 MiB with its framing; and MemoryClient's own Put chunks must fit a service whose
limit is 4 MiB. MemoryClient's keys travel beside the Put message (PutHeader.keys_in_arena on the SHM plane,
keys_in_chunks on the stream plane), so a Put of megabytes of keys fits a 4 MiB message; a stock client's
misuse of those fields is INVALID_ARGUMENT. Real MemoryServer on a free
port, real channels.
"""

from __future__ import annotations

import grpc
import ml_dtypes
import numpy as np
import pytest

from memory_service import KeySpace, KVLayout, NewEntry, StreamSpec
from memory_service.client import MemoryClient
from memory_service.wire import convert
from memory_service.wire.gen import memory_pb2 as pb
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc

STOCK_LIMIT = 4 << 20  # what a stock client accepts: serialized message, tag and length included
# One Wan2.1-1.3B frame layer: 1560 tokens x 12 heads x 128, K and V, bf16 = 9,584,640 bytes per layer.
WAN_LAYER = KVLayout(layers=2, heads=12, head_dim=128, tokens_per_frame=1560, dtype="bfloat16")


def wan_spec(name: str = "wan") -> StreamSpec:
    return StreamSpec(name, {"e": KeySpace(8)}, kv=WAN_LAYER)


def wan_entry(seed: int) -> NewEntry:
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal(WAN_LAYER.shape, dtype=np.float32).astype(ml_dtypes.bfloat16)  # [L, 2, T, H, D]
    return NewEntry(seed, 0, f"frame {seed}", {"e": rng.standard_normal(8).astype(np.float32)}, kv)


def stock_fetch(stub, request: pb.FetchRequest) -> tuple[pb.FetchHeader, bytes, list[int]]:
    """(header, the K/V bytes, each message's serialized size) of a Fetch through the generated stub."""
    header, chunks, sizes = None, [], []
    for msg in stub.Fetch(request, timeout=60):
        sizes.append(msg.ByteSize())
        if msg.WhichOneof("part") == "header":
            assert header is None, "a second header"
            header = msg.header
        else:
            chunks.append(msg.kv_chunk)
    assert header is not None
    return header, b"".join(chunks), sizes


@pytest.fixture
def stock(server):
    """The generated stub on a channel with gRPC's defaults (no message size raised)."""
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.MemoryServiceStub(channel)
    channel.close()


def test_chunk_size_fits_a_stock_client_with_its_framing():
    framed = convert.chunk_to_wire(bytes(convert.CHUNK_BYTES))
    assert len(framed) <= STOCK_LIMIT
    assert pb.FetchResponse.FromString(framed).kv_chunk == bytes(convert.CHUNK_BYTES)  # what any protobuf reads


def test_stock_client_fetches_a_wan_sized_layer_bit_exact(server, stock):
    with MemoryClient(server.address, plane="stream") as c:
        c.create_stream(wan_spec())
        entries = [wan_entry(1), wan_entry(2)]
        ids = c.put("wan", entries)
    header, data, sizes = stock_fetch(stock, pb.FetchRequest(stream="wan", ids=ids))
    assert list(header.shape) == [2, *WAN_LAYER.shape] and header.dtype == "bfloat16"
    assert header.nbytes == len(data) == 2 * WAN_LAYER.layers * WAN_LAYER.layer_bytes
    assert data == np.stack([e.kv for e in entries]).tobytes()
    assert max(sizes) <= STOCK_LIMIT and len(sizes) > 1 + 2 * WAN_LAYER.layers  # more than one chunk per layer
    # a subset of layers, in the order asked
    header, data, _ = stock_fetch(stock, pb.FetchRequest(stream="wan", ids=[ids[1]], layers=[1]))
    assert list(header.layers) == [1] and data == entries[1].kv[1:2].tobytes()


def test_stock_client_puts_chunks_of_4_mib_minus_framing(server, stock):
    with MemoryClient(server.address, plane="stream") as c:
        c.create_stream(wan_spec())
    entry = wan_entry(3)
    header = pb.PutHeader(stream="wan", entries=[convert.entry_to_pb(entry)])
    raw = entry.kv.tobytes()
    biggest = STOCK_LIMIT - 5  # with its tag byte and 4-byte length, exactly 4 MiB
    requests = [pb.PutRequest(header=header)] + [pb.PutRequest(kv_chunk=raw[i:i + biggest])
                                                 for i in range(0, len(raw), biggest)]
    assert max(r.ByteSize() for r in requests) == STOCK_LIMIT
    (eid,) = stock.Put(iter(requests), timeout=60).ids
    _, data, _ = stock_fetch(stock, pb.FetchRequest(stream="wan", ids=[eid]))
    assert data == raw


def test_memory_client_chunks_fit_a_service_limited_to_4_mib(make_server):
    srv = make_server(max_message_bytes=STOCK_LIMIT)
    with MemoryClient(srv.address, plane="stream", max_message_bytes=STOCK_LIMIT) as c:
        c.create_stream(wan_spec())
        entry = wan_entry(4)
        (eid,) = c.put("wan", [entry])  # 9.58 MB per layer through the client's own chunking
        got = c.fetch("wan", [eid])
        assert got.kv.tobytes() == entry.kv[None].tobytes()


def test_puts_carry_keys_beside_the_message_past_a_4_mib_limit(make_server):
    # 24 entries x 30 x 1536 float32 keys are 4.4 MB: MemoryClient sends them beside the Put message - in the
    # arena on the SHM plane (keys_in_arena), after the K/V in the chunks on the stream plane (keys_in_chunks) -
    # so a service limited to 4 MiB messages takes them; keys-only entries too
    srv = make_server(max_message_bytes=STOCK_LIMIT)
    layout = KVLayout(layers=30, heads=1, head_dim=8, tokens_per_frame=1)
    spaces = {"a": KeySpace(1536, per_layer=True, layers=30), "b": KeySpace(4, metric="l2")}
    rng = np.random.default_rng(5)

    def batch(with_kv: bool) -> list[NewEntry]:
        return [NewEntry(i, 0, "p", {"b": rng.standard_normal(4, dtype=np.float32),
                                     "a": rng.standard_normal((30, 1536), dtype=np.float32)},
                         rng.standard_normal(layout.shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
                         if with_kv else None)
                for i in range(24)]

    for plane in ("shm", "stream"):
        with MemoryClient(srv.address, plane=plane, max_message_bytes=STOCK_LIMIT) as c:
            for name, with_kv in ((f"{plane}-kv", True), (f"{plane}-keys", False)):
                c.create_stream(StreamSpec(name, spaces, kv=layout if with_kv else None))
                entries = batch(with_kv)
                ids = c.put(name, entries)
                for space in ("a", "b"):  # each space's keys landed under its own name, in entry order
                    for n in (0, 13, 23):
                        assert (c.query(name, space, entries[n].keys[space], 1).ids == ids[n]).all(), (name, space)
                if with_kv:
                    assert c.fetch(name, ids).kv.tobytes() == np.stack([e.kv for e in entries]).tobytes()
                assert c.stats(name).entries == 24


def stock_put(stock, header: pb.PutHeader):
    return stock.Put(iter([pb.PutRequest(header=header)]), timeout=30)


def test_keys_apart_are_refused_on_the_wrong_plane_and_with_key_data(server, stock):
    # a stock client's mistakes with PutHeader.keys_in_arena / keys_in_chunks: INVALID_ARGUMENT saying what was
    # expected, nothing stored
    spec = StreamSpec("k", {"e": KeySpace(8)})
    stock.CreateStream(pb.CreateStreamRequest(spec=convert.spec_to_pb(spec)), timeout=30)
    entry = convert.entry_to_pb(NewEntry(0, 0, "p", {"e": np.ones(8, np.float32)}))
    bare = pb.NewEntry()
    bare.CopyFrom(entry)
    bare.keys["e"].ClearField("data")
    cases = [(pb.DATA_PLANE_STREAM, "arena", entry,
              "keys_in_arena is set on the STREAM plane; expected it only with plane SHM"),
             (pb.DATA_PLANE_SHM, "arena", entry,
              "carries 32 bytes of data; with PutHeader.keys_in_arena key Tensors carry none"),
             (pb.DATA_PLANE_SHM, "chunks", bare,
              "keys_in_chunks is set on the SHM plane; expected it only with plane STREAM"),
             (pb.DATA_PLANE_STREAM, "chunks", entry,
              "carries 32 bytes of data; with PutHeader.keys_in_chunks key Tensors carry none"),
             (pb.DATA_PLANE_STREAM, "both", bare, "sets both keys_in_arena and keys_in_chunks"),
             (pb.DATA_PLANE_STREAM, "none", bare, "NewEntry.keys['e'] carries 0 bytes")]  # no flag: data is due
    for plane, flag, msg, message in cases:
        header = pb.PutHeader(stream="k", entries=[msg], plane=plane, arena_id="x" * 16,
                              keys_in_arena=flag in ("arena", "both"), keys_in_chunks=flag in ("chunks", "both"))
        with pytest.raises(grpc.RpcError) as info:
            stock_put(stock, header)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (flag, info.value.details())
        assert message in info.value.details(), (flag, info.value.details())
    assert list(stock.ListEntries(pb.ListEntriesRequest(stream="k"), timeout=30).entries) == []


def test_stock_client_query_fetch_messages_fit_4_mib(server, stock):
    """QueryFetch on the stream plane through the generated stub with gRPC's defaults: a header (the ranking and the
    groups), then Wan-sized layers in chunks that each fit 4 MiB; the bytes are exactly Fetch's, group after group."""
    with MemoryClient(server.address, plane="stream") as c:
        c.create_stream(wan_spec())
        entries = [wan_entry(1), wan_entry(2), wan_entry(3)]
        ids = c.put("wan", entries)
    query = pb.QueryRequest(stream="wan", space="e", k=3, vectors=convert.tensor_to_pb(entries[0].keys["e"], "float32"))
    request = pb.QueryFetchRequest(query=query, resident=[pb.IdList(ids=[ids[2]])])
    header, chunks, sizes = None, [], []
    for msg in stock.QueryFetch(request, timeout=60):
        sizes.append(msg.ByteSize())
        if msg.WhichOneof("part") == "header":
            assert header is None, "a second header"
            header = msg.header
        else:
            chunks.append(msg.kv_chunk)
    assert header is not None and sorted(convert.result_from_pb(header.result).ids.tolist()) == sorted(ids)
    [group] = header.groups  # one ranking for every layer: one group of the hits not held, all layers
    assert sorted(group.ids) == sorted(ids[:2]) and list(group.layers) == [0, 1]
    data = b"".join(chunks)
    assert header.nbytes == group.nbytes == len(data) == 2 * WAN_LAYER.layers * WAN_LAYER.layer_bytes
    assert data == np.stack([entries[ids.index(i)].kv for i in group.ids]).tobytes()
    assert max(sizes) <= STOCK_LIMIT and len(sizes) > 1 + 2 * WAN_LAYER.layers  # more than one chunk per layer
