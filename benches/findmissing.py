"""FindMissingBlobs of N present digests as a stock grpcio client sees it.

Uploads N small blobs over HTTP, encodes one FindMissingBlobsRequest naming
all of them by hand (so the client's own protobuf encoder is not measured),
calls it CALLS times on one channel and prints client-side p50/p99 in ms.

usage: findmissing.py HTTP_HOST:PORT GRPC_HOST:PORT N CALLS
"""
import hashlib
import http.client
import os
import sys
import time

import grpc

http_addr, grpc_addr, n, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, wire, payload):
    return varint(num << 3 | wire) + payload


host, port = http_addr.split(":")
conn = http.client.HTTPConnection(host, int(port))
digests = bytearray()
for i in range(n):
    blob = os.urandom(32) + i.to_bytes(8, "little")
    h = hashlib.sha256(blob).hexdigest()
    conn.request("PUT", f"/cas/{h}", body=blob, headers={"Content-Length": str(len(blob))})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    d = field(1, 2, varint(64) + h.encode()) + field(2, 0, varint(len(blob)))
    digests += field(2, 2, varint(len(d)) + d)
request = bytes(digests)

with grpc.insecure_channel(grpc_addr, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
    call = ch.unary_unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs")
    for _ in range(10):
        call(request, timeout=30)
    took = []
    for _ in range(calls):
        t = time.perf_counter()
        resp = call(request, timeout=30)
        took.append((time.perf_counter() - t) * 1000)
        assert resp == b"", "digests reported missing"
took.sort()
print(f"digests={n} request_bytes={len(request)} calls={calls} "
      f"client_p50_ms={took[len(took) // 2]:.2f} client_p99_ms={took[int(len(took) * 0.99) - 1]:.2f}")
