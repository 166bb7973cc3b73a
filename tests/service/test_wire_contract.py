"""The proto is the contract: the service does what protos/memflow/v1/memory.proto says, and serves it to tools.

Against a real `memflow-service serve` subprocess, through the generated stub on a channel with gRPC's defaults
(what a client in another language generates from the .proto):
- keys and query vectors are float32 on the wire: float16, bfloat16 or int64 numbers are INVALID_ARGUMENT naming
  the field, what it got and what it expects (they used to be cast and ranked), and nothing is stored;
- an entry with has_kv=false in a K/V stream is a keys-only entry: codec "none", found by Query, and its Fetch
  is NOT_FOUND saying it holds keys only (it used to claim the entry had been "degraded");
- has_kv without kv_dtype is INVALID_ARGUMENT saying what the stream expects;
- on the streaming plane small records share kv_chunk messages (chunk boundaries mean nothing), bytes in order;
- metadata memflow-answer: unary (a one-message answer sent as a unary one) on a longer answer is
  INVALID_ARGUMENT, and a QueryFetch so refused counts no hits;
- server reflection answers on grpc.reflection.v1 and v1alpha, and the memory.proto it serves carries the
  file's comments (source_code_info), equal otherwise to the descriptor the service runs on;
- the numbers the proto's comments state are the service's defaults.
"""

from __future__ import annotations

import inspect
import re

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from svc_util import EMB, REPO, make_entry, make_spec, start_serve

from memory_service.config import BankConfig, ServiceConfig
from memory_service.wire import convert
from memory_service.wire.gen import memory_pb2 as pb
from memory_service.wire.gen import memory_pb2_grpc as pb_grpc
from memory_service.service.servicer import MemoryServicer

PROTO = REPO / "protos" / "memflow" / "v1" / "memory.proto"
SERVICE = "memflow.v1.MemoryService"


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    proc = start_serve(str(tmp_path_factory.mktemp("wire") / "data"))
    yield proc
    proc.terminate()


@pytest.fixture
def stub(serve):
    """A stream of its own per test, and the generated stub on a default channel."""
    channel = grpc.insecure_channel(serve.target)
    stub = pb_grpc.MemoryServiceStub(channel)
    for s in stub.ListStreams(pb.ListStreamsRequest(), timeout=30).streams:
        stub.DropStream(pb.DropStreamRequest(stream=s.name), timeout=30)
    stub.CreateStream(pb.CreateStreamRequest(spec=convert.spec_to_pb(make_spec())), timeout=30)
    yield stub
    channel.close()


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def put(stub, entries: list[pb.NewEntry], kv: bytes = b""):
    requests = [pb.PutRequest(header=pb.PutHeader(stream="cam0", entries=entries, plane=pb.DATA_PLANE_STREAM))]
    requests += [pb.PutRequest(kv_chunk=kv[i:i + (1 << 20)]) for i in range(0, len(kv), 1 << 20)]
    return stub.Put(iter(requests), timeout=30)


def entry_pb(i: int, with_kv: bool = True) -> tuple[pb.NewEntry, bytes]:
    e = make_entry(i)
    msg = convert.entry_to_pb(e)
    if not with_kv:
        msg.has_kv = False
        msg.ClearField("kv_dtype")
        del msg.kv_shape[:]
        return msg, b""
    return msg, np.ascontiguousarray(e.kv).tobytes()


def entries(stub) -> list[pb.EntryMeta]:
    return list(stub.ListEntries(pb.ListEntriesRequest(stream="cam0"), timeout=30).entries)


