"""The reporter's journal: records that could not be delivered (yet) kept on disk, fsynced, for the next reporter on
the same path to send. See :class:`Journal` for the file format and the durability rules."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys
import threading
from pathlib import Path

from google.protobuf.message import DecodeError

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_client._wire import MAX_BATCH_BYTES

logger = logging.getLogger("budgetwarden_client.reporter")

_READ_CHUNK = 4 << 20


class JournalClosedError(Exception):
    """The journal was closed (the reporter is closing) before a write could reach it."""


def _lock_exclusive(fd: int) -> None:
    """Takes the journal's advisory lock, so two reporters never append to and truncate the same file."""
    if sys.platform != "win32":
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _fsync_dir(path: Path) -> None:
    """Makes a file's creation, rename or removal durable (its directory entry lives in the directory)."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """An append-only file of usage records, one JSON line each: ``{"record": "<base64 serialized UsageRecord>"}``.

    Appends are written and fsynced before they return, so a spilled record survives a crash. The file is truncated only
    after the server acknowledged every record in it; a crash in between replays records the server already has, which
    their idempotency keys make harmless.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._fd: int | None = self._open()
        self._offset = 0  # everything before this offset is acknowledged
        self.initial_records = self._repair_and_count()

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                _lock_exclusive(fd)
            except OSError as exc:
                os.close(fd)
                raise RuntimeError(f"journal {self.path} is in use by another reporter") from exc
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                if created:
                    _fsync_dir(self.path.parent)
                return fd
            os.close(fd)  # its previous owner removed or replaced it between our open and our lock: open it again

    def _repair_and_count(self) -> int:
        """Counts the complete lines and cuts a torn last line (a write a crash interrupted, so never acknowledged to
        its caller), which the next append would otherwise run into."""
        fd = self._require()
        size = os.fstat(fd).st_size
        count = end = position = 0
        while position < size:
            chunk = os.pread(fd, min(_READ_CHUNK, size - position), position)
            if not chunk:
                break
            count += chunk.count(b"\n")
            last = chunk.rfind(b"\n")
            if last >= 0:
                end = position + last + 1
            position += len(chunk)
        if end < size:
            logger.warning("journal %s: cutting a torn last line of %d bytes", self.path, size - end)
            os.ftruncate(fd, end)
            os.fsync(fd)
        return count

    def _require(self) -> int:
        if self._fd is None:
            raise JournalClosedError(str(self.path))
        return self._fd

    def append(self, records: list[bytes]) -> None:
        data = b"".join(
            json.dumps({"record": base64.b64encode(record).decode("ascii")}, separators=(",", ":")).encode() + b"\n"
            for record in records
        )
        with self.lock:
            fd = self._require()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)

    def read(self, max_records: int) -> tuple[list[bytes], int, int]:
        """The next records after the acknowledged offset: (records, the offset after them, unreadable lines)."""
        with self.lock:
            fd = self._require()
            chunk = os.pread(fd, _READ_CHUNK, self._offset)
        records: list[bytes] = []
        bad = 0
        position = 0
        size = 0
        while len(records) < max_records and size < MAX_BATCH_BYTES:
            newline = chunk.find(b"\n", position)
            if newline < 0:
                break
            line = chunk[position:newline]
            position = newline + 1
            try:
                record = base64.b64decode(json.loads(line)["record"], validate=True)
                pb.UsageRecord.FromString(record)
            except (ValueError, KeyError, TypeError, binascii.Error, DecodeError):
                bad += 1
                logger.error("journal %s: skipping an unreadable line: %r", self.path, line[:200])
                continue
            records.append(record)
            size += len(record)
        if position == 0 and len(chunk) == _READ_CHUNK:  # a line longer than any record can be: skip its start
            bad += 1
            position = len(chunk)
            logger.error("journal %s: skipping %d bytes without a line end", self.path, position)
        return records, self._offset + position, bad

    def ack(self, offset: int) -> None:
        with self.lock:
            fd = self._require()
            self._offset = offset
            if offset >= os.fstat(fd).st_size:
                os.ftruncate(fd, 0)
                os.fsync(fd)
                self._offset = 0

    def close(self) -> None:
        """Removes the file when everything in it was acknowledged; otherwise drops the acknowledged head, so the next
        reporter does not send it again."""
        with self.lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    self.path.unlink(missing_ok=True)
                    _fsync_dir(self.path.parent)
                elif self._offset > 0:
                    rest = self.path.with_name(self.path.name + ".tmp")
                    with open(rest, "wb") as out:
                        position = self._offset
                        while position < size:
                            chunk = os.pread(fd, _READ_CHUNK, position)
                            if not chunk:
                                break
                            out.write(chunk)
                            position += len(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(rest, self.path)
                    _fsync_dir(self.path.parent)
            except OSError:
                logger.exception("journal %s: could not tidy up on close (its records are kept)", self.path)
            finally:
                os.close(fd)
