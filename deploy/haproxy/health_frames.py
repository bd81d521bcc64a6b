"""The HTTP/2 bytes of one gRPC health check, as hex for HAProxy's `tcp-check send-binary`.

HAProxy's `http-check` cannot send a request body with HTTP/2 trailers
semantics, and a gRPC call is an HTTP/2 POST with a framed protobuf body, so
the check in haproxy.cfg sends the whole exchange as raw bytes over TLS (ALPN
h2): the client connection preface, an empty SETTINGS frame, a HEADERS frame
for `POST /grpc.health.v1.Health/Check` and a DATA frame holding the empty
HealthCheckRequest (service "": the server as a whole). It then expects the
response's message, `status: SERVING`.

The header block is HPACK without Huffman coding and without the dynamic table
(RFC 7541): static-table entries where a whole field is in the table (`:method
POST`, `:scheme https`), otherwise "literal without indexing" (first byte
0000xxxx): a name from the static table by index, or a literal name, then the
literal value. Such a block means the same on every connection, whatever the
server's table size, so the bytes can be fixed in a config file.

Run it to print the lines haproxy.cfg holds; tests/deploy/test_replicas.py checks
that they match. Standard library only, so it runs anywhere Python does.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# HTTP/2 frame types and flags (RFC 9113, section 6).
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4
STREAM = 1
"""The one stream of the check: the first a client opens."""

# HPACK static table indexes (RFC 7541, appendix A).
AUTHORITY, METHOD_POST, PATH, SCHEME_HTTPS, CONTENT_TYPE = 1, 3, 4, 7, 31

HEALTH_PATH = "/grpc.health.v1.Health/Check"
AUTHORITY_VALUE = "synctoken"
"""Any value will do: gRPC servers do not route by it, and TLS already chose the certificate."""

SERVING = bytes([0x08, 0x01])
"""HealthCheckResponse{status: SERVING}: field 1, varint, value 1."""


def hpack_integer(value: int, prefix_bits: int, first_byte_flags: int) -> bytes:
    """An integer with an N-bit prefix (RFC 7541, section 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte_flags | value])
    out = bytearray([first_byte_flags | limit])
    value -= limit
    while value >= 0x80:  # noqa: PLR2004 - seven bits per continuation byte
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(text: str) -> bytes:
    """A string literal, not Huffman-coded (H bit 0), its length with a 7-bit prefix."""
    data = text.encode("ascii")
    return hpack_integer(len(data), 7, 0x00) + data


def indexed(index: int) -> bytes:
    """A whole header field from the static table (section 6.1)."""
    return hpack_integer(index, 7, 0x80)


def literal(name: int | str, value: str) -> bytes:
    """A field "literal without indexing" (section 6.2.2): the name by static index, or literal when 0 is given."""
    if isinstance(name, int):
        return hpack_integer(name, 4, 0x00) + hpack_string(value)
    return b"\x00" + hpack_string(name) + hpack_string(value)


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 32-bit length, the serialized protobuf."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def health_check_request() -> bytes:
    """Everything the check sends, from the connection preface to the end of its one stream."""
    header_block = b"".join(
        [
            indexed(METHOD_POST),
            indexed(SCHEME_HTTPS),
            literal(PATH, HEALTH_PATH),
            literal(AUTHORITY, AUTHORITY_VALUE),
            literal(CONTENT_TYPE, "application/grpc"),
            # gRPC requires it: a server refuses a call from a peer that may not read trailers.
            literal("te", "trailers"),
        ]
    )
    return b"".join(
        [
            PREFACE,
            frame(SETTINGS, 0, 0, b""),
            frame(HEADERS, END_HEADERS, STREAM, header_block),
            # An empty HealthCheckRequest serializes to no bytes: a message of length 0.
            frame(DATA, END_STREAM, STREAM, grpc_message(b"")),
        ]
    )


def serving_response() -> bytes:
    """The response's message when the server says SERVING, as it appears in its DATA frame."""
    return grpc_message(SERVING)


def any_status_response_regex() -> str:
    """A regex over HAProxy's hex dump of the response matching the response's message whatever its status.

    A HealthCheckResponse is one varint field: 2 bytes for every status there is.
    """
    # HAProxy matches rbinary against its upper-case hex dump of what it received.
    return grpc_message(SERVING).hex().upper()[:-2] + "[0-9A-F]{2}"


def haproxy_lines() -> list[str]:
    """The tcp-check lines of haproxy.cfg, as they must read."""
    return [
        f"tcp-check send-binary {health_check_request().hex()}",
        f"tcp-check expect rbinary {any_status_response_regex()}",
        f"tcp-check expect min-recv 1 binary {serving_response().hex()}",
    ]


if __name__ == "__main__":
    print("\n".join(haproxy_lines()))  # noqa: T201 - the script's output
