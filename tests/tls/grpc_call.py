"""One unary gRPC call over mTLS with a stock client (grpcio), the request
given as hex-encoded bytes; prints the status code's name.

usage: grpc_call.py HOST:PORT PKI_DIR CLIENT METHOD REQUEST_HEX
"""
import sys

import grpc

target, pki, client, method, request = sys.argv[1:6]


def read(name):
    with open(f"{pki}/{name}", "rb") as f:
        return f.read()


creds = grpc.ssl_channel_credentials(
    root_certificates=read("ca.pem"),
    private_key=read(f"{client}.key"),
    certificate_chain=read(f"{client}.pem"),
)
with grpc.secure_channel(target, creds) as ch:
    try:
        ch.unary_unary(method)(bytes.fromhex(request), timeout=10)
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name)
