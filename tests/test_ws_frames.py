"""Section 7's frame codec from bytes alone: FrameParser, PerMessageDeflate
and the Sec-WebSocket-Extensions grammar, with no socket (as
tests/test_parser_wire.py does for the HTTP parser).

One table of client frames (every opcode, every length encoding, masks, RSV
bits with and without permessage-deflate, fragmentation, control frames
between fragments, and the invalid cases with their close codes) is fed to a
fresh FrameParser three ways -- whole, byte by byte, and followed by the
first bytes of another frame -- and each way must give the same events, or
the same events then the same FrameError code.  RFC 6455 §5, §7.4.1, §8.1;
RFC 7692 §6-§7.
"""
import os
import struct
import tracemalloc
import zlib

import pytest

import pagi_ref
from pagi_ref import FrameError, FrameParser, PerMessageDeflate

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KEY = b"\x37\xfa\x21\x3d"          # RFC 6455 §5.7's example masking key
LIMIT = 100000                     # the table's ws_max_message_size


def frame(opcode, payload=b"", fin=True, rsv=0, mask=True, length_form=None, key=KEY):
    """A client frame; length_form 7, 16 or 64 forces an encoding of the length."""
    n = len(payload)
    form = length_form or (7 if n < 126 else 16 if n < 65536 else 64)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask else 0
    if form == 7:
        head = struct.pack("!BB", first, m | n)
    elif form == 16:
        head = struct.pack("!BBH", first, m | 126, n)
    else:
        head = struct.pack("!BBQ", first, m | 127, n)
    if not mask:
        return head + payload
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def close_payload(code, reason=b""):
    return struct.pack("!H", code) + reason


