"""Transport benchmark: how fast K/V reaches the generator through the service, against physical baselines.

Measures, with the service in its own process (`memflow-service serve` on a temp dir):
- Fetch of 3 frames at Wan2.1-1.3B sizes - one layer of a latent frame (9.58 MB bf16) and a whole frame over 30
  layers (287.5 MB) - through the shared-memory plane (zero-copy view to the caller) and the gRPC streaming
  plane, beside raw memcpy (np.copyto between warm buffers) and a raw gRPC server-streaming call of the same
  bytes (no protobuf, no store) measured in the same run. Rows: `plane, bytes, gbps, p50_ms, p99_ms` and
  `ratio_to_memcpy` (shm) or `ratio_to_raw_grpc` (stream). Targets: shm >= 0.6 of memcpy, stream >= 0.8 of raw.
- The same 3 whole frames fetched as 30 one-layer calls per frame (what a per-layer loop would cost).
- Query round trip on a bank of N MemFlow-shaped keys (30 x 1536 per entry) beside an empty unary call (grpc
  health Check) on the same channel.

The raw gRPC baseline is the best a bare client of the same bytes does, so the ratio is what the service adds:
its server sends the bytes in messages of the service's own size (servicer.PACK_TARGET, 1 MiB; it was 4 MiB
chunks, which raw gRPC streams 10-20% slower on loopback), and its client copies each message into one array.
That array is warm (reused across calls) in the `raw_grpc` row, because MemoryClient reuses the buffer of an
answer the caller has dropped (stream_plane.Buffers) and the `stream` row's caller drops each answer; without
reuse, faulting in and zeroing a fresh 862 MB array cost about 40% of the client's CPU and most of the variance.
The `raw_grpc_fresh` and `stream_fresh` rows are the same calls into a fresh array each time (a caller that keeps
its last answers, so none is reused), the `stream_fresh` ratio against `raw_grpc_fresh`.

    python benchmarks/transport.py [--quick] [--out benchmarks/results]

`--quick` divides the token count by 10 (3 frames: 2.9 MB of one layer, 86 MB of 30) and uses 1e3 query entries
(1e4 full).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Optional

import grpc
import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, percentiles, running_service, timed  # noqa: E402

from memory_service import KeySpace, KVLayout, MemoryClient, NewEntry, StreamSpec  # noqa: E402
from memory_service.service.servicer import PACK_TARGET  # noqa: E402
from memory_service.stream_plane import RECYCLE_SLOTS  # noqa: E402
from memory_service.wire import convert  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

CHUNK = convert.CHUNK_BYTES  # the memory service's own chunk size
RAW_METHOD = "/bench.Raw/Stream"


# ---- processes ----------------------------------------------------------------------------------------

def raw_server_main() -> None:
    """A bare gRPC server streaming the requested "N:PIECE" bytes in PIECE-byte messages (PIECE defaults to
    CHUNK): identity serializers, no protobuf, and the messages built once per request, so it measures gRPC's
    own streaming cost and nothing else."""
    built: dict[tuple[int, int], list[bytes]] = {}

    def stream(request: bytes, context):
        n, _, piece = request.decode().partition(":")
        key = (int(n), int(piece or CHUNK))
        if key not in built:
            data = np.random.default_rng(0).integers(0, 255, key[0], np.uint8)
            built[key] = [data[i:i + key[1]].tobytes() for i in range(0, key[0], key[1])]
        yield b"header"  # the same message pattern as Fetch: a small header, then the chunks
        yield from built[key]

    handler = grpc.method_handlers_generic_handler("bench.Raw", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream, lambda b: b, lambda b: b)})
    limit = 64 << 20  # the memory service's defaults, so both servers run with the same channel settings
    server = grpc.server(futures.ThreadPoolExecutor(16), handlers=[handler],
                         options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"raw on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def start_raw() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--raw-server"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line.split(" on ")[1].strip()


# ---- measurements -------------------------------------------------------------------------------------


def raw_fetch(channel: grpc.Channel, nbytes: int, out: Optional[np.ndarray] = None, piece: int = PACK_TARGET) -> None:
    """`nbytes` in `piece`-byte messages, copied into `out` (warm, reused) or, when None, a fresh array (the same
    work as the client: copy each chunk into one array)."""
    call = channel.unary_stream(RAW_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    buf = np.empty(nbytes, np.uint8) if out is None else out
    got = 0
    responses = call(f"{nbytes}:{piece}".encode())
    next(responses)  # the header
    for chunk in responses:
        buf[got:got + len(chunk)] = np.frombuffer(chunk, np.uint8)
        got += len(chunk)
    assert got == nbytes


def fill_stream(client: MemoryClient, name: str, layout: KVLayout, frames: int) -> list[int]:
    client.create_stream(StreamSpec(name, {"emb": KeySpace(8)}, kv=layout))
    ids = []
    rng = np.random.default_rng(1)
    for f in range(frames):  # one put per frame keeps the staging arena at one frame
        kv = client.arena_array(layout.shape, ml_dtypes.bfloat16)
        kv[...] = rng.standard_normal(layout.shape[-1], np.float32).astype(ml_dtypes.bfloat16)
        ids += client.put(name, [NewEntry(f, f // 3, "bench", {"emb": rng.standard_normal(8, np.float32)}, kv=kv)])
        del kv
    return ids


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Time each function `reps` times, round-robin (ABCABC...), so drift on a shared machine hits all alike."""
    for fn in fns.values():
        fn()  # warm-up: first-touch faults, connection set-up
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
    return out


