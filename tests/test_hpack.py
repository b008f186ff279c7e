"""Section 4a, HPACK (RFC 7541), tested from bytes.

- Appendix C, every example: C.1 integers, C.2 single fields, C.3/C.4
  three requests without and with Huffman coding, C.5/C.6 three responses
  with a 256-octet table.  The decoder gives the listed header lists and
  the listed dynamic tables; our encoder's blocks decode back to the same
  lists and leave the same tables, and are the RFC's bytes wherever the
  RFC made our choices (C.4 and C.6, but for one value whose Huffman
  code is no shorter: we send it plain).
- Appendix B: the Huffman table is canonical and complete, and every
  octet round-trips.
- Malformed blocks, one row each, with the words the error must contain;
  the header-list limit (the block is still applied to the table, so the
  decoder goes on); an HPACK bomb, bounded in memory by the limit.
- Random blocks raise HPACKError and nothing else; random header lists
  round-trip through an encoder and a decoder whose tables stay equal.
"""
import random
import tracemalloc

import pytest

from conftest import ROOT  # noqa: F401  (puts the checkout on sys.path)
import pagi_ref
from pagi_ref import (HPACKDecoder, HPACKEncoder, HPACKError, HeaderListTooLarge,
                      STATIC_TABLE, _decode_integer, _encode_integer, huffman_decode,
                      huffman_encode)


def h(text):
    """Bytes from the RFC's hex dumps: pairs of hex digits, spaces ignored."""
    return bytes.fromhex("".join(text.split()))


def fields(text):
    """A header list from the RFC's "name: value" lines."""
    out = []
    for line in text.strip().splitlines():
        name, _, value = line.strip().partition(": ")
        out.append((name.encode(), value.encode()))
    return out


# -- C.1 integers ------------------------------------------------------------------

@pytest.mark.parametrize("value, prefix_bits, wire", [
    (10, 5, h("0a")),            # C.1.1
    (1337, 5, h("1f 9a 0a")),    # C.1.2
    (42, 8, h("2a")),            # C.1.3
    (30, 5, h("1e")),            # just under the prefix
    (31, 5, h("1f 00")),         # exactly the prefix: a zero continuation octet
    (2 ** 28 + 30, 5, h("1f ff ff ff 7f")),     # the largest four continuation octets carry
])
def test_integers_c1(value, prefix_bits, wire):
    assert _encode_integer(value, prefix_bits) == wire
    # The bits above the prefix are the representation's, not the integer's.
    flagged = bytes((wire[0] | (0xff << prefix_bits) & 0xff,)) + wire[1:]
    assert _decode_integer(flagged + b"rest", 0, prefix_bits) == (value, len(wire))


# -- C.2 single fields ------------------------------------------------------------

@pytest.mark.parametrize("block, headers, table", [
    # C.2.1: literal with indexing, literal name.
    ("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
     "custom-key: custom-header", "custom-key: custom-header"),
    # C.2.2: literal without indexing, indexed name.
    ("040c 2f73 616d 706c 652f 7061 7468", ":path: /sample/path", ""),
    # C.2.3: literal never indexed, literal name.
    ("1008 7061 7373 776f 7264 0673 6563 7265 74", "password: secret", ""),
    # C.2.4: indexed field from the static table.
    ("82", ":method: GET", ""),
], ids=["C.2.1", "C.2.2", "C.2.3", "C.2.4"])
def test_single_fields_c2(block, headers, table):
    decoder = HPACKDecoder()
    assert decoder.decode(h(block)) == fields(headers)
    # The frame layer may hand over a bytearray or a memoryview: the same list.
    assert HPACKDecoder().decode(bytearray(h(block))) == fields(headers)
    assert HPACKDecoder().decode(memoryview(h(block))) == fields(headers)
    assert decoder.dynamic_table == fields(table)
    assert decoder.table_size == sum(len(n) + len(v) + 32 for n, v in fields(table))


# -- C.3 to C.6: header lists on one connection ---------------------------------------

