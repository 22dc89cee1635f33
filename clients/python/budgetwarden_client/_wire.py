"""The reporter's wire encoding: usage records travel as serialized ``UsageRecord`` bytes from ``report()`` to the
journal and the RPCs, and a batch of them is framed into a request here; the answers are read back into counts.

Records are queued already serialized (that is also what the journal holds), so a batch, and every resend of it, is a
join rather than a parse and a re-serialization.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.protobuf import text_format
from google.protobuf.message import DecodeError

from budgetwarden_api.v1 import budget_pb2 as pb

MAX_BATCH_RECORDS = 1000
"""The server's limit of records per request (and per stream message)."""
MAX_BATCH_BYTES = 1 << 20
"""Bytes of records per request: far below gRPC's default 4 MiB receive limit, which would otherwise turn a batch of
records with many labels into a RESOURCE_EXHAUSTED that no retry can fix."""
MAX_RECORD_BYTES = 256 << 10
"""A record larger than this can never be delivered (the server's field limits make real ones a few KiB at most); it
is refused by ``report()`` instead of blocking the queue."""

# ReportRequest and ReportStreamRequest both hold ``repeated UsageRecord records = 1``: field 1, length-delimited.
_RECORDS_TAG = b"\x0a"


@dataclass(frozen=True)
class Acks:
    """How the server acknowledged the records of one call."""

    applied: int
    duplicate: int
    unreserved: int


class BadResponseError(Exception):
    """The server answered, but not for the records sent: treated as a failure, so the records are sent again."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_records(records: Iterable[bytes]) -> bytes:
    """A serialized ReportRequest / ReportStreamRequest holding ``records`` (each a serialized UsageRecord)."""
    return b"".join(_RECORDS_TAG + _varint(len(record)) + record for record in records)


def describe(data: bytes) -> str:
    """A serialized record as one line of text, for the logs."""
    try:
        return text_format.MessageToString(pb.UsageRecord.FromString(data), as_one_line=True)
    except DecodeError:
        return f"<undecodable record, {len(data)} bytes>"


def split(records: list[bytes], max_records: int) -> Iterator[list[bytes]]:
    """Consecutive groups of at most ``max_records`` records and ``MAX_BATCH_BYTES`` bytes."""
    group: list[bytes] = []
    size = 0
    for record in records:
        if group and (len(group) >= max_records or size + len(record) > MAX_BATCH_BYTES):
            yield group
            group, size = [], 0
        group.append(record)
        size += len(record) + 8
    if group:
        yield group


def report_acks(response: pb.ReportResponse, sent: int) -> Acks:
    """A Report answer's per-record statuses, counted; the answer must hold one result per record sent."""
    if len(response.results) != sent:
        raise BadResponseError(f"Report answered {len(response.results)} results for {sent} records")
    statuses = [result.status for result in response.results]
    return Acks(
        applied=statuses.count(pb.REPORT_STATUS_APPLIED),
        duplicate=statuses.count(pb.REPORT_STATUS_DUPLICATE),
        unreserved=statuses.count(pb.REPORT_STATUS_UNRESERVED),
    )


def stream_acks(response: pb.ReportStreamResponse, sent: int) -> Acks:
    """A ReportStream answer's counts; it must acknowledge every record sent."""
    if response.records != sent:
        raise BadResponseError(f"ReportStream acknowledged {response.records} records of {sent} sent")
    return Acks(applied=response.applied, duplicate=response.duplicate, unreserved=response.unreserved)
