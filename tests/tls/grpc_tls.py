"""gRPC over TLS with a stock client (grpcio): prints, as JSON, the status
of GetCapabilities and a health check for each kind of client hoard's mTLS
listener may meet.

usage: grpc_tls.py HOST:PORT PKI_DIR AUTHORIZATION
"""
import json
import sys

import grpc

target, pki, authorization = sys.argv[1], sys.argv[2], sys.argv[3]


def read(name):
    with open(f"{pki}/{name}", "rb") as f:
        return f.read()


def attempt(client, metadata):
    if client is None:
        creds = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"))
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=read("ca.pem"),
            private_key=read(f"{client}.key"),
            certificate_chain=read(f"{client}.pem"),
        )
    out = {}
    with grpc.secure_channel(target, creds) as ch:
        for name, method in [
            ("capabilities", "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"),
            ("health", "/grpc.health.v1.Health/Check"),
        ]:
            call = ch.unary_unary(method)
            try:
                call(b"", timeout=10, metadata=metadata)
                out[name] = "OK"
            except grpc.RpcError as e:
                out[name] = e.code().name
    return out


auth = [("authorization", authorization)]
print(json.dumps({
    "client certificate, credentials": attempt("client", auth),
    "client certificate, no credentials": attempt("client", []),
    "no client certificate": attempt(None, auth),
    "another CA's certificate": attempt("stranger", auth),
}))
