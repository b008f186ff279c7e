"""Section 4 under random input: a bounded, seeded fuzz of the parser.

Whatever the bytes, the parser either returns events or raises HTTPError with
a status from the server-generated set -- never another exception, and never
an HTTPError that wraps a bug (``__cause__``) -- and feeding the same bytes
whole or in random slices gives the same outcome: the same events, or the
same error with the same message.  Besides random mutations of valid
requests, the families of hostile heads (tests/test_hostile.py) are fuzzed
with random sizes and positions.
The run is bounded (a fixed number of cases, a fixed seed), so it is a test,
not a load: reproduce a failure with its printed case number.
"""
import random

from test_http_wire import outcome as parse_outcome

STATUSES = {400, 413, 414, 431, 501, 505}
CASES = 10000

VALID = [
    b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
]
ALPHABET = b"\r\n :;\t\x00\x7f\x80\xffGETPOSTHTTP/1.01chunkedContent-Length0123456789abcdef"


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 1:
            data[pos:pos] = bytes([rng.choice(ALPHABET)])
        elif op == 2 and data:
            data[min(pos, len(data) - 1)] = rng.choice(ALPHABET)
        else:
            other = rng.choice(VALID)
            cut = rng.randrange(len(other))
            data[pos:pos] = other[cut:cut + rng.randint(1, 20)]
    return bytes(data)


def outcome(pieces, config):
    """('ok', events) or ('error', status, message): test_http_wire's, with
    the status held to the server-generated set."""
    result = parse_outcome(pieces, **config)
    if result[0] == "error":
        assert result[1] in STATUSES, result
    return result


def slices(rng, data):
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 8)
        out.append(data[i:i + n])
        i += n
    return out


def test_random_mutations_never_crash_and_slicing_does_not_change_the_outcome():
    rng = random.Random(20261126)
    config = dict(max_header_size=512, max_header_count=8, max_body_size=64)
    for case in range(CASES):
        data = mutate(rng, rng.choice(VALID))
        whole = outcome([data], config)
        sliced = outcome(slices(rng, data), config)
        assert whole == sliced, "case %d: %r\nwhole:  %r\nsliced: %r" % (case, data, whole, sliced)


def hostile(rng):
    """One head from the hostile families, with random sizes and positions."""
    family = rng.randrange(6)
    pad = b" " * rng.randint(0, 40)
    bad = rng.choice([b"\x00", b"\x01", b"\x7f", b"\r", b"\n", b""])
    if family == 0:      # OWS runs on many lines, an invalid byte later
        lines = b"".join(b"X-P%d:%s%s\r\n" % (i, pad, rng.choice([b"v", b""]))
                         for i in range(rng.randint(1, 12)))
        return b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"X-Bad: a" + bad + b"\r\n\r\n"
    if family == 1:      # long digit strings
        digits = rng.choice([b"0", b"9", b"1"]) * rng.randint(1, 600) + rng.choice([b"", b"5"])
        if rng.random() < 0.5:
            return b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + digits + b"\r\n\r\nhello"
        return (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                + digits + b"\r\nhello\r\n0\r\n\r\n")
    if family == 2:      # a long run of one byte at a random place
        base = bytearray(rng.choice(VALID))
        pos = rng.randrange(len(base) + 1)
        base[pos:pos] = bytes([rng.choice(ALPHABET)]) * rng.randint(1, 700)
        return bytes(base)
    if family == 3:      # deep chunk extensions
        ext = b";a=b" * rng.randint(0, 200) + rng.choice([b"", b";", b"=", b'"'])
        return (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5"
                + ext + b"\r\nhello\r\n0\r\n\r\n")
    if family == 4:      # many tiny header fields
        return (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"a:\r\n" * rng.randint(0, 20)
                + rng.choice([b"", b"b\r\n", b" c:d\r\n"]) + b"\r\n")
    # empty lines before the request line, some bare
    return rng.choice([b"\r\n", b"\n", b"\r"]) * rng.randint(0, 20) + rng.choice(VALID)


def test_hostile_families_never_crash_and_slicing_does_not_change_the_outcome():
    rng = random.Random(20261127)
    config = dict(max_header_size=512, max_header_count=8, max_body_size=64)
    for case in range(2000):
        data = hostile(rng)
        whole = outcome([data], config)
        sliced = outcome(slices(rng, data), config)
        bytewise = outcome([data[i:i + 1] for i in range(len(data))], config)
        assert whole == sliced == bytewise, "case %d: %r\nwhole:  %r\nsliced: %r\nbytes:  %r" % (
            case, data, whole, sliced, bytewise)
