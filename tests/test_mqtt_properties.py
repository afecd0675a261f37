"""The MQTT 5 properties of a publish, encoded once: the bytes paho's own encoder sends."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from defectd.publish.connection import MessageProperties

USER = [("schema_version", "1"), ("kind", "result"), ("result_id", "0f" * 16)]


def _paho(packet_type: int, **fields: object) -> Properties:
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    for name, value in fields.items():
        setattr(props, name, value)
    return props


def _decoded(packed: bytes, packet_type: int) -> dict[str, object]:
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    props.unpack(packed)  # type: ignore[no-untyped-call]
    out: dict[str, object] = props.json()  # type: ignore[no-untyped-call]
    return out


@pytest.mark.parametrize(
    ("expiry", "correlation", "user"),
    [
        (None, None, USER),
        (4, None, USER),
        (2**32 - 1, bytes.fromhex("c0ffee"), USER),
        (None, b"", [("k", "v" * 200)]),  # a property length of two bytes
        (60, b"\x01" * 300, [("k", "é" * 9000)]),  # and of three
    ],
)
def test_the_bytes_are_paho_s_and_decode_to_the_same_properties(
    expiry: int | None, correlation: bytes | None, user: list[tuple[str, str]]
) -> None:
    for packet_type in (PacketTypes.PUBLISH, PacketTypes.WILLMESSAGE):
        ours = MessageProperties(
            packet_type,
            content_type="application/json",
            payload_format=1,
            user=user,
            expiry_s=expiry,
            correlation=correlation,
        )
        fields: dict[str, object] = {
            "ContentType": "application/json",
            "PayloadFormatIndicator": 1,
            "UserProperty": user,
        }
        if expiry is not None:
            fields["MessageExpiryInterval"] = expiry
        if correlation is not None:
            fields["CorrelationData"] = correlation
        theirs = _paho(packet_type, **fields)
        assert _decoded(ours.pack(), packet_type) == _decoded(theirs.pack(), packet_type)
        assert len(ours.pack()) == len(theirs.pack())
        # Read back as attributes too, as paho's own would be (logs, tests of the publisher).
        assert ours.MessageExpiryInterval == expiry if expiry is not None else True
        assert ours.UserProperty == user
        assert str(ours) == str(theirs)


def test_a_value_too_long_for_mqtt_is_refused() -> None:
    with pytest.raises(ValueError, match="65535"):
        MessageProperties(PacketTypes.PUBLISH, correlation=b"x" * 65536)