REQUESTS = [
    """:method: GET
       :scheme: http
       :path: /
       :authority: www.example.com""",
    """:method: GET
       :scheme: http
       :path: /
       :authority: www.example.com
       cache-control: no-cache""",
    """:method: GET
       :scheme: https
       :path: /index.html
       :authority: www.example.com
       custom-key: custom-value""",
]
REQUEST_TABLES = [
    (""":authority: www.example.com""", 57),
    ("""cache-control: no-cache
        :authority: www.example.com""", 110),
    ("""custom-key: custom-value
        cache-control: no-cache
        :authority: www.example.com""", 164),
]
RESPONSES = [
    """:status: 302
       cache-control: private
       date: Mon, 21 Oct 2013 20:13:21 GMT
       location: https://www.example.com""",
    """:status: 307
       cache-control: private
       date: Mon, 21 Oct 2013 20:13:21 GMT
       location: https://www.example.com""",
    """:status: 200
       cache-control: private
       date: Mon, 21 Oct 2013 20:13:22 GMT
       location: https://www.example.com
       content-encoding: gzip
       set-cookie: foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1""",
]
RESPONSE_TABLES = [
    ("""location: https://www.example.com
        date: Mon, 21 Oct 2013 20:13:21 GMT
        cache-control: private
        :status: 302""", 222),
    (""":status: 307
        location: https://www.example.com
        date: Mon, 21 Oct 2013 20:13:21 GMT
        cache-control: private""", 222),
    ("""set-cookie: foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1
        content-encoding: gzip
        date: Mon, 21 Oct 2013 20:13:22 GMT""", 215),
]

EXAMPLES = {
    "C.3": (4096, REQUESTS, REQUEST_TABLES, [
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
    ]),
    "C.4": (4096, REQUESTS, REQUEST_TABLES, [
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ]),
    "C.5": (256, RESPONSES, RESPONSE_TABLES, [
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133"
        "2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70"
        "6c65 2e63 6f6d",
        "4803 3330 37c1 c0bf",
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d"
        "54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049"
        "5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e"
        "3d31",
    ]),
    "C.6": (256, RESPONSES, RESPONSE_TABLES, [
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6"
        "2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        "4883 640e ffc1 c0bf",
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab"
        "77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f"
        "9587 3160 65c0 03ed 4ee5 b106 3d50 07",
    ]),
}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_decoder_gives_the_rfc_lists_and_tables(example):
    table_size, lists, tables, blocks = EXAMPLES[example]
    decoder = HPACKDecoder(max_table_size=table_size)
    for block, headers, (table, size) in zip(blocks, lists, tables):
        assert decoder.decode(h(block)) == fields(headers)
        assert decoder.dynamic_table == fields(table)
        assert decoder.table_size == size


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_encoder_round_trips_the_rfc_lists(example):
    table_size, lists, tables, blocks = EXAMPLES[example]
    encoder = HPACKEncoder()
    decoder = HPACKDecoder(max_table_size=table_size)
    if table_size != 4096:
        encoder.set_max_table_size(table_size)      # the peer's SETTINGS_HEADER_TABLE_SIZE
    for i, (block, headers, (table, size)) in enumerate(zip(blocks, lists, tables)):
        ours = encoder.encode(fields(headers))
        assert decoder.decode(ours) == fields(headers)
        # The same fields indexed as in the RFC: the same tables.
        assert encoder.dynamic_table == decoder.dynamic_table == fields(table)
        assert encoder.table_size == size
        if example in ("C.4", "C.6"):
            # Our choices are the RFC's: the same bytes, after the size
            # update RFC 7541 §4.2 requires when the maximum changed (the
            # RFC's examples start at 256 and need none).
            update = h("3f e1 01") if table_size != 4096 and i == 0 else b""
            if (example, i) == ("C.6", 1):
                # Except "307", which is 3 octets either way: the RFC codes
                # it, we send it plain (cheaper to decode), as C.5.2 does.
                block = EXAMPLES["C.5"][3][1]
            assert ours == update + h(block)
        else:
            # C.3 and C.5 spell every string literally; ours is Huffman-coded
            # where that is shorter, so never longer.
            assert len(ours) <= len(h(block)) + (3 if table_size != 4096 and i == 0 else 0)


