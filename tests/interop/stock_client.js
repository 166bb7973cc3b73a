// A stock Node gRPC client of memflow.v1.MemoryService, built from protos/memflow/v1/memory.proto and nothing
// else: @grpc/grpc-js with its default channel options (a 4 MiB receive limit) and @grpc/proto-loader.
//
// Usage: node stock_client.js TARGET PROTO_FILE TOKEN OUT_DIR
// Drives the service the way a client author in another language would, from the proto's comments alone:
// creates a K/V stream whose every layer is over 4 MiB, puts two entries on the streaming plane, queries,
// fetches both entries (in reverse order) and checks every byte, provokes UNAUTHENTICATED, NOT_FOUND,
// INVALID_ARGUMENT and ALREADY_EXISTS, and creates and drops a scratch stream. It leaves the stream `node0` and
// writes, for the Python side to read back with MemoryClient:
//   OUT_DIR/kv.bin      the K/V bytes it put, entry after entry ([2, layers, 2, tokens, heads, head_dim] float32)
//   OUT_DIR/keys.bin    the two entries' keys ([2, 8] float32)
//   OUT_DIR/report.json what it saw (ids, hits, error codes, message sizes)
// Any surprise exits 1 with the reason on stderr.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, protoFile, token, outDir] = process.argv.slice(2);
if (!outDir) {
  console.error('usage: node stock_client.js TARGET PROTO_FILE TOKEN OUT_DIR');
  process.exit(2);
}

// The proto's own int64 fields as strings (JavaScript numbers lose precision past 2^53).
const definition = protoLoader.loadSync(protoFile, {keepCase: true, longs: String, enums: String, defaults: true,
                                                    oneofs: true});
const memflow = grpc.loadPackageDefinition(definition).memflow.v1;
const client = new memflow.MemoryService(target, grpc.credentials.createInsecure());  // stock options
const DEADLINE_MS = 60000;

// Every layer: 2 (K, V) x 1040 tokens x 4 heads x 128 x 4 bytes = 4,259,840 bytes, over the 4 MiB a stock
// client accepts in one message: the service must split each layer into several chunks.
const LAYOUT = {layers: 2, heads: 4, head_dim: 128, tokens_per_frame: 1040, dtype: 'float32'};
const KV_SHAPE = [LAYOUT.layers, 2, LAYOUT.tokens_per_frame, LAYOUT.heads, LAYOUT.head_dim];
const KV_FLOATS = KV_SHAPE.reduce((a, b) => a * b, 1);
const LAYER_BYTES = (KV_FLOATS / LAYOUT.layers) * 4;
const DIM = 8;
const STOCK_LIMIT = 4 * 1024 * 1024;