def deflated(*messages, final_block=False):
    """Each message compressed as a client with context takeover does it:
    one raw deflate stream, sync-flushed, the 4-octet tail cut (§7.2.1)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = []
    for i, m in enumerate(messages):
        if final_block and i == len(messages) - 1:
            out.append(c.compress(m) + c.flush(zlib.Z_FINISH))
        else:
            out.append((c.compress(m) + c.flush(zlib.Z_SYNC_FLUSH))[:-4])
    return out


HELLO_Z, = deflated(b"hello")
TWO_Z = deflated(b"the same words, twice", b"the same words, twice")
BIG_Z, = deflated(b"compressible " * 2000)
FINAL_Z, = deflated(b"ends with BFINAL", final_block=True)
EMPTY_Z, = deflated(b"")
BOMB_Z, = deflated(b"\0" * (LIMIT + 1))
E_ACUTE = "\u00e9".encode("utf-8")

# name: (frames, expected events, error code or None, permessage-deflate agreed)
TABLE = {
    # -- data frames, every length encoding -----------------------------------------
    "text-7bit": ([frame(TEXT, b"hello")], [("text", "hello")], None, False),
    "text-empty": ([frame(TEXT)], [("text", "")], None, False),
    "binary-empty": ([frame(BINARY)], [("bytes", b"")], None, False),
    "binary-125": ([frame(BINARY, b"a" * 125)], [("bytes", b"a" * 125)], None, False),
    "binary-126-16bit": ([frame(BINARY, b"b" * 126)], [("bytes", b"b" * 126)], None, False),
    "binary-65535-16bit": ([frame(BINARY, b"c" * 65535)], [("bytes", b"c" * 65535)],
                           None, False),
    "binary-65536-64bit": ([frame(BINARY, b"d" * 65536)], [("bytes", b"d" * 65536)],
                           None, False),
    # §5.2 asks for the minimal length encoding; pagi_ref accepts a longer one
    # (lenient, as most servers are; docs/deviations.md).
    "text-5-in-16bit-form": ([frame(TEXT, b"short", length_form=16)], [("text", "short")],
                             None, False),
    "text-5-in-64bit-form": ([frame(TEXT, b"short", length_form=64)], [("text", "short")],
                             None, False),
    "text-utf8": ([frame(TEXT, "caf\u00e9 \u2603 \U0001f600".encode("utf-8"))],
                  [("text", "caf\u00e9 \u2603 \U0001f600")], None, False),
    "mask-all-zero": ([frame(TEXT, b"zero key", key=b"\0\0\0\0")], [("text", "zero key")],
                      None, False),
    "two-messages": ([frame(TEXT, b"one"), frame(BINARY, b"two")],
                     [("text", "one"), ("bytes", b"two")], None, False),
    # -- control frames -------------------------------------------------------------------
    "ping-empty": ([frame(PING)], [("ping", b"")], None, False),
    "ping-125": ([frame(PING, b"p" * 125)], [("ping", b"p" * 125)], None, False),
    "pong": ([frame(PONG, b"data")], [("pong", b"data")], None, False),
    "close-empty": ([frame(CLOSE)], [("close", 1005, "")], None, False),
    "close-1000-reason": ([frame(CLOSE, close_payload(1000, b"bye"))],
                          [("close", 1000, "bye")], None, False),
    "close-utf8-reason": ([frame(CLOSE, close_payload(4999, E_ACUTE))],
                          [("close", 4999, "\u00e9")], None, False),
    "close-1003": ([frame(CLOSE, close_payload(1003))], [("close", 1003, "")], None, False),
    "close-1007": ([frame(CLOSE, close_payload(1007))], [("close", 1007, "")], None, False),
    "close-1014": ([frame(CLOSE, close_payload(1014))], [("close", 1014, "")], None, False),
    "close-3000": ([frame(CLOSE, close_payload(3000))], [("close", 3000, "")], None, False),
    # -- fragmentation (§5.4) ----------------------------------------------------------------
    "fragmented-text": ([frame(TEXT, b"hel", fin=False), frame(CONT, b"lo")],
                        [("text", "hello")], None, False),
    "fragmented-empty-middle": ([frame(BINARY, b"a", fin=False), frame(CONT, fin=False),
                                 frame(CONT, b"b")], [("bytes", b"ab")], None, False),
    "fragmented-utf8-split": ([frame(TEXT, E_ACUTE[:1], fin=False), frame(CONT, E_ACUTE[1:])],
                              [("text", "\u00e9")], None, False),
    "ping-between-fragments": ([frame(TEXT, b"a", fin=False), frame(PING, b"x"),
                                frame(CONT, b"b", fin=False), frame(PONG), frame(CONT, b"c")],
                               [("ping", b"x"), ("pong", b""), ("text", "abc")], None, False),
    "close-between-fragments": ([frame(TEXT, b"a", fin=False), frame(CLOSE)],
                                [("close", 1005, "")], None, False),
    # -- invalid: 1002 (§5.2, §5.4, §5.5, §7.4) --------------------------------------------------
    "rsv1-without-extension": ([frame(TEXT, b"x", rsv=4)], [], 1002, False),
    "rsv2": ([frame(TEXT, b"x", rsv=2)], [], 1002, False),
    "rsv3": ([frame(BINARY, b"x", rsv=1)], [], 1002, False),
    "unmasked": ([frame(TEXT, b"x", mask=False)], [], 1002, False),
    "length-high-bit": ([struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + KEY], [], 1002, False),
    "ping-126": ([frame(PING, b"p" * 126)], [], 1002, False),
    "fragmented-ping": ([frame(PING, b"p", fin=False)], [], 1002, False),
    "lone-continuation": ([frame(CONT, b"x")], [], 1002, False),
    "text-inside-fragmented": ([frame(TEXT, b"a", fin=False), frame(TEXT, b"b")], [],
                               1002, False),
    "continuation-after-end": ([frame(TEXT, b"a"), frame(CONT, b"b")], [("text", "a")],
                               1002, False),
    "close-1-byte": ([frame(CLOSE, b"\x03")], [], 1002, False),
    "valid-then-invalid": ([frame(TEXT, b"ok"), frame(0x3)], [("text", "ok")], 1002, False),
    # -- invalid: 1007 (§8.1) ------------------------------------------------------------------
    "text-bad-utf8": ([frame(TEXT, b"ok \xff")], [], 1007, False),
    "text-truncated-utf8": ([frame(TEXT, E_ACUTE[:1])], [], 1007, False),
    "fragmented-bad-utf8": ([frame(TEXT, E_ACUTE[:1], fin=False), frame(CONT, b"A")], [],
                            1007, False),
    "close-reason-bad-utf8": ([frame(CLOSE, close_payload(1000, b"\xff"))], [], 1007, False),
    # -- invalid: 1009 (the table's limit, LIMIT bytes) -------------------------------------------
    "message-over-limit": ([frame(BINARY, b"x" * (LIMIT + 1))], [], 1009, False),
    "fragments-over-limit": ([frame(BINARY, b"x" * LIMIT, fin=False), frame(CONT, b"y")], [],
                             1009, False),
    # -- permessage-deflate agreed (RFC 7692) ----------------------------------------------------
    "deflate-text": ([frame(TEXT, HELLO_Z, rsv=4)], [("text", "hello")], None, True),
    "deflate-empty-message": ([frame(BINARY, EMPTY_Z, rsv=4)], [("bytes", b"")], None, True),
    "deflate-single-00": ([frame(TEXT, b"\x00", rsv=4)], [("text", "")], None, True),
    "deflate-context-takeover": ([frame(TEXT, TWO_Z[0], rsv=4), frame(TEXT, TWO_Z[1], rsv=4)],
                                 [("text", "the same words, twice")] * 2, None, True),
    "deflate-fragmented": ([frame(BINARY, BIG_Z[:7], rsv=4, fin=False), frame(PING, b"!"),
                            frame(CONT, BIG_Z[7:100], fin=False), frame(CONT, BIG_Z[100:])],
                           [("ping", b"!"), ("bytes", b"compressible " * 2000)], None, True),
    "deflate-ends-with-bfinal": ([frame(TEXT, FINAL_Z, rsv=4)], [("text", "ends with BFINAL")],
                                 None, True),
    "deflate-uncompressed-message": ([frame(TEXT, b"plain")], [("text", "plain")], None, True),
    "deflate-at-the-limit": ([frame(BINARY, deflated(b"\0" * LIMIT)[0], rsv=4)],
                             [("bytes", b"\0" * LIMIT)], None, True),
    "deflate-rsv1-on-continuation": ([frame(TEXT, HELLO_Z[:2], rsv=4, fin=False),
                                      frame(CONT, HELLO_Z[2:], rsv=4)], [], 1002, True),
    "deflate-rsv1-on-ping": ([frame(PING, b"", rsv=4)], [], 1002, True),
    "deflate-rsv1-on-close": ([frame(CLOSE, b"", rsv=4)], [], 1002, True),
    "deflate-rsv2": ([frame(TEXT, b"x", rsv=2)], [], 1002, True),
    "deflate-rsv1-rsv3": ([frame(TEXT, b"x", rsv=5)], [], 1002, True),
    "deflate-not-deflate-data": ([frame(BINARY, b"\xff\xff\xff", rsv=4)], [], 1007, True),
    "deflate-data-after-bfinal": ([frame(TEXT, FINAL_Z + b"\x00\x00\x00\xff\xff", rsv=4)], [],
                                  1007, True),
    "deflate-bad-utf8": ([frame(TEXT, deflated(b"ok \xff")[0], rsv=4)], [], 1007, True),
    "deflate-bomb": ([frame(BINARY, BOMB_Z, rsv=4)], [], 1009, True),
    "deflate-fragments-inflate-over-limit": (
        [frame(BINARY, BOMB_Z[:len(BOMB_Z) // 2], rsv=4, fin=False),
         frame(CONT, BOMB_Z[len(BOMB_Z) // 2:])], [], 1009, True),
}

TRAILER = frame(TEXT, b"next")[:3]      # the start of a frame that has not all arrived


def new_parser(with_deflate):
    return FrameParser(LIMIT, PerMessageDeflate() if with_deflate else None)


def drain(parser, events):
    while True:
        event = parser.next_event()
        if event is None:
            return
        events.append(event)


def run(chunks, with_deflate):
    """Feed chunks one by one; (events, error code or None, bytes left unparsed)."""
    parser = new_parser(with_deflate)
    events = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            drain(parser, events)
    except FrameError as err:
        return events, err.code, None
    return events, None, bytes(parser._buf)


@pytest.mark.parametrize("name", sorted(TABLE))
@pytest.mark.parametrize("how", ["whole", "byte-by-byte", "with-trailing-bytes"])
def test_frame_table(name, how):
    frames, expected, code, with_deflate = TABLE[name]
    data = b"".join(frames)
    if how == "whole":
        chunks = [data]
    elif how == "byte-by-byte":
        chunks = [data[i:i + 1] for i in range(len(data))]
    else:
        chunks = [data + TRAILER]
    events, got_code, left = run(chunks, with_deflate)
    assert events == expected, (name, how)
    assert got_code == code, (name, how)
    if code is None:
        assert left == (TRAILER if how == "with-trailing-bytes" else b""), (name, how)


def test_every_close_code_on_the_wire():
    """§7.4.1 and the IANA registry: what a close frame may carry."""
    allowed = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))
    for code in list(range(0, 1100)) + [1015, 1016, 2999, 3000, 4999, 5000, 65535]:
        events, got, _ = run([frame(CLOSE, close_payload(code))], False)
        if code in allowed:
            assert (events, got) == ([("close", code, "")], None), code
        else:
            assert (events, got) == ([], 1002), code


def test_no_message_size_limit():
    parser = FrameParser(0, PerMessageDeflate())
    parser.feed(frame(BINARY, BOMB_Z, rsv=4))
    assert parser.next_event() == ("bytes", b"\0" * (LIMIT + 1))


def test_a_deflate_bomb_is_never_inflated_whole():
    """The limit is checked while inflating: a message that would inflate
    to 64 MiB stops with 1009 after about the limit (4 MiB) of output."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\0" * (1 << 20)
    bomb = b"".join(c.compress(zeros) for _ in range(64)) + c.flush(zlib.Z_SYNC_FLUSH)[:-4]
    parser = FrameParser(4 << 20, PerMessageDeflate())
    parser.feed(frame(BINARY, bomb, rsv=4))
    tracemalloc.start()
    try:
        with pytest.raises(FrameError) as info:
            parser.next_event()
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == 1009
    assert peak < 12 << 20, "%d bytes at the peak for a 4 MiB limit" % peak