# -- Appendix A and B ---------------------------------------------------------------

def test_static_table_ends_as_appendix_a():
    assert len(STATIC_TABLE) == 61
    assert STATIC_TABLE[0] == (b":authority", b"")
    assert STATIC_TABLE[15] == (b"accept-encoding", b"gzip, deflate")
    assert STATIC_TABLE[60] == (b"www-authenticate", b"")


def test_huffman_code_is_canonical_and_complete():
    code = pagi_ref._HUFFMAN_CODE
    assert len(code) == 257
    # Spot checks against Appendix B's rows.
    assert code[0] == (0x1ff8, 13)
    assert code[ord("/")] == (0x18, 6)
    assert code[ord("0")] == (0x0, 5)
    assert code[ord("\\")] == (0x7fff0, 19)
    assert code[255] == (0x3ffffee, 26)
    assert code[256] == (0x3fffffff, 30)
    # Appendix B is a canonical Huffman code: codes counted up in the order
    # of (length, symbol) -- so a mistyped row shows here.
    order = sorted(range(257), key=lambda s: (code[s][1], s))
    expected, previous = 0, code[order[0]][1]
    for k, symbol in enumerate(order):
        bits = code[symbol][1]
        if k:
            expected = (expected + 1) << (bits - previous)
        previous = bits
        assert code[symbol][0] == expected, symbol
    # Complete: every bit string is a prefix of some code (Kraft sum 1).
    assert sum(2 ** (30 - bits) for _, bits in code) == 2 ** 30


def test_huffman_round_trips_every_octet():
    rng = random.Random(7541)
    samples = [bytes([octet]) for octet in range(256)] + [bytes(range(256)), b""]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                for _ in range(300)]
    for data in samples:
        coded = huffman_encode(data)
        assert huffman_decode(coded) == data
        assert len(coded) == pagi_ref.huffman_length(data)
    assert huffman_encode(b"www.example.com") == h("f1e3 c2e5 f23a 6ba0 ab90 f4ff")
    assert huffman_decode(h("9bd9 ab")) == b"gzip"


# -- malformed blocks ------------------------------------------------------------------

LITERAL_X = h("00 01") + b"x"         # literal without indexing, new name "x", then the value

MALFORMED = [
    ("truncated integer", h("ff"), "ends inside an integer"),
    ("truncated continuation", h("ff 80 80"), "ends inside an integer"),
    ("integer overflow", h("ff ff ff ff ff 01"), "continuation octets"),
    ("integer too long even if small", h("ff 80 80 80 80 00"), "continuation octets"),
    ("index 0", h("80"), "index 0"),
    ("index past the static table", h("be"), "past the end of the tables"),
    ("huge index", h("ff ff ff ff 7f"), "past the end of the tables"),
    ("literal name index out of range", h("7f 07 01") + b"a", "past the end of the tables"),
    # "a" is 00011: three more bits of padding must be ones.
    ("padding not all ones", LITERAL_X + h("81 18"), "not all ones"),
    # "a" then 11 bits of ones.
    ("padding longer than 7 bits", LITERAL_X + h("82 1f ff"), "more than 7 bits"),
    ("a whole octet of padding", LITERAL_X + h("81 ff"), "more than 7 bits"),
    ("EOS inside a string", LITERAL_X + h("84 ff ff ff ff"), "EOS"),
    ("EOS then more symbols", LITERAL_X + h("85 ff ff ff fc 7f"), "EOS"),
    ("string past the end", LITERAL_X + h("05") + b"ab", "runs past the end"),
    ("missing value", h("00 01") + b"x", "ends before a string literal"),
    ("missing name", h("40"), "ends before a string literal"),
    ("string length overflow", LITERAL_X + h("7f ff ff ff ff 0f"), "continuation octets"),
    ("size update above the limit", h("3f e2 1f"), "above the 4096 advertised"),
    ("size update after a field", h("82 20"), "after a header field"),
    ("size update between fields", h("20 82 3f e1 01 82"), "after a header field"),
]


