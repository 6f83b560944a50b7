"""WebSocket framing (RFC 6455) for the server side of the control channel, with no I/O.

The lab does its own framing instead of using a general websocket library because MeshAgent
builds differ from the RFC: the 2021 agent shipped with MeshCentral 0.7.99 sends its frames
unmasked, which a server must reject under RFC 6455 section 5.1. The reader accepts them and
counts them in `FrameReader.unmasked_frames`, so a report can show the deviation.

Server frames are never masked and every message goes out as one frame with FIN set, because
the agent reassembles fragmented messages only up to 65535 bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import struct

from lab.errors import PeerProtocolError

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class MessageTooBig(PeerProtocolError):
    """A message from the agent exceeds the configured maximum size."""

    close_code = 1009


class InvalidCloseReason(PeerProtocolError):
    """A close frame whose reason is not valid UTF-8 (RFC 6455 section 8.1)."""

    close_code = 1007


@dataclasses.dataclass(frozen=True)
class DataMessage:
    data: bytes
    text: bool


@dataclasses.dataclass(frozen=True)
class PingFrame:
    payload: bytes


@dataclasses.dataclass(frozen=True)
class PongFrame:
    payload: bytes


@dataclasses.dataclass(frozen=True)
class CloseFrame:
    code: int | None
    reason: str


FrameEvent = DataMessage | PingFrame | PongFrame | CloseFrame


def accept_key(client_key: str) -> str:
    """Compute the Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    digest = hashlib.sha1(client_key.encode("ascii") + _ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def encode_frame(opcode: Opcode, payload: bytes, *, fin: bool = True) -> bytes:
    """Encode one unmasked server frame."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        header = struct.pack(">BB", first, length)
    elif length < 1 << 16:
        header = struct.pack(">BBH", first, 126, length)
    else:
        header = struct.pack(">BBQ", first, 127, length)
    return header + payload


def encode_close(code: int, reason: str = "") -> bytes:
    return encode_frame(Opcode.CLOSE, struct.pack(">H", code) + reason.encode()[:123])


class FrameReader:
    """Parse frames from the agent and reassemble them into messages.

    Feed bytes with `receive_data` and take complete messages and control frames with
    `events`. Violations raise PeerProtocolError; after one, the connection must be closed
    because the stream position is lost.
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self.unmasked_frames = 0
        self._buffer = bytearray()
        self._fragments = bytearray()
        self._fragment_opcode: Opcode | None = None
        self._events: list[FrameEvent] = []

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        while self._parse_one():
            pass

    def events(self) -> list[FrameEvent]:
        events, self._events = self._events, []
        return events

    def _parse_one(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        first, second = buffer[0], buffer[1]
        fin = bool(first & 0x80)
        if first & 0x70:
            raise PeerProtocolError(f"frame has reserved bits 0x{first & 0x70:02x} set; no extension was negotiated")
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            raise PeerProtocolError(f"frame has unknown opcode 0x{first & 0x0F:x}") from None
        masked = bool(second & 0x80)
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return False
            (length,) = struct.unpack_from(">H", buffer, 2)
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return False
            (length,) = struct.unpack_from(">Q", buffer, 2)
            offset = 10
        if opcode >= Opcode.CLOSE and (length > 125 or not fin):
            raise PeerProtocolError(f"control frame {opcode.name} is fragmented or longer than 125 bytes")
        if opcode < Opcode.CLOSE and len(self._fragments) + length > self.max_message_size:
            raise MessageTooBig(
                f"message of at least {len(self._fragments) + length} bytes exceeds the maximum of "
                f"{self.max_message_size} bytes"
            )

        mask = b""
        if masked:
            if len(buffer) < offset + 4:
                return False
            mask = bytes(buffer[offset : offset + 4])
            offset += 4
        if len(buffer) < offset + length:
            return False
        payload = bytes(buffer[offset : offset + length])
        del buffer[: offset + length]
        if masked:
            payload = _unmask(payload, mask)
        else:
            # Counted only once the frame is complete, so a frame that arrives in pieces
            # counts once.
            self.unmasked_frames += 1
        self._handle_frame(opcode, fin, payload)
        return True

    def _handle_frame(self, opcode: Opcode, fin: bool, payload: bytes) -> None:
        match opcode:
            case Opcode.PING:
                self._events.append(PingFrame(payload))
            case Opcode.PONG:
                self._events.append(PongFrame(payload))
            case Opcode.CLOSE:
                self._events.append(_parse_close(payload))
            case Opcode.CONTINUATION:
                if self._fragment_opcode is None:
                    raise PeerProtocolError("continuation frame without a message to continue")
                self._fragments += payload
                if fin:
                    self._finish_message(self._fragment_opcode)
            case Opcode.TEXT | Opcode.BINARY:
                if self._fragment_opcode is not None:
                    raise PeerProtocolError(f"{opcode.name} frame starts a message while another is unfinished")
                self._fragment_opcode = opcode
                self._fragments += payload
                if fin:
                    self._finish_message(opcode)

    def _finish_message(self, opcode: Opcode) -> None:
        self._events.append(DataMessage(bytes(self._fragments), opcode is Opcode.TEXT))
        self._fragments = bytearray()
        self._fragment_opcode = None


def _parse_close(payload: bytes) -> CloseFrame:
    """Parse and validate a close frame's payload (RFC 6455 sections 5.5.1, 7.4 and 8.1)."""
    if not payload:
        return CloseFrame(None, "")
    if len(payload) == 1:
        raise PeerProtocolError("close frame with a 1-byte payload, but a close code takes 2 bytes")
    code = struct.unpack_from(">H", payload)[0]
    # RFC 6455 section 7.4: 1004 is reserved, 1005, 1006 and 1015 must not be sent, and the rest
    # of 1000-2999 is left to later specifications. 1012-1014 were registered with IANA after it.
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise PeerProtocolError(f"close frame with code {code}, which a peer must not send")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidCloseReason(f"close frame with code {code} and a reason that is not valid UTF-8 ({error.reason})") from error
    return CloseFrame(code, reason)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR through one big integer: fast for the large frames of an update, and exact.
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(payload), "big")
