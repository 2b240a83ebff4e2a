"""The ONVIF notification codec: topics → our kinds, state items → active, the rest ignored."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from device_drivers.codecs.onvif_events import CameraCondition, Ignored, decode, element_items

TT = "http://www.onvif.org/ver10/schema"


@pytest.mark.parametrize(
    ("topic", "data", "kind", "active"),
    [
        ("tns1:RuleEngine/CellMotionDetector/Motion", {"IsMotion": "true"}, "motion", True),
        ("tns1:VideoSource/MotionAlarm", {"State": "false"}, "motion", False),
        ("tns1:RuleEngine/TamperDetector/Tamper", {"IsTamper": "true"}, "tamper", True),
        ("tns1:VideoSource/GlobalSceneChange/ImagingService", {"State": "1"}, "tamper", True),
        ("tns1:VideoSource/SignalLoss", {"State": "true"}, "video_loss", True),
        # another prefix for the same namespace, another case
        ("ns0:VideoSource/ns0:SignalLoss", {"state": "FALSE"}, "video_loss", False),
    ],
)
def test_topics_map_to_kinds(topic: str, data: dict[str, str], kind: str, active: bool) -> None:
    got = decode(topic, "Changed", {"Source": "VideoSource_1"}, data)
    assert got == CameraCondition(kind, active, topic, "VideoSource_1", "Changed")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("topic", "data", "reason"),
    [
        ("tns1:Device/HardwareFailure/StorageFailure", {"Failed": "true"}, "topic"),
        (None, {"IsMotion": "true"}, "topic"),
        ("tns1:VideoSource/MotionAlarm", {}, "no state item"),
        ("tns1:VideoSource/MotionAlarm", {"State": "maybe"}, "state not boolean"),
    ],
)
def test_other_or_malformed_notifications_are_ignored_with_a_reason(
    topic: str | None, data: dict[str, str], reason: str
) -> None:
    got = decode(topic, "Changed", {}, data)
    assert isinstance(got, Ignored)
    assert got.reason == reason


def test_items_from_a_raw_tt_message_and_long_values_cut() -> None:
    long = "x" * 1000
    message = ET.fromstring(  # noqa: S314 - our own text
        f'<tt:Message xmlns:tt="{TT}" UtcTime="2026-12-01T08:00:00Z"'
        ' PropertyOperation="Initialized">'
        f'<tt:Source><tt:SimpleItem Name="Source" Value="{long}"/></tt:Source>'
        '<tt:Data><tt:SimpleItem Name="State" Value="true"/></tt:Data></tt:Message>'
    )
    source, data = element_items(message, "Source"), element_items(message, "Data")
    assert data == {"State": "true"}
    got = decode("tns1:VideoSource/MotionAlarm", "Initialized", source, data)
    assert isinstance(got, CameraCondition)
    assert got.source == "x" * 128
    assert got.operation == "Initialized"