@pytest.mark.parametrize("block, words", [row[1:] for row in MALFORMED],
                         ids=[row[0] for row in MALFORMED])
def test_malformed_blocks_are_compression_errors(block, words):
    decoder = HPACKDecoder()
    with pytest.raises(HPACKError) as info:
        decoder.decode(block)
    assert not isinstance(info.value, HeaderListTooLarge)
    assert words in str(info.value)
    # A COMPRESSION_ERROR ends the context: the table is no longer trusted.
    with pytest.raises(HPACKError, match="unusable"):
        decoder.decode(h("82"))


def test_the_reading_stops_at_the_limit_of_the_prefix_bits():
    # A size update of exactly the advertised maximum is fine; one more is not.
    decoder = HPACKDecoder(max_table_size=256)
    assert decoder.decode(h("3f e1 01 82")) == [(b":method", b"GET")]
    with pytest.raises(HPACKError, match="above the 256 advertised"):
        HPACKDecoder(max_table_size=256).decode(h("3f e2 01"))


def test_lowered_table_size_must_be_signalled_at_the_next_block():
    decoder = HPACKDecoder()
    decoder.decode(h(EXAMPLES["C.3"][3][0]))        # one entry of 57 octets
    decoder.max_table_size = 50                      # our SETTINGS, acknowledged
    with pytest.raises(HPACKError, match="does not begin with a dynamic table size update"):
        decoder.decode(h("82"))

    decoder = HPACKDecoder()
    decoder.decode(h(EXAMPLES["C.3"][3][0]))
    decoder.max_table_size = 0
    decoder.max_table_size = 100                     # twice before a block: the smallest counts
    with pytest.raises(HPACKError, match="to 0 or less"):
        decoder.decode(h("3f 45 82"))                # an update to 100 only

    decoder = HPACKDecoder()
    decoder.decode(h(EXAMPLES["C.3"][3][0]))
    decoder.max_table_size = 0
    decoder.max_table_size = 100
    assert decoder.decode(h("20 3f 45 82")) == [(b":method", b"GET")]   # 0, then 100
    assert decoder.dynamic_table == [] and decoder.table_size == 0
    assert decoder.decode(h("82")) == [(b":method", b"GET")]           # no update owed now

    # A larger maximum needs no update: the peer may keep its table as it is.
    decoder = HPACKDecoder()
    decoder.max_table_size = 8192
    assert decoder.decode(h("82")) == [(b":method", b"GET")]


def test_header_list_too_large_keeps_the_table_in_step():
    # :method GET is 7 + 3 + 32 = 42 octets: two fit in 100, three do not.
    decoder = HPACKDecoder(max_header_list_size=100)
    assert decoder.decode(h("82 82")) == [(b":method", b"GET")] * 2
    # Past the limit, the block is still read to its end: the literal with
    # incremental indexing after the third field enters the table.
    block = h("82 82 82") + h("40 01") + b"k" + h("01") + b"v"
    with pytest.raises(HeaderListTooLarge) as info:
        decoder.decode(block)
    assert info.value.size == 3 * 42 + 34 and info.value.limit == 100
    assert "larger than the limit of 100" in str(info.value)
    assert decoder.dynamic_table == [(b"k", b"v")]
    # The decoder goes on: the next block may name the new entry.
    assert decoder.decode(h("be")) == [(b"k", b"v")]


def test_the_limit_counts_as_rfc_9113_does():
    exact = len(b":method") + len(b"GET") + 32
    assert HPACKDecoder(max_header_list_size=exact).decode(h("82")) == [(b":method", b"GET")]
    with pytest.raises(HeaderListTooLarge):
        HPACKDecoder(max_header_list_size=exact - 1).decode(h("82"))


