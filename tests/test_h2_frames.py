"""Section 4b, from bytes alone: H2Protocol, the sans-I/O HTTP/2 server
side (RFC 9113).  Every case runs three ways, as the HTTP/1.1 parser's
tests do: the bytes fed whole, fed byte by byte, and followed by trailing
bytes (a PING, whose acknowledgement must come out -- or, after a
connection error, must not)."""
import struct

import pytest

import pagi_ref
from h2util import (ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS,
                    PADDED, PING, PREFACE, PRIORITY, PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM,
                    SETTINGS, WINDOW_UPDATE, client_start, data, frame, goaway, headers,
                    parse_frames, ping, request_fields, rst_stream, settings, window_update)

P = pagi_ref
TRAILING_PING = ping(b"trailing")


def run(chunks, protocol=None, **kw):
    """Feed ``chunks`` (bytes after the client preface); returns
    (events, frames the server wrote after its own SETTINGS)."""
    h2 = protocol or P.H2Protocol(**kw)
    h2.initiate()
    events = []
    for chunk in chunks:
        events += h2.feed(chunk)
    out = bytearray(h2.data_to_send())
    frames = parse_frames(out)
    assert not out
    assert frames[0][0] == SETTINGS and not frames[0][1] & ACK
    return events, frames[1:], h2


def three_ways(wire, **kw):
    """The same answer fed whole, byte by byte, and with a trailing PING."""
    whole = run([client_start() + wire], **kw)
    split = run([bytes([b]) for b in client_start() + wire], **kw)
    trailing = run([client_start() + wire + TRAILING_PING], **kw)
    assert _shape(whole[0]) == _shape(split[0]) == _shape(trailing[0][:len(whole[0])])
    assert whole[1] == split[1] == trailing[1][:len(whole[1])]
    ended = whole[2].ended
    extra = trailing[1][len(whole[1]):]
    if ended:
        assert extra == [], "bytes after a connection error must not be read"
    else:
        assert extra == [(PING, ACK, 0, b"trailing")]
    return whole


def _shape(events):
    out = []
    for e in events:
        if isinstance(e, P.H2Request):
            out.append(("request", e.stream_id, e.head.method, e.head.path,
                        e.head.query_string, tuple(e.head.headers), e.end_stream))
        else:
            out.append(repr(e))
    return out


def goaway_code(frames):
    codes = [struct.unpack(">II", f[3][:8])[1] for f in frames if f[0] == GOAWAY]
    return codes[-1] if codes else None


def rst_codes(frames):
    return {f[2]: struct.unpack(">I", f[3])[0] for f in frames if f[0] == RST_STREAM}


def req(sid=1, end_stream=True, **kw):
    return headers(sid, request_fields(**kw), end_stream=end_stream)


# -- the preface and SETTINGS ---------------------------------------------------------

def test_preface_and_settings_are_acknowledged():
    events, frames, h2 = three_ways(b"")
    assert events == []
    assert frames == [(SETTINGS, ACK, 0, b"")]


def test_server_settings_name_the_limits():
    h2 = P.H2Protocol(max_concurrent_streams=7, max_header_list_size=1234)
    h2.initiate()
    frames = parse_frames(bytearray(h2.data_to_send()))
    payload = frames[0][3]
    pairs = dict(struct.unpack(">HI", payload[i:i + 6]) for i in range(0, len(payload), 6))
    assert pairs == {3: 7, 6: 1234}