def bench_fetch(res: Results, shm: MemoryClient, stream: MemoryClient, fresh: MemoryClient, raw: grpc.Channel,
                name: str, ids: list[int], layers: int, size_name: str, reps: int) -> None:
    """One size's rows. `fresh` is a second streaming-plane client whose caller keeps its last RECYCLE_SLOTS
    answers, so each of its fetches gathers into a fresh array (on `stream` it would reuse what `stream` drops)."""
    nbytes = shm.fetch(name, ids).kv.nbytes
    src, dst, warm = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    kept: collections.deque = collections.deque(maxlen=RECYCLE_SLOTS)  # answers a stream_fresh caller still holds
    fns = {"memcpy": lambda: np.copyto(dst, src), "raw_grpc": lambda: raw_fetch(raw, nbytes, warm),
           "shm": lambda: shm.fetch(name, ids), "stream": lambda: stream.fetch(name, ids),
           "raw_grpc_fresh": lambda: raw_fetch(raw, nbytes), "stream_fresh": lambda: kept.append(fresh.fetch(name, ids))}
    if layers > 1:  # the anti-pattern: one RPC per layer
        fns["shm_per_layer_calls"] = lambda: [shm.fetch(name, ids, layers=[layer]) for layer in range(layers)]
    samples = interleaved(fns, reps)
    kept.clear()
    gbps = {k: nbytes / float(np.median(v)) / 1e9 for k, v in samples.items()}
    for plane, s in samples.items():
        p50, p99 = percentiles(s)
        row = dict(bench="fetch", plane=plane, size=size_name, bytes=nbytes, gbps=gbps[plane], p50_ms=p50, p99_ms=p99)
        if plane.startswith("shm"):
            row["ratio_to_memcpy"] = gbps[plane] / gbps["memcpy"]
        if plane.startswith("stream"):
            row["ratio_to_raw_grpc"] = gbps[plane] / gbps[plane.replace("stream", "raw_grpc")]
        if plane == "shm_per_layer_calls":
            row["rpcs"] = layers
        res.add(**row)


def bench_query(res: Results, client: MemoryClient, n: int, reps: int) -> None:
    layers, dim = 30, 1536
    client.create_stream(StreamSpec("nam", {"nam": KeySpace(dim, per_layer=True, layers=layers)}))
    rng = np.random.default_rng(2)
    base = rng.standard_normal((64, layers, dim), dtype=np.float32)
    t = time.perf_counter()
    for start in range(0, n, 64):
        count = min(64, n - start)
        noise = rng.standard_normal((count, layers, dim), dtype=np.float32) * 0.1
        client.put("nam", [NewEntry(start + i, (start + i) // 3, "q", {"nam": base[i] + noise[i]})
                           for i in range(count)])
    put_s = time.perf_counter() - t
    q = rng.standard_normal((layers, dim), dtype=np.float32)
    inside: list[float] = []  # the service's own time for the very calls timed here (trace total)

    def one() -> None:
        inside.append(client.query("nam", "nam", q, 3, exclude_frames=(n - 9, n)).trace.total_ms)

    samples = timed(one, reps)
    inside = inside[1:]  # drop the warm-up call
    health = health_pb2_grpc.HealthStub(client._channel)
    empty = timed(lambda: health.Check(health_pb2.HealthCheckRequest(service="")), reps)
    ep50, ep99 = percentiles(empty)
    qp50, qp99 = percentiles(samples)
    res.add(bench="query", plane="empty_unary", entries=n, p50_ms=ep50, p99_ms=ep99)
    res.add(bench="query", plane="grpc", entries=n, p50_ms=qp50, p99_ms=qp99, service_ms=float(np.median(inside)),
            overhead_ms=qp50 - float(np.median(inside)), ratio_to_empty_call=qp50 / ep50, put_per_s=n / put_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller frames and 1e3 query entries")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        return raw_server_main()
    tokens = 156 if args.quick else 1560
    reps = 10 if args.quick else 5
    res = Results("transport", Path(args.out))
    with tempfile.TemporaryDirectory(prefix="memflow-transport-") as tmp, running_service(tmp) as target:
        raw_proc, raw_target = start_raw()
        try:
            raw = grpc.insecure_channel(raw_target, options=[("grpc.max_receive_message_length", 64 << 20),
                                                             ("grpc.max_send_message_length", 64 << 20)])
            with MemoryClient(target, plane="shm", arena_bytes=64 << 20) as shm, \
                    MemoryClient(target, plane="stream") as stream, MemoryClient(target, plane="stream") as fresh:
                for size_name, layers in (("layer", 1), ("frame", 30)):
                    layout = KVLayout(layers=layers, heads=12, head_dim=128, tokens_per_frame=tokens)
                    ids = fill_stream(shm, size_name, layout, frames=3)
                    bench_fetch(res, shm, stream, fresh, raw, size_name, ids, layers, size_name,
                                reps if layers == 1 else max(5, reps // 2))
                bench_query(res, shm, 1000 if args.quick else 10000, 50 if args.quick else 100)
            raw.close()
        finally:
            raw_proc.terminate()
            raw_proc.wait(30)
    print(f"wrote {res.close()}", file=sys.stderr)


if __name__ == "__main__":
    main()
