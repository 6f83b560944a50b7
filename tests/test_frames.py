"""Tests of lab.protocol.frames: the server's websocket frame reader and encoder."""

from __future__ import annotations

import struct

import pytest

from agent_double import agent_frames, client_frame
from lab.errors import PeerProtocolError
from lab.protocol.frames import (
    CloseFrame,
    DataMessage,
    FrameReader,
    InvalidCloseReason,
    MessageTooBig,
    Opcode,
    PingFrame,
    PongFrame,
    accept_key,
    encode_close,
    encode_frame,
)

BINARY, TEXT, CONTINUATION = 0x2, 0x1, 0x0
CLOSE, PING, PONG = 0x8, 0x9, 0xA


def read_all(data: bytes, max_message_size: int = 1 << 20) -> tuple[FrameReader, list]:
    reader = FrameReader(max_message_size)
    reader.receive_data(data)
    return reader, reader.events()


def test_accept_key_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_masked_binary():
    reader, events = read_all(client_frame(BINARY, b"\x00\x0c\x00\x00"))
    assert events == [DataMessage(b"\x00\x0c\x00\x00", text=False)]
    assert reader.unmasked_frames == 0


def test_masked_text():
    _, events = read_all(client_frame(TEXT, b'{"a":1}'))
    assert events == [DataMessage(b'{"a":1}', text=True)]


def test_unmasked_frame_accepted():
    reader, events = read_all(client_frame(BINARY, b"hello", mask=None))
    assert events == [DataMessage(b"hello", text=False)]
    assert reader.unmasked_frames == 1


def test_unmasked_frame_counted_once_when_split():
    data = client_frame(BINARY, b"x" * 300, mask=None)
    reader = FrameReader(1 << 20)
    for index in range(len(data)):
        reader.receive_data(data[index : index + 1])
    assert reader.events() == [DataMessage(b"x" * 300, text=False)]
    assert reader.unmasked_frames == 1


def test_empty_message():
    _, events = read_all(client_frame(BINARY, b""))
    assert events == [DataMessage(b"", text=False)]


def test_fragmented_message():
    data = (
        client_frame(BINARY, b"one-", fin=False)
        + client_frame(CONTINUATION, b"two-", fin=False)
        + client_frame(CONTINUATION, b"three")
    )
    _, events = read_all(data)
    assert events == [DataMessage(b"one-two-three", text=False)]


def test_fragmented_text_keeps_opcode():
    data = client_frame(TEXT, b'{"a"', fin=False) + client_frame(CONTINUATION, b":1}")
    _, events = read_all(data)
    assert events == [DataMessage(b'{"a":1}', text=True)]


def test_agent_style_4096_fragments():
    message = bytes(range(256)) * 40
    _, events = read_all(agent_frames(message))
    assert events == [DataMessage(message, text=False)]


def test_control_frame_inside_fragmented_message():
    data = (
        client_frame(BINARY, b"start-", fin=False)
        + client_frame(PING, b"p1")
        + client_frame(CONTINUATION, b"middle-", fin=False)
        + client_frame(PONG, b"p2")
        + client_frame(CONTINUATION, b"end")
    )
    _, events = read_all(data)
    assert events == [PingFrame(b"p1"), PongFrame(b"p2"), DataMessage(b"start-middle-end", text=False)]


def test_close_frame_inside_fragmented_message():
    data = client_frame(BINARY, b"a", fin=False) + client_frame(CLOSE, struct.pack(">H", 1001) + b"bye")
    _, events = read_all(data)
    assert events == [CloseFrame(1001, "bye")]


def test_close_without_code():
    _, events = read_all(client_frame(CLOSE, b""))
    assert events == [CloseFrame(None, "")]


@pytest.mark.parametrize("code", [1000, 1003, 1007, 1012, 1014, 3000, 4999])
def test_close_codes_accepted(code):
    _, events = read_all(client_frame(CLOSE, struct.pack(">H", code)))
    assert events == [CloseFrame(code, "")]


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"\x03", "1-byte payload")] + [(struct.pack(">H", code), f"code {code}") for code in (999, 1004, 1005, 1006, 1015, 1016, 2999, 5000)],
)
def test_close_payload_rejected(payload, message):
    with pytest.raises(PeerProtocolError, match=message):
        read_all(client_frame(CLOSE, payload))


def test_close_reason_must_be_utf8():
    with pytest.raises(InvalidCloseReason, match="not valid UTF-8") as raised:
        read_all(client_frame(CLOSE, struct.pack(">H", 1000) + b"\xff\xfe"))
    assert raised.value.close_code == 1007


