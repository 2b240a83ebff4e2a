"""Writer lanes: each device's rows always go to the same one of N writer connections.

A batch (a *group* here) is the messages taken from the inbox in arrival order, as before; each
message goes to the part of its lane, chosen by a hash of the device id in its topic. Each lane
is a thread with its own connection that writes its parts one transaction at a time, in group
order; the lanes run side by side, so PostgreSQL works on as many transactions at once (two
backends, both cores). A group is acknowledged once every one of its parts has committed and
every group before it was acknowledged: PUBACKs stay in arrival order, after commit.

Why exactly-once on ``(device_id, seq)`` still holds, as with one connection:

- Every row of a device (events, readings, its ``devices`` row, states) is written by one lane,
  and a lane writes one transaction at a time, in order. So the lane's cache of each device's
  highest stored seq (the writer's fast path) is exactly what that lane committed or has in
  hand: no batch of the same device can be in flight on another connection of this server.
- A duplicate spanning two in-flight groups (a resend arriving while the first copy is still
  being written) lands in the same lane behind the first copy, so the second sees it stored.
- A part that fails (connection lost, database restarted, even between its COPY and its
  COMMIT) is retried by its lane before the lane takes its next part, so nothing of the same
  devices was committed by this server in between; whether it committed or not, the retry
  reads the devices' stored max seq afresh on the new connection, and takes the slow path
  (``INSERT … WHERE NOT EXISTS``) for whatever may be stored already.
- Parts of other lanes that committed meanwhile hold other devices; their group, or a later
  one, is not acknowledged before the failed part commits, so a crash then loses nothing: the
  broker resends the whole group and the writer counts what was stored as duplicates.

Other servers on the same ``$share`` group remain what they were: the unique index on
``(device_id, seq, time)`` sends a conflicting fast-path batch the slow way.

One device's backlog is written by one lane: the lanes help when there are several devices (a
school has hundreds), not for a single device's replay.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Final, Protocol

from ingest_server.ingest.batch import Batch, Inbound

#: Topics → lane, bounded like the consumer's topic cache (one entry per device channel).
_MAX_CACHED_TOPICS: Final = 100_000


class LaneOf:
    """The lane of a message's topic: the device id's CRC-32 modulo the lanes (stable across
    processes and runs, unlike ``hash``); a topic without a device id goes to lane 0, where it is
    quarantined as always."""

    def __init__(self, lanes: int) -> None:
        if lanes < 1:
            raise ValueError("at least one lane")
        self.lanes = lanes
        self._cache: dict[str, int] = {}
        #: The lane of a topic seen before, else None (a dict look-up, no call of this object).
        self.known: Callable[[str], int | None] = self._cache.get

    def __call__(self, topic: str) -> int:
        lane = self._cache.get(topic)
        if lane is None:
            lane = self._compute(topic)
            if len(self._cache) >= _MAX_CACHED_TOPICS:
                self._cache.clear()
            self._cache[topic] = lane
        return lane

    def _compute(self, topic: str) -> int:
        if self.lanes == 1:
            return 0
        # campus/v1/{school}/{device}/{channel}; any other shape is for the decoder to refuse
        parts = topic.split("/", 5)
        if len(parts) != 5 or not parts[3]:
            return 0
        return zlib.crc32(parts[3].encode("utf-8", "surrogatepass")) % self.lanes


class Source(Protocol):
    """What :func:`collect_group` needs of the inbox (see :class:`~.consumer.Inbox`)."""

    def get(self, timeout: float) -> Inbound | None: ...

    def get_many(self, max_items: int, timeout: float) -> list[Inbound]: ...


class Group:
    """The messages of one batch in arrival order, and each lane's part of them."""

    def __init__(self, lanes: int, max_bytes: int) -> None:
        self.parts = [Batch(max_bytes=max_bytes) for _ in range(lanes)]
        #: Every message of the group, in arrival order: what is acknowledged, in that order.
        self.messages: list[Inbound] = []

    def __len__(self) -> int:
        return len(self.messages)

    def busy(self) -> list[int]:
        """The lanes with something to write."""
        return [k for k, part in enumerate(self.parts) if len(part)]


def collect_group(
    inbox: Source,
    lane_of: Callable[[str], int],
    lanes: int,
    *,
    max_size: int,
    max_wait_s: float,
    idle_s: float,
    max_bytes: int,
) -> Group | None:
    """Like :func:`~.consumer.collect`, into one part per lane: wait up to ``idle_s`` for a
    first message, then gather until the group holds ``max_size`` rows per lane or
    ``max_wait_s`` has passed since that first message. None when nothing came.

    The lanes share the group's budget: rows spread over every lane make parts of about
    ``max_size`` each, as before; a backlog that lands in one lane (a device replaying, a
    queue of a few devices' messages) makes one part of up to ``max_size * lanes`` rows, one
    transaction where there were ``lanes`` in a row (PostgreSQL's cost per transaction, the
    devices upsert and the commit, measured 0.1-0.7 µs an event less at 10,000 rows than at
    5,000). What a group holds at most, its memory and what a commit hands the live stream,
    stays ``max_size * lanes`` rows."""
    first = inbox.get(idle_s)
    if first is None:
        return None
    group = Group(lanes, max_bytes)
    parts, messages = group.parts, group.messages
    parts[lane_of(first.topic)].add(first)
    messages.append(first)
    adds = [p.add for p in parts]
    # a known topic's lane without a call of lane_of (once per message)
    unknown: dict[str, int] = {}
    known = lane_of.known if isinstance(lane_of, LaneOf) else unknown.get
    deadline = time.monotonic() + max_wait_s
    budget = max_size * lanes
    total = sum(p.size for p in parts)
    while total < budget:
        # as many messages as should fill the group, at the rows per message so far
        room = max(1, (budget - total) * len(messages) // total)
        msgs = inbox.get_many(room, max(0.0, deadline - time.monotonic()))
        if not msgs:
            break
        if lanes == 1:
            add = adds[0]
            for msg in msgs:
                add(msg)
        else:
            for msg in msgs:
                lane = known(msg.topic)
                adds[lane_of(msg.topic) if lane is None else lane](msg)
        messages += msgs
        total = sum(p.size for p in parts)
    return group


__all__ = ["Group", "LaneOf", "collect_group"]
