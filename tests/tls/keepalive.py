"""Holds one HTTPS connection open across a certificate reload: sends a
request, prints its status and the certificate's CN, waits for a line on
stdin, then sends another request on the same connection and prints the
same again.

usage: keepalive.py HOST PORT CA_FILE
"""
import socket
import ssl
import sys

host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
conn = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname="localhost")
reader = conn.makefile("rb")


def ask():
    conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status = reader.readline().split()[1].decode()
    length = 0
    while True:
        line = reader.readline().strip()
        if not line:
            break
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    reader.read(length)
    cn = dict(x[0] for x in conn.getpeercert()["subject"])["commonName"]
    print(status, cn, flush=True)


ask()
sys.stdin.readline()
ask()
