"""ONVIF event notifications → what they mean for us (sans-I/O: no SOAP client here).

A PullMessages answer carries ``wsnt:NotificationMessage`` items: a ``wsnt:Topic`` (the
ConcreteSet dialect, e.g. ``tns1:RuleEngine/CellMotionDetector/Motion``) and a ``tt:Message``
with ``PropertyOperation`` (``Initialized`` on subscribing, ``Changed``, ``Deleted``), a
``tt:Source`` and a ``tt:Data`` of ``tt:SimpleItem Name= Value=``. This module takes the topic
text and the ``tt:Message`` element (any ElementTree-like element: lxml's or the standard
library's) and says which of our kinds it is and whether the condition is active.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

Kind = Literal["motion", "tamper", "video_loss"]

#: Topic (prefix stripped, lower case) → our kind. The ONVIF topic set names motion twice
#: (the older VideoSource alarm, the rule engine's cell motion detector) and tampering as a
#: "global scene change" or the rule engine's tamper detector; cameras pick one or both.
TOPIC_KINDS: Final[dict[str, Kind]] = {
    "videosource/motionalarm": "motion",
    "ruleengine/cellmotiondetector/motion": "motion",
    "ruleengine/motionregiondetector/motion": "motion",
    "videosource/globalscenechange/imagingservice": "tamper",
    "videosource/globalscenechange/analyticsservice": "tamper",
    "ruleengine/tamperdetector/tamper": "tamper",
    "videosource/signalloss": "video_loss",
}
#: Data items whose boolean value is the condition, in the order they are looked for.
STATE_ITEMS: Final = ("IsMotion", "IsTamper", "State", "SignalLoss", "Value")
#: Topics and item values longer than this are cut: they are from the camera, not us.
MAX_TEXT: Final = 256
_TRUE: Final = frozenset({"true", "1", "on", "active"})
_FALSE: Final = frozenset({"false", "0", "off", "inactive"})


class Element(Protocol):
    """The part of an ElementTree element this module reads."""

    tag: str
    attrib: dict[str, str]

    def iter(self) -> Iterable[Element]: ...


@dataclass(frozen=True, slots=True)
class CameraCondition:
    kind: Kind
    active: bool
    topic: str
    source: str | None
    #: ``Initialized`` (the state when subscribing), ``Changed`` or ``Deleted``.
    operation: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A notification that is not one of ours, or is malformed; ``reason`` says which."""

    reason: str
    topic: str


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def topic_kind(topic: str) -> Kind | None:
    """``tns1:VideoSource/SignalLoss`` (any prefix, any case) → ``video_loss``."""
    path = "/".join(part.split(":", 1)[-1] for part in topic.strip().split("/"))
    return TOPIC_KINDS.get(path.lower())


def element_items(message: Element, section: str) -> dict[str, str]:
    """The ``Name``/``Value`` pairs of the ``tt:SimpleItem``s under ``section`` (``Source`` or
    ``Data``) of a ``tt:Message`` element (for clients that hand over raw XML)."""
    found: dict[str, str] = {}
    for el in message.iter():
        if _local(el.tag) != section:
            continue
        for item in el.iter():
            if _local(item.tag) == "SimpleItem":
                name, value = item.attrib.get("Name"), item.attrib.get("Value")
                if name and value is not None and len(found) < 32:
                    found[name[:MAX_TEXT]] = value[:MAX_TEXT]
    return found


def decode(
    topic: str | None,
    operation: str | None,
    source: Mapping[str, str],
    data: Mapping[str, str],
) -> CameraCondition | Ignored:
    """One notification (its topic, ``PropertyOperation``, source and data items) → a
    condition of ours, or why it is ignored."""
    text = (topic or "").strip()[:MAX_TEXT]
    kind = topic_kind(text)
    if kind is None:
        return Ignored("topic", text or "(none)")
    value = next((data[n] for n in STATE_ITEMS if n in data), None)
    if value is None and len(data) == 1:
        value = next(iter(data.values()))
    if value is None:
        return Ignored("no state item", text)
    if value.strip().lower() in _TRUE:
        active = True
    elif value.strip().lower() in _FALSE:
        active = False
    else:
        return Ignored("state not boolean", text)
    first = next(iter(source.values()), None)
    op = (operation or "Changed")[:32]
    return CameraCondition(kind, active, text, first[:128] if first else None, op)
