"""The Teltonika codec: pure functions and small classes, bytes in, values or bytes out.

No Twisted, no Redis, no clock, no logging. Where things live:

* ``model``     value types, framer events, typed errors
* ``crc``       CRC-16/IBM
* ``tcpframe``  the outer TCP frame (preamble, length, CRC), whole-buffer
* ``avl``       Codec 8 / 8E / 16 records: where every IO id is read and written
* ``command``   Codec 12 / 13 / 14 messages
* ``imei``      the IMEI handshake
* ``udp``       UDP datagrams and their ACK
* ``framing``   the incremental Framer for a device's TCP stream
* ``payload``   the JSON payload of the telemetry stream (contract.md §3)
"""

from .avl import (
    MAX_TIMESTAMP_MS,
    ack_bytes,
    decode_avl_data,
    decode_avl_frame,
    encode_avl_data,
    encode_avl_frame,
)
from .command import (
    decode_command_data,
    decode_command_frame,
    encode_command,
    encode_command_data,
    encode_command_message,
    encode_imei_bcd,
)
from .crc import crc16_ibm
from .framing import Framer
from .imei import decode_imei, encode_imei
from .model import (
    AVL_CODECS,
    CODEC_8,
    CODEC_8E,
    CODEC_12,
    CODEC_13,
    CODEC_14,
    CODEC_16,
    CODEC_ID_OF,
    CODEC_IDS,
    COMMAND_CODECS,
    TYPE_COMMAND,
    TYPE_NACK,
    TYPE_RESPONSE,
    AvlFrame,
    AvlPacket,
    AvlRecord,
    BadPreamble,
    CodecError,
    CommandFrame,
    CommandMessage,
    CountMismatch,
    CrcMismatch,
    FrameError,
    FramerEvent,
    FrameTooLarge,
    Handshake,
    KeepAlive,
    Malformed,
    MalformedImei,
    Truncated,
    UdpPacket,
    UnknownCodec,
)
from .payload import format_timestamp, record_attributes, record_dict, record_payload
from .tcpframe import unwrap_frame, wrap_frame
from .udp import decode_udp_datagram, encode_udp_ack, encode_udp_datagram

__all__ = [
    "AVL_CODECS",
    "CODEC_8",
    "CODEC_8E",
    "CODEC_12",
    "CODEC_13",
    "CODEC_14",
    "CODEC_16",
    "CODEC_IDS",
    "CODEC_ID_OF",
    "COMMAND_CODECS",
    "MAX_TIMESTAMP_MS",
    "TYPE_COMMAND",
    "TYPE_NACK",
    "TYPE_RESPONSE",
    "AvlFrame",
    "AvlPacket",
    "AvlRecord",
    "BadPreamble",
    "CodecError",
    "CommandFrame",
    "CommandMessage",
    "CountMismatch",
    "CrcMismatch",
    "FrameError",
    "FrameTooLarge",
    "Framer",
    "FramerEvent",
    "Handshake",
    "KeepAlive",
    "Malformed",
    "MalformedImei",
    "Truncated",
    "UdpPacket",
    "UnknownCodec",
    "ack_bytes",
    "crc16_ibm",
    "decode_avl_data",
    "decode_avl_frame",
    "decode_command_data",
    "decode_command_frame",
    "decode_imei",
    "decode_udp_datagram",
    "encode_avl_data",
    "encode_avl_frame",
    "encode_command",
    "encode_command_data",
    "encode_command_message",
    "encode_imei",
    "encode_imei_bcd",
    "encode_udp_ack",
    "encode_udp_datagram",
    "format_timestamp",
    "record_attributes",
    "record_dict",
    "record_payload",
    "unwrap_frame",
    "wrap_frame",
]
