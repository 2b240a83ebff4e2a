"""Inbound messages and their rows for the writer and storage tests, without a broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from ingest_server.ingest.batch import Inbound, Rows, rows_of
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch


def tap(seq: int) -> UplinkEvent:
    data = {"uid_hash": UID, "tech": "iso14443a", "reader": "door-1"}
    return UplinkEvent(
        seq=seq,
        ts=T0 + timedelta(seconds=seq),
        type="card.tap",
        data=msgspec.Raw(msgspec.json.encode(data)),
    )


def message(
    device: str, events: list[UplinkEvent], *, kind: str = "card_reader", replay: bool = False
) -> Inbound:
    batch = UplinkBatch(device_id=device, kind=kind, sent_at=T0, events=events, replay=replay)
    return Inbound(
        topic=f"campus/v1/sch-1/{device}/up",
        payload=encode_batch(batch),
        mid=1,
        qos=1,
        received_at=datetime.now(UTC),
    )


def rows(*messages: Inbound) -> Rows:
    out = Rows()
    for msg in messages:
        out.extend(rows_of(msg)[0])
    return out


T0 = datetime(2026, 11, 22, 7, 50, tzinfo=UTC)


UID = "5f" * 32
