"""RedisClient's reply parser (hiredis decoding in C) against txredisapi's own hiredis
protocol: the same replies, item for item and type for type, for any RESP2 reply (random
bytes in strings, nested arrays, nil, errors) cut into any chunks."""

from __future__ import annotations

from typing import Any

import txredisapi
from hypothesis import given, settings
from hypothesis import strategies as st

from teltonika_ingest.redis.client import _DecodingHiredisProtocol, _PoolFactory

_text = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [b"", b"QUEUED", b"OK", b"0-1", b"\xc3\xa9t\xc3\xa9", b"\xed\xa0\x80", b"\xff"]
    ),
)


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


_leaf = st.one_of(
    _text.map(_bulk),
    st.integers(-(2**63), 2**63 - 1).map(lambda n: b":%d\r\n" % n),
    st.just(b"$-1\r\n"),
    st.just(b"*-1\r\n"),
    _text.filter(lambda b: b"\r" not in b and b"\n" not in b).map(lambda b: b"+" + b + b"\r\n"),
    _text.filter(lambda b: b"\r" not in b and b"\n" not in b).map(lambda b: b"-ERR " + b + b"\r\n"),
)
_reply = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=5).map(
        lambda items: b"*%d\r\n" % len(items) + b"".join(items)
    ),
    max_leaves=20,
)


def _normal(x: Any) -> Any:
    if isinstance(x, list):
        return [_normal(i) for i in x]
    if isinstance(x, Exception):
        return ("error", type(x).__name__, x.args)
    return (type(x).__name__, x)


def _parse(protocol: Any, chunks: list[bytes]) -> list[Any]:
    for chunk in chunks:
        protocol.dataReceived(chunk)
    return [_normal(r) for r in protocol.replyQueue.pending]


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _txredisapi_protocol() -> Any:
    return txredisapi.HiredisProtocol(charset="utf-8", convertNumbers=False)


def _ours() -> Any:
    return _DecodingHiredisProtocol(charset="utf-8", convertNumbers=False)


def test_the_client_pool_uses_the_decoding_protocol() -> None:
    assert _PoolFactory.protocol is _DecodingHiredisProtocol


@settings(max_examples=400, deadline=None)
@given(st.lists(_reply, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=6))
def test_replies_are_the_same_as_txredisapis(replies: list[bytes], cuts: list[int]) -> None:
    data = b"".join(replies)
    chunks = _chunked(data, cuts)
    expected = _parse(_txredisapi_protocol(), chunks)
    assert len(expected) == len(replies)
    assert _parse(_ours(), chunks) == expected


def test_a_non_utf8_string_after_ascii_replies_is_bytes_and_later_ones_str_again() -> None:
    ours = _ours()
    got = _parse(ours, [b"+OK\r\n*2\r\n$2\r\n\xff\xfe\r\n$1\r", b"\na\r\n$3\r\nabc\r\n"])
    assert got == [
        ("str", "OK"),
        [("bytes", b"\xff\xfe"), ("str", "a")],
        ("str", "abc"),
    ]
    assert ours._partial_non_ascii is False  # everything returned: the fast path again
