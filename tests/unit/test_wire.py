"""The control channel's framing."""
import struct

import pytest

from dkvm import wire
from dkvm.wire import (ERROR, EXIT, EXIT_ACK, HELLO, MAX_PAYLOAD, SIGNAL, Decoder, Frame,
                       ProtocolError, encode)


def test_header_layout():
    data = encode(SIGNAL, b"abc", channel=0x1234)
    assert len(data) == 8 + 3
    assert data[:8] == bytes([0xD7, SIGNAL, 0x12, 0x34, 0, 0, 0, 3])
    assert data[8:] == b"abc"


@pytest.mark.parametrize("ftype,payload,channel", [
    (HELLO, b"", 0),
    (EXIT, {"status": 137}, 0),
    (EXIT_ACK, b"", 0),
    (SIGNAL, {"signal": 15}, 3),
    (ERROR, {"message": "guest init failed: ENOENT \u00e9"}, 65535),
    (EXIT, bytes(range(256)), 1),
])
def test_round_trip(ftype, payload, channel):
    frames = Decoder().feed(encode(ftype, payload, channel=channel))
    assert len(frames) == 1
    frame = frames[0]
    assert (frame.type, frame.channel) == (ftype, channel)
    if isinstance(payload, dict):
        assert frame.record().as_dict() == payload
    else:
        assert frame.payload == payload


@pytest.mark.parametrize("ftype,payload", [
    (EXIT, b'{"status":"pwn"}'),            # not a number
    (EXIT, b'{"status":256}'),              # not an exit status
    (EXIT, b'{"status":-1}'),
    (EXIT, b'{"status":true}'),             # a bool is not an int here
    (EXIT, b"{}"),                          # missing
    (EXIT, b'{"status":0,"extra":1}'),      # unknown field
    (EXIT, b"[0]"),
    (EXIT, b'{"status":0'),                 # not JSON
    (EXIT, b"\xff\xfe"),                    # not UTF-8
    (EXIT, b"[" * 100000),                  # nested past the recursion limit
    (SIGNAL, b'{"signal":0}'),
    (SIGNAL, b'{"signal":65}'),
    (ERROR, b'{"message":7}'),
    (wire.WINDOW, b'{"bytes":0}'),
    (wire.WINDOW, b'{"bytes":%d}' % (wire.STREAM_WINDOW + 1)),
    (wire.RESIZE, b'{"rows":70000,"cols":80}'),
    (wire.EXEC_EXIT, b'{"status":256}'),
    (wire.EXEC_START, b'{"process":{"args":"sh"}}'),
    (wire.NET, b'{"steps":[{"kind":"format disk"}]}'),
])
def test_a_bad_payload_is_a_protocol_error_naming_the_frame(ftype, payload):
    (frame,) = Decoder().feed(encode(ftype, payload))
    with pytest.raises(ProtocolError, match=f"frame type {ftype}: bad payload"):
        frame.record()


def test_byte_by_byte():
    data = encode(EXIT, {"status": 3}) + encode(HELLO)
    dec = Decoder()
    got = []
    for i in range(len(data)):
        frames = dec.feed(data[i:i + 1])
        got += frames
        # a frame comes out exactly when its last byte arrives
        if i == len(encode(EXIT, {"status": 3})) - 1:
            assert [f.type for f in frames] == [EXIT]
        elif i < len(data) - 1:
            assert frames == []
        assert dec.pending == (i + 1) - sum(8 + len(f.payload) for f in got)
    assert got == [Frame(EXIT, 0, b'{"status":3}'), Frame(HELLO, 0, b"")]
    assert dec.pending == 0


def test_several_frames_in_one_feed_and_a_partial_tail():
    frames_in = [encode(HELLO), encode(SIGNAL, {"signal": 2}), encode(SIGNAL, {"signal": 15}),
                 encode(EXIT, {"status": 0})]
    data = b"".join(frames_in)
    dec = Decoder()
    out = dec.feed(data[:-5])
    assert [f.type for f in out] == [HELLO, SIGNAL, SIGNAL]
    assert [f.record().signal for f in out[1:]] == [2, 15]
    assert dec.pending == len(frames_in[-1]) - 5
    (last,) = dec.feed(data[-5:])
    assert last.record().status == 0
    assert dec.pending == 0


def test_empty_feed():
    dec = Decoder()
    assert dec.feed(b"") == []
    assert dec.pending == 0


def test_max_payload_frame():
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256)
    assert len(payload) == MAX_PAYLOAD
    data = encode(ERROR, payload)
    dec = Decoder()
    assert dec.feed(data[:65536]) == []
    out = []
    for off in range(65536, len(data), 65536):
        out += dec.feed(data[off:off + 65536])
    assert len(out) == 1 and out[0].payload == payload
    assert dec.pending == 0


def test_oversize_encode_raises():
    with pytest.raises(ProtocolError):
        encode(ERROR, b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        encode(ERROR, {"message": "x" * MAX_PAYLOAD})


@pytest.mark.parametrize("header", [
    struct.pack("!BBHI", 0x00, HELLO, 0, 0),                 # bad magic
    struct.pack("!BBHI", 0xD7, 99, 0, 0),                    # unknown type
    struct.pack("!BBHI", 0xD7, 0, 0, 0),                     # type 0
    struct.pack("!BBHI", 0xD7, EXIT, 0, MAX_PAYLOAD + 1),    # too long
    b"GET / HTTP/1.1\r\n",
])
def test_malformed_header_raises_and_decoder_recovers(header):
    dec = Decoder()
    with pytest.raises(ProtocolError):
        dec.feed(header)
    assert dec.pending == 0
    # usable again: the next good frame decodes
    (frame,) = dec.feed(encode(EXIT, {"status": 1}))
    assert frame.type == EXIT and frame.record().status == 1


def test_garbage_after_partial_header_is_detected_once_header_complete():
    dec = Decoder()
    assert dec.feed(b"\x00\x01\x02") == []       # not yet a whole header
    with pytest.raises(ProtocolError):
        dec.feed(b"\x03\x04\x05\x06\x07")
    assert dec.feed(encode(HELLO)) == [Frame(HELLO)]


def test_types_are_distinct():
    named = [HELLO, EXIT, EXIT_ACK, SIGNAL, ERROR, wire.RESIZE, wire.EXEC_START, wire.STDIN,
             wire.STDOUT, wire.STDERR, wire.EXEC_EXIT, wire.WINDOW, wire.CLOSE, wire.DNS, wire.NET,
             wire.INIT, wire.PLAN, wire.HEARTBEAT, wire.RELEASE, wire.MEMBER_START]
    assert len(set(named)) == len(named)
    assert wire.TYPES == set(named)


def test_frames_before_garbage_are_kept():
    from dkvm.wire import Decoder, ProtocolError, encode, feed_tolerant
    dec = Decoder()
    errors = []
    frames = feed_tolerant(dec, encode(EXIT, {"status": 1}) + b"\x00" * 8, errors.append)
    assert frames == [Frame(EXIT, 0, b'{"status":1}')]
    assert len(errors) == 1 and "malformed" in errors[0]
    assert dec.feed(encode(HELLO)) == [Frame(HELLO)]
    with pytest.raises(ProtocolError) as info:
        Decoder().feed(encode(HELLO) + b"garbage!")
    assert info.value.frames == [Frame(HELLO)]