# ---- keys and queries are float32 -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int64"])
def test_keys_of_another_dtype_are_refused_and_nothing_is_stored(stub, dtype):
    msg, kv = entry_pb(0)
    key = np.arange(EMB) + 1
    msg.keys["emb"].CopyFrom(convert.tensor_to_pb(key.astype(convert.dtype_of(dtype)), dtype))
    e = rpc_error(lambda: put(stub, [msg], kv))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"entry 0 NewEntry.keys['emb'] has dtype '{dtype}'; expected 'float32'" in e.details()
    assert entries(stub) == []
    msg.keys["emb"].CopyFrom(convert.tensor_to_pb(key.astype(np.float32), "float32"))
    assert list(put(stub, [msg], kv).ids) == [0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int64"])
def test_query_vectors_of_another_dtype_are_refused(stub, dtype):
    msg, kv = entry_pb(3)
    put(stub, [msg], kv)
    query = np.ones(EMB)
    request = pb.QueryRequest(stream="cam0", space="emb", k=1,
                              vectors=convert.tensor_to_pb(query.astype(convert.dtype_of(dtype)), dtype))
    e = rpc_error(lambda: stub.Query(request, timeout=30))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"QueryRequest.vectors has dtype '{dtype}'; expected 'float32'" in e.details()
    request.vectors.CopyFrom(convert.tensor_to_pb(query.astype(np.float32), "float32"))
    assert convert.tensor_from_pb(stub.Query(request, timeout=30).ids, "ids").tolist() == [0]


# ---- has_kv ---------------------------------------------------------------------------------------------------

def test_an_entry_without_kv_in_a_kv_stream_is_keys_only_and_fetch_says_so(stub):
    with_kv, kv = entry_pb(1)
    keys_only, _ = entry_pb(2, with_kv=False)
    assert list(put(stub, [with_kv, keys_only], kv).ids) == [0, 1]
    metas = entries(stub)
    assert [(m.entry_id, m.codec, m.nbytes > 0) for m in metas] == [(0, "raw", True), (1, "none", False)]
    # found by Query like any entry
    query = convert.query_to_pb("cam0", "emb", make_entry(2).keys["emb"], 1, "per_layer", None, False, None)
    assert convert.tensor_from_pb(stub.Query(query, timeout=30).ids, "ids").tolist() == [1]
    # Fetch of its K/V: NOT_FOUND saying it holds keys only; the other entry's K/V is there
    e = rpc_error(lambda: list(stub.Fetch(pb.FetchRequest(stream="cam0", ids=[0, 1]), timeout=30)))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert "entries [1] of stream 'cam0' hold keys only" in e.details() and "put without K/V" in e.details()
    got = [m for m in stub.Fetch(pb.FetchRequest(stream="cam0", ids=[0]), timeout=30)]
    assert b"".join(m.kv_chunk for m in got[1:]) == kv


def test_stream_plane_records_share_chunks_and_arrive_in_order(stub):
    # the proto: kv_chunk messages are "the next bytes", where one ends means nothing - small records (one layer of
    # one entry, 640 bytes here) travel together instead of a message each; the bytes are the entries' in order
    pairs = [entry_pb(i) for i in (5, 6, 7)]
    put(stub, [m for m, _ in pairs], b"".join(kv for _, kv in pairs))
    got = list(stub.Fetch(pb.FetchRequest(stream="cam0", ids=[2, 0, 1]), timeout=30))
    assert got[0].WhichOneof("part") == "header" and [m.WhichOneof("part") for m in got[1:]] == ["kv_chunk"]
    assert got[1].kv_chunk == pairs[2][1] + pairs[0][1] + pairs[1][1]


def test_a_one_message_answer_asked_of_a_longer_one_fails_whole_and_counts_no_hits(serve, stub):
    # memflow-answer: unary (convert.ONE_ANSWER) is how MemoryClient reads the SHM plane's one-message answers
    # as unary calls; asked of a stream-plane answer (a header and chunks) it is INVALID_ARGUMENT, never the first
    # message alone, and a QueryFetch refused so records no hit
    pairs = [entry_pb(i) for i in (5, 6)]
    put(stub, [m for m, _ in pairs], b"".join(kv for _, kv in pairs))
    channel = grpc.insecure_channel(serve.target)
    one = [(convert.ONE_ANSWER, "unary")]
    fetch = channel.unary_unary(convert.method_path("Fetch"), request_serializer=pb.FetchRequest.SerializeToString,
                                response_deserializer=pb.FetchResponse.FromString)
    e = rpc_error(lambda: fetch(pb.FetchRequest(stream="cam0", ids=[0, 1]), timeout=30, metadata=one))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Fetch with metadata memflow-answer" in e.details() and "only on the SHM plane" in e.details()
    query_fetch = channel.unary_unary(convert.method_path("QueryFetch"),
                                      request_serializer=pb.QueryFetchRequest.SerializeToString,
                                      response_deserializer=pb.QueryFetchResponse.FromString)
    query = pb.QueryRequest(stream="cam0", space="emb", k=2,
                            vectors=convert.tensor_to_pb(np.ones(EMB, np.float32), "float32"))
    e = rpc_error(lambda: query_fetch(pb.QueryFetchRequest(query=query), timeout=30, metadata=one))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "QueryFetch with metadata" in e.details()
    assert [m.hit_count for m in entries(stub)] == [0, 0]
    # the same calls without it are the streaming answers they always were
    got = list(stub.Fetch(pb.FetchRequest(stream="cam0", ids=[0, 1]), timeout=30))
    assert b"".join(m.kv_chunk for m in got[1:]) == pairs[0][1] + pairs[1][1]
    assert len(list(stub.QueryFetch(pb.QueryFetchRequest(query=query), timeout=30))) > 1
    assert [m.hit_count for m in entries(stub)] == [1, 1]
    channel.close()


def test_has_kv_without_kv_dtype_is_refused_saying_what_the_stream_expects(stub):
    msg, kv = entry_pb(4)
    msg.ClearField("kv_dtype")
    e = rpc_error(lambda: put(stub, [msg], kv))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(r"entry 0 has K/V but no kv_dtype; stream 'cam0' expects kv_dtype '\w+' and kv_shape \[",
                     e.details())
    assert entries(stub) == []


# ---- reflection -----------------------------------------------------------------------------------------------

def _reflect(channel, version: str, requests: list, messages=(rpb.ServerReflectionRequest, rpb.ServerReflectionResponse)):
    request_cls, response_cls = messages
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=request_cls.SerializeToString,
                                 response_deserializer=response_cls.FromString)
    return list(call(iter(requests), timeout=30))