def test_several_messages_in_one_read():
    data = client_frame(BINARY, b"a") + client_frame(TEXT, b"{}") + client_frame(BINARY, b"c", mask=None)
    _, events = read_all(data)
    assert events == [DataMessage(b"a", False), DataMessage(b"{}", True), DataMessage(b"c", False)]


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 100])
def test_split_into_chunks(split):
    data = client_frame(BINARY, b"x" * 200) + client_frame(BINARY, b"y" * 70_000)
    reader = FrameReader(1 << 20)
    for index in range(0, len(data), split):
        reader.receive_data(data[index : index + split])
    assert reader.events() == [DataMessage(b"x" * 200, False), DataMessage(b"y" * 70_000, False)]


def test_length_16_bit():
    payload = b"z" * 300
    frame = client_frame(BINARY, payload)
    assert frame[1] & 0x7F == 126
    assert read_all(frame)[1] == [DataMessage(payload, False)]


def test_length_64_bit():
    payload = b"w" * 70_000
    frame = client_frame(BINARY, payload)
    assert frame[1] & 0x7F == 127
    assert read_all(frame)[1] == [DataMessage(payload, False)]


def test_length_64_bit_for_short_payload():
    # RFC 6455 requires the shortest length form, but the reader accepts a longer one.
    _, events = read_all(client_frame(BINARY, b"abc", length_form="64"))
    assert events == [DataMessage(b"abc", False)]


def test_incomplete_frame_waits():
    frame = client_frame(BINARY, b"abcdef")
    reader, events = read_all(frame[:-1])
    assert events == []
    reader.receive_data(frame[-1:])
    assert reader.events() == [DataMessage(b"abcdef", False)]


def test_oversize_single_frame():
    with pytest.raises(MessageTooBig, match="exceeds the maximum of 100 bytes"):
        read_all(client_frame(BINARY, b"x" * 101), max_message_size=100)


def test_oversize_header_only():
    # The length alone is enough to reject, before any payload arrives.
    header = struct.pack(">BBQ", 0x82, 0xFF, 1 << 40) + b"mask"
    with pytest.raises(MessageTooBig):
        read_all(header, max_message_size=1 << 20)


def test_oversize_across_fragments():
    data = client_frame(BINARY, b"x" * 60, fin=False) + client_frame(CONTINUATION, b"x" * 60)
    with pytest.raises(MessageTooBig, match="at least 120 bytes"):
        read_all(data, max_message_size=100)


def test_max_size_exactly():
    _, events = read_all(client_frame(BINARY, b"x" * 100), max_message_size=100)
    assert events == [DataMessage(b"x" * 100, False)]


def test_message_too_big_is_peer_error():
    assert issubclass(MessageTooBig, PeerProtocolError)


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_reserved_bits(rsv):
    with pytest.raises(PeerProtocolError, match="reserved bits"):
        read_all(client_frame(BINARY, b"a", rsv=rsv))


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_bad_opcode(opcode):
    with pytest.raises(PeerProtocolError, match=f"unknown opcode 0x{opcode:x}"):
        read_all(client_frame(opcode, b"a"))


def test_continuation_without_start():
    with pytest.raises(PeerProtocolError, match="continuation frame without a message"):
        read_all(client_frame(CONTINUATION, b"a"))


def test_new_message_inside_fragmented():
    data = client_frame(BINARY, b"a", fin=False) + client_frame(TEXT, b"b")
    with pytest.raises(PeerProtocolError, match="while another is unfinished"):
        read_all(data)


def test_fragmented_control_frame():
    with pytest.raises(PeerProtocolError, match="control frame PING"):
        read_all(client_frame(PING, b"a", fin=False))


def test_long_control_frame():
    with pytest.raises(PeerProtocolError, match="control frame CLOSE"):
        read_all(client_frame(CLOSE, b"x" * 126))


def test_encode_small_frame():
    assert encode_frame(Opcode.BINARY, b"abc") == b"\x82\x03abc"


def test_encode_16_bit_length():
    frame = encode_frame(Opcode.BINARY, bytes(126))
    assert frame[:4] == b"\x82\x7e\x00\x7e"
    assert len(frame) == 4 + 126


def test_encode_64_bit_length():
    frame = encode_frame(Opcode.TEXT, bytes(65536))
    assert frame[:10] == b"\x81\x7f" + struct.pack(">Q", 65536)


def test_encode_not_final():
    assert encode_frame(Opcode.BINARY, b"a", fin=False)[0] == 0x02


def test_encode_close():
    assert encode_close(1009, "too big") == b"\x88\x09\x03\xf1too big"


def test_encode_close_reason_cut_to_fit():
    frame = encode_close(1000, "r" * 500)
    assert frame[1] == 125


def test_server_frames_read_back():
    # The reader also parses unmasked server frames, so it can check the encoder.
    reader, events = read_all(encode_frame(Opcode.BINARY, b"q" * 70_000) + encode_frame(Opcode.PING, b"p"))
    assert events == [DataMessage(b"q" * 70_000, False), PingFrame(b"p")]
    assert reader.unmasked_frames == 2