@pytest.mark.parametrize("wire", [b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"])
def test_invalid_preface_is_protocol_error(wire):
    events, frames, h2 = run([wire + TRAILING_PING])
    assert h2.ended and goaway_code(frames) == P.H2_PROTOCOL_ERROR
    assert isinstance(events[-1], P.H2GoAway) and not events[-1].remote


def test_preface_must_be_followed_by_settings():
    events, frames, h2 = run([PREFACE + ping() + TRAILING_PING])
    assert goaway_code(frames) == P.H2_PROTOCOL_ERROR


@pytest.mark.parametrize("wire, code", [
    (frame(SETTINGS, 0, 1, b""), P.H2_PROTOCOL_ERROR),                  # §6.5: stream 0 only
    (frame(SETTINGS, ACK, 0, b"\0" * 6), P.H2_FRAME_SIZE_ERROR),        # ACK with payload
    (frame(SETTINGS, 0, 0, b"\0" * 5), P.H2_FRAME_SIZE_ERROR),          # not a multiple of 6
    (settings((2, 2)), P.H2_PROTOCOL_ERROR),                            # ENABLE_PUSH 2
    (settings((4, 1 << 31)), P.H2_FLOW_CONTROL_ERROR),                  # window over 2^31-1
    (settings((5, 16383)), P.H2_PROTOCOL_ERROR),                        # MAX_FRAME_SIZE low
    (settings((5, 1 << 24)), P.H2_PROTOCOL_ERROR),                      # MAX_FRAME_SIZE high
])
def test_bad_settings_are_connection_errors(wire, code):
    events, frames, h2 = three_ways(wire)
    assert goaway_code(frames) == code


def test_unknown_setting_is_ignored_and_acknowledged():
    events, frames, h2 = three_ways(settings((0x99, 5)))
    assert frames[-1] == (SETTINGS, ACK, 0, b"")
    assert not h2.ended


# -- PING, GOAWAY, unknown frames, PRIORITY --------------------------------------------

def test_ping_is_answered_with_the_same_payload():
    events, frames, h2 = three_ways(ping(b"abcdefgh"))
    assert (PING, ACK, 0, b"abcdefgh") in frames


def test_ping_ack_is_not_answered():
    events, frames, h2 = three_ways(ping(b"abcdefgh", ack=True))
    assert [f for f in frames if f[0] == PING and f[3] == b"abcdefgh"] == []


@pytest.mark.parametrize("wire, code", [
    (frame(PING, 0, 1, b"12345678"), P.H2_PROTOCOL_ERROR),
    (frame(PING, 0, 0, b"1234567"), P.H2_FRAME_SIZE_ERROR),
    (frame(GOAWAY, 0, 1, b"\0" * 8), P.H2_PROTOCOL_ERROR),
    (frame(GOAWAY, 0, 0, b"\0" * 7), P.H2_FRAME_SIZE_ERROR),
    (frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2"), P.H2_PROTOCOL_ERROR),
    (frame(PRIORITY, 0, 0, b"\0" * 5), P.H2_PROTOCOL_ERROR),
    (frame(RST_STREAM, 0, 0, b"\0" * 4), P.H2_PROTOCOL_ERROR),
    (frame(DATA, 0, 0, b"x"), P.H2_PROTOCOL_ERROR),
    (frame(HEADERS, END_HEADERS, 0, b"\x82"), P.H2_PROTOCOL_ERROR),
    (frame(WINDOW_UPDATE, 0, 0, b"\0\0\0"), P.H2_FRAME_SIZE_ERROR),
    (window_update(0, 0), P.H2_PROTOCOL_ERROR),
    (frame(CONTINUATION, END_HEADERS, 1, b""), P.H2_PROTOCOL_ERROR),
    (frame(DATA, 0, 1, b"x" * 16385), P.H2_FRAME_SIZE_ERROR),          # §4.2
])
def test_connection_errors(wire, code):
    events, frames, h2 = three_ways(wire)
    assert goaway_code(frames) == code
    assert isinstance(events[-1], P.H2GoAway)


def test_goaway_from_the_client_is_an_event():
    events, frames, h2 = three_ways(goaway(0, 0))
    assert len(events) == 1 and events[0].remote and events[0].code == 0


def test_unknown_frame_type_is_ignored():
    events, frames, h2 = three_ways(frame(0x42, 0xff, 3, b"whatever"))
    assert events == [] and not h2.ended


def test_priority_is_ignored_even_on_an_idle_stream():
    events, frames, h2 = three_ways(frame(PRIORITY, 0, 3, b"\0\0\0\1\x10"))
    assert events == [] and goaway_code(frames) is None


def test_priority_of_the_wrong_size_is_a_stream_error():
    events, frames, h2 = three_ways(frame(PRIORITY, 0, 3, b"\0\0\0\1"))
    assert rst_codes(frames) == {3: P.H2_FRAME_SIZE_ERROR}


def test_priority_on_itself_is_a_stream_error():
    events, frames, h2 = three_ways(frame(PRIORITY, 0, 3, b"\0\0\0\3\x10"))
    assert rst_codes(frames) == {3: P.H2_PROTOCOL_ERROR}


# -- requests -----------------------------------------------------------------------

def test_get_request_maps_pseudo_headers():
    wire = headers(1, request_fields("GET", "/a%20b?x=1", "example.com:8080",
                                     extra=[(b"accept", b"*/*")]))
    events, frames, h2 = three_ways(wire)
    (event,) = events
    head = event.head
    assert event.stream_id == 1 and event.end_stream
    assert head.method == "GET" and head.http_version == "2"
    assert head.path == b"/a%20b" and head.query_string == b"x=1"
    # PAGI: pseudo-headers removed, :authority becomes host
    assert head.headers == [(b"accept", b"*/*"), (b"host", b"example.com:8080")]


def test_authority_overrides_host():
    events, _, _ = three_ways(req(extra=[(b"host", b"other")]))
    assert events[0].head.headers == [(b"host", b"example.com")]


def test_host_is_used_without_authority():
    events, _, _ = three_ways(req(authority=None, extra=[(b"host", b"h.example")]))
    assert events[0].head.headers == [(b"host", b"h.example")]


def test_cookie_crumbs_are_joined():
    events, _, _ = three_ways(req(extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")]))
    assert (b"cookie", b"a=1; b=2") in events[0].head.headers


def test_event_stream_accept_is_noted():
    events, _, _ = three_ways(req(extra=[(b"accept", b"text/event-stream")]))
    assert events[0].head.accept == b"text/event-stream"


def test_request_with_body_and_end_stream():
    wire = req(end_stream=False, method="POST") + data(1, b"hello") + data(1, b" world",
                                                                          end_stream=True)
    events, frames, h2 = three_ways(wire)
    assert [type(e).__name__ for e in events] == ["H2Request", "H2Data", "H2Data"]
    assert events[1].data == b"hello" and not events[1].end_stream
    assert events[2].data == b" world" and events[2].end_stream


def test_padded_data_gives_back_its_padding():
    wire = req(end_stream=False, method="POST") + data(1, b"abc", pad=10)
    events, frames, h2 = three_ways(wire)
    assert events[1].data == b"abc" and events[1].flow == 3
    assert h2.streams[1].unacked == 11 - 0      # pad length byte + 10 bytes of padding


def test_padding_longer_than_payload_is_protocol_error():
    wire = req(end_stream=False) + frame(DATA, PADDED, 1, b"\x05abc")
    events, frames, h2 = three_ways(wire)
    assert goaway_code(frames) == P.H2_PROTOCOL_ERROR


def test_request_trailers():
    wire = (req(end_stream=False, method="POST") + data(1, b"x")
            + headers(1, [(b"x-sum", b"1")], end_stream=True))
    events, frames, h2 = three_ways(wire)
    assert isinstance(events[-1], P.H2Trailers)
    assert events[-1].headers == [(b"x-sum", b"1")]


def test_trailers_without_end_stream_are_malformed():
    wire = req(end_stream=False) + headers(1, [(b"x-sum", b"1")], end_stream=False)
    events, frames, h2 = three_ways(wire)
    assert rst_codes(frames) == {1: P.H2_PROTOCOL_ERROR}
    assert isinstance(events[-1], P.H2Reset) and not events[-1].remote


def test_headers_split_across_continuation():
    block = P.HPACKEncoder().encode(request_fields(path="/cont"))
    wire = (frame(HEADERS, END_STREAM, 1, block[:3]) + frame(CONTINUATION, 0, 1, block[3:5])
            + frame(CONTINUATION, END_HEADERS, 1, block[5:]))
    events, frames, h2 = three_ways(wire)
    assert events[0].head.path == b"/cont"


def test_interleaved_frame_in_a_header_block_is_protocol_error():
    block = P.HPACKEncoder().encode(request_fields())
    wire = frame(HEADERS, END_STREAM, 1, block[:3]) + ping() + \
        frame(CONTINUATION, END_HEADERS, 1, block[3:])
    events, frames, h2 = three_ways(wire)
    assert goaway_code(frames) == P.H2_PROTOCOL_ERROR


def test_continuation_on_another_stream_is_protocol_error():
    block = P.HPACKEncoder().encode(request_fields())
    wire = frame(HEADERS, END_STREAM, 1, block[:3]) + frame(CONTINUATION, END_HEADERS, 3,
                                                            block[3:])
    events, frames, h2 = three_ways(wire)
    assert goaway_code(frames) == P.H2_PROTOCOL_ERROR


def test_headers_with_priority_and_padding():
    block = P.HPACKEncoder().encode(request_fields(path="/p"))
    payload = b"\x02" + b"\0\0\0\0\x10" + block + b"\0\0"
    events, frames, h2 = three_ways(frame(HEADERS, END_STREAM | END_HEADERS | PADDED
                                          | PRIORITY_FLAG, 1, payload))
    assert events[0].head.path == b"/p"


def test_headers_depending_on_itself_is_a_stream_error():
    block = P.HPACKEncoder().encode(request_fields())
    events, frames, h2 = three_ways(frame(HEADERS, END_STREAM | END_HEADERS | PRIORITY_FLAG,
                                          1, b"\0\0\0\1\x10" + block))
    assert rst_codes(frames) == {1: P.H2_PROTOCOL_ERROR} and not h2.ended


@pytest.mark.parametrize("fields", [
    [(b":method", b"GET"), (b":path", b"/")],                              # no :scheme
    [(b":method", b"GET"), (b":scheme", b"http")],                         # no :path
    [(b":scheme", b"http"), (b":path", b"/")],                             # no :method
    request_fields() + [(b":path", b"/again")],                            # pseudo after
    request_fields()[:2] + [(b"x", b"1")] + request_fields()[2:],          # field, then pseudo
    request_fields() + [(b":status", b"200")],                             # response pseudo
    [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
    request_fields() + [(b":protocol", b"websocket")],                     # unknown pseudo
    request_fields(extra=[(b"Upper", b"x")]),                              # upper case
    request_fields(extra=[(b"connection", b"keep-alive")]),                # §8.2.2
    request_fields(extra=[(b"transfer-encoding", b"chunked")]),
    request_fields(extra=[(b"te", b"gzip")]),
    request_fields(extra=[(b"x", b" leading")]),                           # §8.2.1
    request_fields(extra=[(b"x", b"a\rb")]),
    request_fields(path=""),
    request_fields(path="relative"),
    request_fields(method="CONNECT"),
    request_fields(authority="user@host"),
    request_fields(extra=[(b"content-length", b"x")]),
])
def test_malformed_requests_are_stream_errors(fields):
    wire = headers(1, fields) + req(sid=3)
    events, frames, h2 = three_ways(wire)
    assert rst_codes(frames) == {1: P.H2_PROTOCOL_ERROR}
    assert not h2.ended
    assert [e.stream_id for e in events if isinstance(e, P.H2Request)] == [3]


def test_te_trailers_is_allowed():
    events, frames, h2 = three_ways(req(extra=[(b"te", b"trailers")]))
    assert isinstance(events[0], P.H2Request)


def test_content_length_must_match_the_data():
    wire = req(end_stream=False, method="POST", extra=[(b"content-length", b"3")]) + \
        data(1, b"ab", end_stream=True)
    events, frames, h2 = three_ways(wire)
    assert rst_codes(frames) == {1: P.H2_PROTOCOL_ERROR}


def test_content_length_over_data_is_a_stream_error():
    wire = req(end_stream=False, method="POST", extra=[(b"content-length", b"1")]) + \
        data(1, b"ab")
    events, frames, h2 = three_ways(wire)
    assert rst_codes(frames) == {1: P.H2_PROTOCOL_ERROR}


# -- stream states (§5.1) -----------------------------------------------------------

@pytest.mark.parametrize("wire", [
    data(1, b"x"), rst_stream(1), window_update(1, 1), frame(CONTINUATION, END_HEADERS, 1),
])
def test_frames_on_idle_streams_are_protocol_errors(wire):
    events, frames, h2 = three_ways(wire)
    assert goaway_code(frames) == P.H2_PROTOCOL_ERROR


def test_even_stream_is_protocol_error():
    events, frames, h2 = three_ways(req(sid=2))
    assert goaway_code(frames) == P.H2_PROTOCOL_ERROR


def test_lower_stream_id_is_protocol_error():
    events, frames, h2 = three_ways(req(sid=5) + req(sid=3))
    assert goaway_code(frames) == P.H2_PROTOCOL_ERROR


def test_data_after_end_stream_is_stream_closed():
    events, frames, h2 = three_ways(req() + data(1, b"x"))
    assert rst_codes(frames) == {1: P.H2_STREAM_CLOSED}


def test_headers_after_end_stream_is_stream_closed():
    events, frames, h2 = three_ways(req() + headers(1, [(b"x", b"1")]))
    assert rst_codes(frames) == {1: P.H2_STREAM_CLOSED}


def test_data_on_a_closed_stream_is_connection_error():
    h2 = P.H2Protocol()
    run([client_start() + req()], h2)
    h2.send_headers(1, [(b":status", b"200")], end_stream=True)   # both ends closed
    h2.data_to_send()
    h2.feed(data(1, b"x"))
    frames = parse_frames(bytearray(h2.data_to_send()))
    assert goaway_code(frames) == P.H2_STREAM_CLOSED


def test_frames_after_our_reset_are_ignored():
    h2 = P.H2Protocol()
    run([client_start() + req(end_stream=False)], h2)
    h2.reset_stream(1, P.H2_CANCEL)
    h2.data_to_send()
    events = h2.feed(data(1, b"x") + headers(1, [(b"x", b"1")]) + TRAILING_PING)
    frames = parse_frames(bytearray(h2.data_to_send()))
    assert events == [] and frames == [(PING, ACK, 0, b"trailing")]


def test_client_reset_is_an_event_and_closes_the_stream():
    events, frames, h2 = three_ways(req(end_stream=False) + rst_stream(1, 8))
    assert isinstance(events[-1], P.H2Reset) and events[-1].remote and events[-1].code == 8
    assert 1 not in h2.streams


def test_rst_stream_of_wrong_size_is_frame_size_error():
    events, frames, h2 = three_ways(req(end_stream=False) + frame(RST_STREAM, 0, 1, b"\0\0\0"))
    assert goaway_code(frames) == P.H2_FRAME_SIZE_ERROR


def test_concurrent_stream_limit_refuses_with_refused_stream():
    wire = b"".join(req(sid=s, end_stream=False) for s in (1, 3, 5))
    events, frames, h2 = three_ways(wire, max_concurrent_streams=2)
    assert rst_codes(frames) == {5: P.H2_REFUSED_STREAM}
    assert [e.stream_id for e in events] == [1, 3]


# -- flow control (§5.2, §6.9) -------------------------------------------------------

def test_data_beyond_the_stream_window_is_flow_control_error():
    wire = req(end_stream=False) + b"".join(data(1, b"x" * 16384) for _ in range(4)) + \
        data(1, b"x" * 16)
    events, frames, h2 = three_ways(wire)
    assert rst_codes(frames) == {1: P.H2_FLOW_CONTROL_ERROR}


def test_consumed_bytes_reopen_the_stream_window():
    h2 = P.H2Protocol()
    run([client_start() + req(end_stream=False) + data(1, b"x" * 40000)], h2)
    h2.consumed(1, 40000)
    frames = parse_frames(bytearray(h2.data_to_send()))
    assert (WINDOW_UPDATE, 0, 1, struct.pack(">I", 40000)) in frames


def test_connection_window_is_given_back_on_receipt():
    events, frames, h2 = three_ways(req(end_stream=False) + data(1, b"x" * 16384)
                                    + data(1, b"x" * 16384))
    assert (WINDOW_UPDATE, 0, 0, struct.pack(">I", 32768)) in frames


def test_window_update_overflow():
    events, frames, h2 = three_ways(window_update(0, (1 << 31) - 1))
    assert goaway_code(frames) == P.H2_FLOW_CONTROL_ERROR
    events, frames, h2 = three_ways(req(end_stream=False) + window_update(1, (1 << 31) - 1))
    assert rst_codes(frames) == {1: P.H2_FLOW_CONTROL_ERROR}


def test_window_update_of_zero_on_a_stream_is_a_stream_error():
    events, frames, h2 = three_ways(req(end_stream=False) + window_update(1, 0))
    assert rst_codes(frames) == {1: P.H2_PROTOCOL_ERROR}


def test_send_data_respects_windows_and_frame_size():
    h2 = P.H2Protocol()
    run([client_start() + req()], h2)
    assert h2.send_window_for(1) == 65535
    h2.send_headers(1, [(b":status", b"200")])
    h2.send_data(1, b"y" * 40000)
    assert h2.send_window_for(1) == 65535 - 40000
    frames = parse_frames(bytearray(h2.data_to_send()))
    sizes = [len(f[3]) for f in frames if f[0] == DATA]
    assert sizes == [16384, 16384, 40000 - 32768]
    h2.feed(window_update(0, 100) + window_update(1, 50))
    assert h2.send_window_for(1) == 65535 - 40000 + 50


def test_initial_window_size_setting_moves_open_streams():
    h2 = P.H2Protocol()
    run([client_start() + req()], h2)
    events = h2.feed(settings((4, 100000)))
    assert h2.streams[1].send_window == 100000
    assert any(isinstance(e, P.H2WindowOpened) for e in events)


def test_large_response_headers_use_continuation():
    h2 = P.H2Protocol()
    run([client_start() + req()], h2)
    h2.send_headers(1, [(b":status", b"200"), (b"x-big", b"v" * 40000)], end_stream=True)
    frames = parse_frames(bytearray(h2.data_to_send()))
    assert [f[0] for f in frames] == [HEADERS, CONTINUATION, CONTINUATION]
    assert frames[-1][1] & END_HEADERS and frames[0][1] & END_STREAM


# -- defences (issue 15 item 5) -----------------------------------------------------

def test_ping_flood_is_enhance_your_calm():
    events, frames, h2 = run([client_start() + ping() * (P._H2_FLOOD_BUDGET + 1)])
    assert goaway_code(frames) == P.H2_ENHANCE_YOUR_CALM


def test_empty_data_flood_is_enhance_your_calm():
    wire = req(end_stream=False) + data(1, b"") * (P._H2_FLOOD_BUDGET + 1)
    events, frames, h2 = run([client_start() + wire])
    assert goaway_code(frames) == P.H2_ENHANCE_YOUR_CALM


def test_rapid_reset_is_enhance_your_calm():
    n = 2 * 4 + 1
    wire = b"".join(req(sid=2 * i + 1, end_stream=False) + rst_stream(2 * i + 1)
                    for i in range(n))
    events, frames, h2 = run([client_start() + wire], max_concurrent_streams=4)
    assert goaway_code(frames) == P.H2_ENHANCE_YOUR_CALM


def test_continuation_flood_is_bounded_in_frames():
    block = P.HPACKEncoder().encode(request_fields())
    wire = frame(HEADERS, 0, 1, block) + frame(CONTINUATION, 0, 1, b"") * P._H2_BLOCK_FRAMES
    events, frames, h2 = run([client_start() + wire])
    assert goaway_code(frames) == P.H2_ENHANCE_YOUR_CALM


def test_continuation_flood_is_bounded_in_bytes():
    h2 = P.H2Protocol(max_header_list_size=1000)
    chunk = b"\0" * 1000
    wire = frame(HEADERS, 0, 1, chunk) + frame(CONTINUATION, 0, 1, chunk) * 3
    events, frames, h2 = run([client_start() + wire], h2)
    assert goaway_code(frames) == P.H2_ENHANCE_YOUR_CALM


def test_header_list_over_the_limit_is_an_event_and_keeps_the_table():
    big = request_fields(extra=[(b"x-big", b"v" * 2000)])
    wire = headers(1, big) + req(sid=3)
    events, frames, h2 = three_ways(wire, max_header_list_size=1000)
    assert isinstance(events[0], P.H2HeadersTooLarge) and events[0].stream_id == 1
    assert isinstance(events[1], P.H2Request) and events[1].stream_id == 3


def test_bad_hpack_is_compression_error():
    events, frames, h2 = three_ways(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x80"))
    assert goaway_code(frames) == P.H2_COMPRESSION_ERROR


def test_goaway_names_the_last_stream():
    h2 = P.H2Protocol()
    run([client_start() + req(sid=1) + req(sid=7)], h2)
    h2.goaway(P.H2_NO_ERROR)
    frames = parse_frames(bytearray(h2.data_to_send()))
    assert frames[-1][0] == GOAWAY and struct.unpack(">II", frames[-1][3][:8]) == (7, 0)
    # Streams after our GOAWAY are ignored (§6.8).
    assert h2.feed(req(sid=9)) == []


# -- hostile input: random frames (seeded, bounded) -------------------------------------

def _random_frame(rng, encoder):
    """A frame a fuzzer would send: any type (and unknown ones), any flags,
    a few stream ids, short payloads; now and then a real request's HEADERS."""
    if rng.random() < 0.2:
        sid = rng.choice((1, 3, 5, 7, 2, 0))
        return headers(sid, request_fields(), end_stream=rng.random() < 0.5, encoder=encoder,
                       end_headers=rng.random() < 0.8)
    ftype = rng.choice((DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING,
                        GOAWAY, WINDOW_UPDATE, CONTINUATION, 0x0b, 0xfa))
    flags = rng.choice((0, ACK, END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG, 0xff,
                        rng.randrange(256)))
    sid = rng.choice((0, 1, 2, 3, 5, 0x7fffffff, 0x80000001))
    size = rng.choice((0, 1, 4, 5, 6, 8, 9, rng.randrange(64)))
    return frame(ftype, flags, sid, bytes(rng.randrange(256) for _ in range(size)))


def test_random_frames_never_raise_and_do_not_depend_on_segmentation():
    """The engine's only answers to hostile frames are events, RST_STREAM and
    GOAWAY (RFC 9113 §5.4): no exception escapes feed(), and the same bytes
    cut at any point give the same frames out.  600 seeded sequences."""
    import random
    rng = random.Random(20261127)
    for case in range(600):
        encoder = P.HPACKEncoder()
        wire = client_start() + b"".join(_random_frame(rng, encoder)
                                         for _ in range(rng.randrange(1, 8)))
        cut = rng.randrange(len(wire) + 1)
        try:
            whole_events, whole_out, _ = run([wire])
            split_events, split_out, _ = run([wire[:cut], wire[cut:]])
        except Exception as exc:       # pragma: no cover - the failure's report
            raise AssertionError("case %d raised %r on %r" % (case, exc, wire)) from exc
        assert _shape(whole_events) == _shape(split_events), (case, wire, cut)
        assert whole_out == split_out, (case, wire, cut)