def _comments(proto: descriptor_pb2.FileDescriptorProto) -> str:
    return " ".join(" ".join([loc.leading_comments, loc.trailing_comments, *loc.leading_detached_comments])
                    for loc in proto.source_code_info.location)


def test_reflection_v1_and_v1alpha_serve_the_contract_with_its_comments(serve):
    channel = grpc.insecure_channel(serve.target)
    for version in ("v1", "v1alpha"):
        listed, found, missing = _reflect(channel, version, [
            rpb.ServerReflectionRequest(list_services=""),
            rpb.ServerReflectionRequest(file_containing_symbol=f"{SERVICE}.Fetch"),
            rpb.ServerReflectionRequest(file_containing_symbol="memflow.v1.NoSuchThing"),
        ])
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names, version
        [served] = [descriptor_pb2.FileDescriptorProto.FromString(b)
                    for b in found.file_descriptor_response.file_descriptor_proto]
        assert served.name == "memflow/v1/memory.proto"
        comments = _comments(served)  # what grpcurl describe shows: the limits, the rules
        for text in ("1 to 200 (MAX_STREAM_NAME_CHARS)", "authorization: Bearer", "half-open",
                     "float32 (nothing else)", "keys-only entry"):
            assert text in re.sub(r"\s+", " ", comments), (version, text)
        # apart from the comments (and json names, which protoc adds), the very descriptor the service runs on
        running = descriptor_pb2.FileDescriptorProto()
        pb.DESCRIPTOR.CopyToProto(running)
        served.ClearField("source_code_info")
        messages = list(served.message_type)
        while messages:
            message = messages.pop()
            messages.extend(message.nested_type)  # map fields' entry types
            for field in message.field:
                field.ClearField("json_name")
        assert served == running
        assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    channel.close()


def test_reflection_v1_describes_itself_and_works_with_messages_built_from_that(serve):
    channel = grpc.insecure_channel(serve.target)
    [answer] = _reflect(channel, "v1", [rpb.ServerReflectionRequest(
        file_containing_symbol="grpc.reflection.v1.ServerReflection")])
    pool = descriptor_pool.DescriptorPool()
    for raw in answer.file_descriptor_response.file_descriptor_proto:
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    method = pool.FindServiceByName("grpc.reflection.v1.ServerReflection").methods_by_name["ServerReflectionInfo"]
    assert method.client_streaming and method.server_streaming
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    [listed] = _reflect(channel, "v1", [request_cls(list_services="")], (request_cls, response_cls))
    assert SERVICE in {s.name for s in listed.list_services_response.service}
    channel.close()


# ---- the numbers in the proto are the service's ---------------------------------------------------------------

def test_the_proto_states_the_services_numbers_and_cites_the_architecture():
    text = PROTO.read_text()
    first = text.splitlines()[0]
    assert "docs/architecture.md" in first and (REPO / "docs" / "architecture.md").is_file()
    flat = re.sub(r"\s+", " ", re.sub(r"\s*\n\s*(//\s*)?", " ", text))  # comments run on over lines
    bank, service = BankConfig(), ServiceConfig()
    assert f"a Put carries 1 to {bank.max_batch} entries [bank.max_batch]" in flat
    assert f"a Query's k is 1 to {bank.max_k} [bank.max_k]" in flat
    assert f"1 to {bank.max_k} [bank.max_k], else INVALID_ARGUMENT int64 k = 4;" in flat
    assert f"messages of up to {service.max_message_bytes} bytes" in flat
    assert f"at most {convert.CHUNK_BYTES} bytes a chunk" in flat and f"at most {convert.CHUNK_BYTES} bytes" in flat
    max_put = inspect.signature(MemoryServicer).parameters["max_put_bytes"].default
    assert f"at most {max_put} bytes (16 GiB) of K/V" in flat