def test_compressed_frame_bigger_than_the_wire_limit_fails_before_it_is_buffered():
    """A compressed frame whose declared length could not inflate to within
    the limit is refused from its head, not after LIMIT bytes were read."""
    parser = FrameParser(LIMIT, PerMessageDeflate())
    parser.feed(struct.pack("!BBQ", 0xC2, 0xFF, 10 * LIMIT) + KEY)
    with pytest.raises(FrameError) as info:
        parser.next_event()
    assert info.value.code == 1009


# -- the serializer and the compressor ---------------------------------------------------------

@pytest.mark.parametrize("size, head", [
    (0, b"\x82\x00"), (125, b"\x82\x7d"), (126, b"\x82\x7e\x00\x7e"),
    (65535, b"\x82\x7e\xff\xff"), (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_server_frame_heads(size, head):
    assert pagi_ref.ws_frame_head(BINARY, size) == head
    compressed = pagi_ref.ws_frame_head(BINARY, size, compressed=True)
    assert compressed == bytes([head[0] | 0x40]) + head[1:]      # RSV1 (RFC 7692 §6)


@pytest.mark.parametrize("takeover", [True, False])
def test_compress_is_what_a_client_inflates(takeover):
    deflate = PerMessageDeflate(server_no_context_takeover=not takeover,
                                server_max_window_bits=12)
    client = zlib.decompressobj(-12)
    sizes = []
    for _ in range(3):
        message = b'{"event": "tick", "value": 42}'
        wire = deflate.compress(message)
        assert not wire.endswith(b"\x00\x00\xff\xff")
        assert client.decompress(wire + b"\x00\x00\xff\xff") == message
        sizes.append(len(wire))
    if takeover:
        assert sizes[1] < sizes[0]
    else:
        assert sizes[0] == sizes[1] == sizes[2]
    assert deflate.compress(b"") == b"\x00"                     # §7.2.3.6


def test_window_8_compresses_to_what_an_8_bit_window_inflates():
    """zlib deflates with 9 bits at least; its matches then reach back 250
    bytes at most, within the 256 an agreed server_max_window_bits=8 allows."""
    block = os.urandom(300)               # repeats at distance 300: not reachable
    message = block * 50 + os.urandom(200) * 50
    deflate = PerMessageDeflate(server_max_window_bits=8)
    client = zlib.decompressobj(-8)
    for _ in range(3):
        assert client.decompress(deflate.compress(message) + b"\x00\x00\xff\xff") == message


# -- Sec-WebSocket-Extensions (RFC 6455 §9.1) and the offers (RFC 7692 §7) -----------------------

@pytest.mark.parametrize("values, offers", [
    ([b"permessage-deflate"], [("permessage-deflate", [])]),
    ([b"permessage-deflate; client_max_window_bits"],
     [("permessage-deflate", [("client_max_window_bits", None)])]),
    ([b'Permessage-Deflate ; Server_Max_Window_Bits = "1\\0" ,, x-ext;a=b'],
     [("permessage-deflate", [("server_max_window_bits", "10")]), ("x-ext", [("a", "b")])]),
    ([b"a", b"b; c"], [("a", []), ("b", [("c", None)])]),
    ([b" , "], []),
])
def test_extension_offers(values, offers):
    assert pagi_ref.extension_offers(values) == offers


@pytest.mark.parametrize("value", [
    b"a b", b"a; =1", b"a; b=", b'a; b="1', b'a; b="x y"', b"a; b=1=2", b"; b", b"a;;b",
    b"a; b=\x80",
])
def test_extension_offers_malformed(value):
    with pytest.raises(ValueError):
        pagi_ref.extension_offers([value])


@pytest.mark.parametrize("params, response", [
    ([], b"permessage-deflate; server_max_window_bits=12"),
    ([("client_max_window_bits", None)],
     b"permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"),
    ([("client_max_window_bits", "9"), ("server_max_window_bits", "8")],
     b"permessage-deflate; server_max_window_bits=8; client_max_window_bits=9"),
    ([("server_no_context_takeover", None), ("client_no_context_takeover", None)],
     b"permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
     b"server_max_window_bits=12"),
    ([("x", None)], None),
    ([("client_max_window_bits", None), ("client_max_window_bits", None)], None),
    ([("server_max_window_bits", None)], None),
    ([("server_max_window_bits", "16")], None),
    ([("server_max_window_bits", "7")], None),
    ([("server_max_window_bits", "010")], None),
    ([("client_max_window_bits", "0x9")], None),
    ([("server_no_context_takeover", "true")], None),
])
def test_offer_accepted_or_declined(params, response):
    agreed = PerMessageDeflate.accept(params)
    if response is None:
        assert agreed is None
    else:
        assert agreed.response == response


def test_a_forgotten_compressor_still_makes_what_the_client_inflates():
    """The server may drop its deflate state between any two messages (an
    idle session does): the client's inflater, which keeps its context,
    takes the fresh stream."""
    deflate = PerMessageDeflate(server_max_window_bits=12)
    client = zlib.decompressobj(-12)
    message = b'{"event": "tick", "value": 42}'
    first = deflate.compress(message)
    again = deflate.compress(message)
    deflate.forget_compressor()
    fresh = deflate.compress(message)
    assert len(again) < len(first) == len(fresh)
    for wire in (first, again, fresh, deflate.compress(message)):
        assert client.decompress(wire + b"\x00\x00\xff\xff") == message