def test_hpack_bomb_is_bounded_by_the_header_list_limit():
    # One entry of 4,000 octets, then 5,000 one-octet references to it:
    # 20 MB of headers from a 9 KB block.
    value = b"a" * 4000
    block = h("40 01") + b"x" + _encode_integer(len(value), 7) + value + h("be") * 5000
    decoder = HPACKDecoder(max_header_list_size=65536)
    tracemalloc.start()
    try:
        with pytest.raises(HeaderListTooLarge) as info:
            decoder.decode(block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.size == 5001 * (1 + 4000 + 32)
    assert peak < 4 * len(block) + 65536, peak     # the block, a copy, a few fields: never 20 MB
    assert decoder.decode(h("be")) == [(b"x", value)]


# -- the encoder's choices ---------------------------------------------------------------

def test_sensitive_fields_are_never_indexed():
    encoder = HPACKEncoder()
    block = encoder.encode([(b"authorization", b"Basic dXNlcjpwYXNzd29yZA=="),
                            (b"cookie", b"sid=1"),
                            (b"cookie", b"session=0123456789abcdef0123")])
    decoder = HPACKDecoder()
    assert decoder.decode(block) == [(b"authorization", b"Basic dXNlcjpwYXNzd29yZA=="),
                                     (b"cookie", b"sid=1"),
                                     (b"cookie", b"session=0123456789abcdef0123")]
    # Never indexed (0001 + 4-bit name index 23 = 15 + 8), nothing stored
    # but the long cookie.
    assert block[:2] == h("1f 08")
    assert encoder.dynamic_table == decoder.dynamic_table == [
        (b"cookie", b"session=0123456789abcdef0123")]
    # Sent again: never indexed again, not an index.
    again = encoder.encode([(b"authorization", b"Basic dXNlcjpwYXNzd29yZA==")])
    assert again[:2] == h("1f 08")


def test_fields_that_change_every_message_are_not_indexed():
    encoder = HPACKEncoder()
    block = encoder.encode([(b":status", b"200"), (b"content-length", b"1234"),
                            (b"content-type", b"text/plain")])
    assert encoder.dynamic_table == [(b"content-type", b"text/plain")]
    assert HPACKDecoder().decode(block)[1] == (b"content-length", b"1234")
    # A field larger than 3/4 of the table is sent without indexing too.
    big = (b"x-big", b"v" * 3100)
    encoder.encode([big])
    assert big not in encoder.dynamic_table


def test_repeated_fields_become_one_octet():
    encoder = HPACKEncoder()
    headers = [(b":status", b"200"), (b"content-type", b"application/json"),
               (b"server", b"pagi_ref")]
    first = encoder.encode(headers)
    second = encoder.encode(headers)
    assert second == h("88 bf be")
    decoder = HPACKDecoder()
    assert decoder.decode(first) == decoder.decode(second) == headers


def test_table_size_updates_are_signalled_at_the_next_block():
    encoder = HPACKEncoder()
    encoder.encode([(b"x-a", b"1")])
    encoder.set_max_table_size(8192)     # more than the cap: we keep 4096, nothing to say
    assert encoder.encode([(b":method", b"GET")]) == h("82")
    encoder.set_max_table_size(0)
    encoder.set_max_table_size(256)      # twice: the smallest, then the final (§4.2)
    block = encoder.encode([(b":method", b"GET")])
    assert block == h("20 3f e1 01 82")
    assert encoder.dynamic_table == []
    encoder.set_max_table_size(0)        # a table of 0: nothing is indexed
    block = encoder.encode([(b"x-a", b"1")])
    assert block[:1] == h("20") and encoder.dynamic_table == []
    decoder = HPACKDecoder()
    decoder.decode(encoder.encode([]))   # a block of nothing is a block


def test_evicted_entries_are_not_referenced():
    encoder = HPACKEncoder()
    decoder = HPACKDecoder(max_table_size=100)
    encoder.set_max_table_size(100)      # room for one entry of 64 octets
    first = [(b"x-one", b"a" * 27)]      # 5 + 27 + 32 = 64
    second = [(b"x-two", b"b" * 27)]     # evicts x-one
    for headers in (first, second, first, second):
        assert decoder.decode(encoder.encode(headers)) == headers
        assert encoder.dynamic_table == decoder.dynamic_table == headers


# -- random input ----------------------------------------------------------------------

def test_random_blocks_raise_only_hpack_errors():
    rng = random.Random(20261127)
    valid = [h(block) for _, _, _, blocks in EXAMPLES.values() for block in blocks]
    outcomes = {"decoded": 0, "HPACKError": 0}
    for n in range(2000):
        if n % 2:
            block = bytes(rng.randrange(256) for _ in range(rng.randrange(48)))
        else:
            # A valid block with a few octets changed: deeper into the grammar.
            block = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                block[rng.randrange(len(block))] = rng.randrange(256)
        decoder = HPACKDecoder(max_header_list_size=rng.choice((100, 65536)))
        try:
            decoder.decode(bytes(block))
            outcomes["decoded"] += 1
        except HPACKError:
            outcomes["HPACKError"] += 1
    assert outcomes["decoded"] and outcomes["HPACKError"], outcomes


def test_random_header_lists_round_trip_with_tables_in_step():
    rng = random.Random(15)
    names = [b":status", b"content-type", b"x-custom", b"cookie", b"set-cookie",
             b"authorization", b"content-length", b"server", b"vary", b"x-long"]
    encoder, decoder = HPACKEncoder(), HPACKDecoder()
    for n in range(200):
        if rng.random() < 0.1:
            size = rng.choice((0, 64, 256, 1000, 4096, 65536))
            decoder.max_table_size = max(size, decoder.max_table_size) \
                if rng.random() < 0.5 else size
            encoder.set_max_table_size(decoder.max_table_size)
        headers = []
        for _ in range(rng.randrange(8)):
            name = rng.choice(names)
            if name == b"x-long":
                value = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(500, 2500)))
            else:
                value = bytes(rng.randrange(256) for _ in range(rng.randrange(30)))
            headers.append((name, rng.choice((value, b"same", b"200"))))
        assert decoder.decode(encoder.encode(headers)) == headers, n
        assert encoder.dynamic_table == decoder.dynamic_table, n
        assert encoder.table_size == decoder.table_size <= decoder.max_table_size