function auth() {
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${token}`);
  return md;
}

function opts() {
  return {deadline: new Date(Date.now() + DEADLINE_MS)};
}

function fail(why) {
  throw new Error(why);
}

function unary(method, request, metadata = auth()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, opts(), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// A deterministic, finite float32 pattern (the service refuses NaN and inf).
function pattern(n, seed) {
  const out = new Float32Array(n);
  let x = (seed * 2654435761) >>> 0;
  for (let i = 0; i < n; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    out[i] = (x / 4294967296) * 2 - 1;
  }
  return out;
}

function tensor(floats, shape) {
  return {dtype: 'float32', shape, data: Buffer.from(floats.buffer, floats.byteOffset, floats.byteLength)};
}

function int64s(t) {
  const out = [];
  for (let i = 0; i < t.data.length; i += 8) out.push(Number(t.data.readBigInt64LE(i)));
  return out;
}

function spec(name) {
  return {name, key_spaces: {emb: {dim: DIM, metric: 'ip'}}, kv: LAYOUT, policy: 'fifo'};
}

// Put on the streaming plane: a PutHeader, then the entries' K/V in chunks of at most 1 MiB.
function put(stream, entries, kv) {
  return new Promise((resolve, reject) => {
    const call = client.Put(auth(), opts(), (err, response) => (err ? reject(err) : resolve(response)));
    call.write({header: {stream, entries, plane: 'DATA_PLANE_STREAM'}});
    const CHUNK = 1 << 20;
    for (let at = 0; at < kv.length; at += CHUNK) call.write({kv_chunk: kv.subarray(at, at + CHUNK)});
    call.end();
  });
}

// Fetch on the streaming plane: the header, then the K/V bytes; each message's size is recorded.
function fetch(stream, ids, plane = 'DATA_PLANE_STREAM') {
  return new Promise((resolve, reject) => {
    const call = client.Fetch({stream, ids, plane}, auth(), opts());
    let header = null;
    const chunks = [];
    const sizes = [];
    call.on('data', (msg) => {
      if (msg.part === 'header') {
        if (header !== null) reject(new Error('Fetch sent a second header'));
        header = msg.header;
      } else {
        chunks.push(msg.kv_chunk);
        sizes.push(msg.kv_chunk.length);
      }
    });
    call.on('error', reject);
    call.on('end', () => resolve({header, data: Buffer.concat(chunks), sizes}));
  });
}

async function code(promise) {
  try {
    await promise;
  } catch (err) {
    return grpc.status[err.code];
  }
  return 'OK';
}

async function main() {
  const report = {errors: {}};
  await unary('CreateStream', {spec: spec('node0')});

  const kv = [pattern(KV_FLOATS, 1), pattern(KV_FLOATS, 2)];
  const keys = [pattern(DIM, 11), pattern(DIM, 12)];
  const entries = [0, 1].map((i) => ({
    frame_index: String(10 + i), chunk_index: String(i), prompt: `node frame ${i}`,
    keys: {emb: tensor(keys[i], [DIM])}, has_kv: true, kv_dtype: LAYOUT.dtype, kv_shape: KV_SHAPE,
    importance: 0.5,
  }));
  const kvBytes = Buffer.concat(kv.map((f) => Buffer.from(f.buffer)));
  const putResponse = await put('node0', entries, kvBytes);
  report.ids = putResponse.ids.map(Number);
  if (report.ids.join() !== '0,1') fail(`Put returned ids ${report.ids}, expected 0,1`);

  // the second entry's own key is its best match under inner product
  const query = await unary('Query', {stream: 'node0', space: 'emb', vectors: tensor(keys[1], [DIM]), k: '2'});
  report.hits = int64s(query.ids);
  report.frames = int64s(query.frames);
  if (query.ids.dtype !== 'int64' || query.scores.dtype !== 'float32') fail('Query answered unexpected dtypes');
  if (report.hits[0] !== 1 || report.frames[0] !== 11) fail(`Query top hit ${report.hits}, expected entry 1`);

  const got = await fetch('node0', ['1', '0']);  // the order asked for, not the stored order
  const want = Buffer.concat([Buffer.from(kv[1].buffer), Buffer.from(kv[0].buffer)]);
  if (!got.data.equals(want)) fail(`Fetch returned ${got.data.length} bytes that differ from the ${want.length} put`);
  if (got.header.dtype !== LAYOUT.dtype || got.header.shape.map(Number).join() !== [2, ...KV_SHAPE].join() ||
      Number(got.header.nbytes) !== want.length) {
    fail(`Fetch header ${JSON.stringify(got.header)} does not describe the bytes`);
  }
  report.fetched_bytes = got.data.length;
  report.layer_bytes = LAYER_BYTES;
  report.max_chunk = Math.max(...got.sizes);
  report.chunks = got.sizes.length;
  if (report.max_chunk >= STOCK_LIMIT) fail(`a Fetch chunk of ${report.max_chunk} bytes`);

  const entriesResponse = await unary('ListEntries', {stream: 'node0'});
  report.codecs = entriesResponse.entries.map((e) => e.codec);

  const noAuth = new grpc.Metadata();
  report.errors.no_token = await code(unary('ListStreams', {}, noAuth));
  report.errors.ghost_stream = await code(unary('Query', {stream: 'ghost', space: 'emb',
                                                          vectors: tensor(keys[0], [DIM]), k: '1'}));
  report.errors.ghost_entry = await code(fetch('node0', ['0', '99']));
  report.errors.k_zero = await code(unary('Query', {stream: 'node0', space: 'emb', vectors: tensor(keys[0], [DIM]),
                                                    k: '0'}));
  const half = {dtype: 'float16', shape: [DIM], data: Buffer.alloc(DIM * 2)};  // keys are float32 only
  report.errors.float16_query = await code(unary('Query', {stream: 'node0', space: 'emb', vectors: half, k: '1'}));
  report.errors.no_kv_dtype = await code(put('node0', [{...entries[0], kv_dtype: ''}], Buffer.from(kv[0].buffer)));
  report.errors.unknown_plane = await code(fetch('node0', ['0'], 9));  // not a DataPlane: never taken for STREAM
  report.errors.duplicate = await code(unary('CreateStream', {spec: spec('node0')}));

  await unary('CreateStream', {spec: {name: 'node-scratch', key_spaces: {emb: {dim: DIM}}}});
  await unary('DropStream', {stream: 'node-scratch'});
  report.errors.dropped = await code(unary('Stats', {stream: 'node-scratch'}));
  const listed = await unary('ListStreams', {});
  report.streams = listed.streams.map((s) => s.name).sort();

  const stats = await unary('Stats', {stream: 'node0'});
  report.entries = Number(stats.entries);
  report.payload_bytes = Number(stats.payload_bytes);

  fs.writeFileSync(path.join(outDir, 'kv.bin'), kvBytes);
  fs.writeFileSync(path.join(outDir, 'keys.bin'), Buffer.concat(keys.map((f) => Buffer.from(f.buffer))));
  fs.writeFileSync(path.join(outDir, 'report.json'), JSON.stringify(report, null, 1));
  client.close();
}

main().catch((err) => {
  console.error(`stock_client.js: ${err.stack || err}`);
  process.exit(1);
});