# -- an independent implementation ---------------------------------------------------------

def test_interop_with_python_hyper_hpack():
    """python-hyper's hpack (installed with h2, the conformance suite's
    HTTP/2 client) decodes our blocks, and we decode its blocks, table
    size changes included."""
    hpack = pytest.importorskip("hpack")
    rng = random.Random(4)
    names = [b":status", b"content-type", b"x-custom", b"cookie", b"authorization",
             b"content-length", b"server", b"x-long"]
    ours, theirs_decoder = HPACKEncoder(), hpack.Decoder(max_header_list_size=1 << 20)
    theirs, ours_decoder = hpack.Encoder(), HPACKDecoder(max_header_list_size=1 << 20)
    for n in range(150):
        if n % 25 == 24:
            size = rng.choice((0, 100, 256, 4096))
            theirs_decoder.max_allowed_table_size = size     # our peer's SETTINGS
            ours.set_max_table_size(size)
            ours_decoder.max_table_size = max(size, 4096)    # what we advertise
            theirs.header_table_size = size                  # they use less
        headers = []
        for _ in range(rng.randrange(1, 8)):
            name = rng.choice(names)
            size = rng.randrange(300, 900) if name == b"x-long" else rng.randrange(12)
            headers.append((name, rng.choice((b"same", bytes(rng.randrange(32, 127)
                                                             for _ in range(size))))))
        decoded = theirs_decoder.decode(ours.encode(headers), raw=True)
        assert [(bytes(k), bytes(v)) for k, v in decoded] == headers, n
        assert ours_decoder.decode(theirs.encode(headers, huffman=bool(n % 2))) == headers, n
