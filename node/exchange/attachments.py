"""Content-addressed attachment store with resumable, verified uploads.

Files live in ``blobs/<sha256 hex>`` once verified. An upload in progress lives in
``blobs/partial/<sender>/<sha256 hex>``: each sender resumes only its own bytes, and a
file another agency uploaded is never offered to a sender as already held (which sender
may cite which file is recorded in the database: node.exchange.inbound).
Nothing is ever held whole in memory: data moves in chunks of at most 1 MiB.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import BinaryIO

from node.exchange.errors import ExchangeError, Reason

CHUNK_SIZE = 1024 * 1024


def sender_folder(agency_id: str) -> str:
    """An agency id as one folder name: ``140400/police`` -> ``140400+police`` (ids never
    hold a ``+``, so the mapping cannot collide)."""
    return agency_id.replace("/", "+")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial_dir = root / "partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        # (sender, digest) with an upload stream open: two streams appending to one partial
        # file would interleave their bytes, so a second stream for it is refused. Released
        # by Upload.abort on every path, cancellation included (node.exchange.inbound).
        self.uploading: set[tuple[str, str]] = set()

    def path_for(self, sha256_hex: str) -> Path:
        return self.root / sha256_hex

    def partial_path(self, sender: str, sha256_hex: str) -> Path:
        return self.partial_dir / sender_folder(sender) / sha256_hex

    def read(self, sha256_hex: str) -> bytes:
        """A stored blob whole (for small files: shared data, not evidence videos)."""
        return self.path_for(sha256_hex).read_bytes()

    def has(self, sha256_hex: str) -> bool:
        return self.path_for(sha256_hex).exists()

    def held_by(self, sender: str, sha256_hex: str) -> int:
        """Bytes `sender` has uploaded so far of an upload it has not finished."""
        try:
            return self.partial_path(sender, sha256_hex).stat().st_size
        except FileNotFoundError:
            return 0

    def partial_bytes(self, sender: str, *, besides: str = "") -> int:
        """Bytes of `sender`'s unfinished uploads, other than the one of digest `besides`."""
        folder = self.partial_dir / sender_folder(sender)
        total = 0
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name != besides:
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:
                    continue
        return total

    def expire_partials(self, ttl_seconds: float) -> int:
        """Delete unfinished uploads nobody has written to for `ttl_seconds`; their count.

        Call in a worker thread. Uploads with a stream open are kept, whatever their age.
        """
        cutoff = time.time() - ttl_seconds
        open_paths = {self.partial_path(sender, sha) for sender, sha in self.uploading}
        removed = 0
        for path in self.partial_dir.rglob("*"):
            try:
                if path.is_file() and path not in open_paths and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def ingest_file(self, source: Path) -> tuple[bytes, int]:
        """Copy a local file into the store while hashing it; return (digest, size)."""
        digest = hashlib.sha256()
        temp = self.partial_dir / f"local-{os.getpid()}-{id(source)}"
        size = 0
        try:
            with source.open("rb") as reader, temp.open("wb") as writer:
                while chunk := reader.read(CHUNK_SIZE):
                    digest.update(chunk)
                    writer.write(chunk)
                    size += len(chunk)
                writer.flush()
                os.fsync(writer.fileno())
        except OSError as error:
            temp.unlink(missing_ok=True)
            raise ExchangeError(Reason.INVALID, f"attachment {source}: {error.strerror}") from None
        os.replace(temp, self.path_for(digest.hexdigest()))
        return digest.digest(), size

    def reserve(self, sender: str, sha256_hex: str) -> None:
        """Claim the one upload stream of (sender, digest); Upload.abort releases it."""
        key = (sender, sha256_hex)
        if key in self.uploading:
            raise ExchangeError(
                Reason.UNAVAILABLE,
                f"an upload of attachment {sha256_hex[:16]}… is already in progress; "
                "retry when it has finished",
            )
        self.uploading.add(key)

    def begin_upload(
        self,
        sender: str,
        sha256_hex: str,
        offset: int,
        expected_size: int,
        *,
        owned: bool,
        max_partial_bytes: int,
    ) -> Upload:
        """Open `sender`'s upload of a digest it has reserved (call in a worker thread:
        resuming re-reads what is held). `owned`: the sender uploaded this file before, so
        the stream completes at once. On a refusal the reservation is released."""
        try:
            if offset > expected_size:
                raise ExchangeError(Reason.INVALID, "upload offset beyond the attachment's size")
            if owned:
                return Upload(self, sender, sha256_hex, offset, expected_size, complete=True)
            held = self.held_by(sender, sha256_hex)
            if offset > held:
                raise ExchangeError(
                    Reason.PRECONDITION,
                    f"upload offset {offset} is beyond the {held} bytes held; resume from {held}",
                )
            others = self.partial_bytes(sender, besides=sha256_hex)
            if others + expected_size > max_partial_bytes:
                raise ExchangeError(
                    Reason.TOO_LARGE,
                    f"this node holds {others} bytes of other unfinished uploads from "
                    f"'{sender}'; with this file's {expected_size} that is over the "
                    f"{max_partial_bytes} bytes allowed. Finish those uploads first (unfinished "
                    "ones expire)",
                )
            return Upload(self, sender, sha256_hex, offset, expected_size, complete=False)
        except BaseException:
            self.uploading.discard((sender, sha256_hex))
            raise

    def open(self, sha256_hex: str) -> BinaryIO:
        try:
            return self.path_for(sha256_hex).open("rb")
        except FileNotFoundError:
            raise ExchangeError(Reason.NOT_FOUND, f"attachment {sha256_hex} is not held") from None


class Upload:
    """One upload stream: appends chunks, then accepts the file only if the digest matches."""

    def __init__(
        self,
        store: BlobStore,
        sender: str,
        sha256_hex: str,
        offset: int,
        expected_size: int,
        *,
        complete: bool,
    ) -> None:
        self.store = store
        self.key = (sender, sha256_hex)
        self.sha256_hex = sha256_hex
        self.expected_size = expected_size
        self.partial = store.partial_path(sender, sha256_hex)
        self.digest = hashlib.sha256()
        self.size = offset
        if complete:
            self.file: BinaryIO | None = None
            return
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        # Re-hash what is already held so the digest covers the whole file in one pass.
        with self.partial.open("a+b") as existing:
            existing.truncate(offset)
            existing.seek(0)
            while chunk := existing.read(CHUNK_SIZE):
                self.digest.update(chunk)
        self.file = self.partial.open("ab")

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.expected_size:
            self.abort(discard=True)
            raise ExchangeError(
                Reason.INVALID,
                f"attachment {self.sha256_hex[:16]}… is larger than the {self.expected_size} "
                "bytes named in the signed message",
            )
        self.size += len(data)
        if self.file is None:  # this sender's own verified copy is held: count, keep nothing
            return
        self.file.write(data)
        self.digest.update(data)

    def finish(self) -> bool:
        """Close the stream; True when the file is complete, verified and stored.

        Call in a worker thread (it fsyncs).
        """
        if self.file is None:
            return self.store.has(self.sha256_hex)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        if self.size < self.expected_size:
            return False  # kept for resume
        if self.digest.hexdigest() != self.sha256_hex:
            self.partial.unlink(missing_ok=True)
            raise ExchangeError(
                Reason.INVALID,
                f"attachment content does not match SHA-256 {self.sha256_hex} in the signed "
                "message; the upload was discarded",
            )
        # The same bytes another sender may have stored already: replacing is harmless.
        os.replace(self.partial, self.store.path_for(self.sha256_hex))
        return True

    def abort(self, *, discard: bool = False) -> None:
        """Close the stream (keeping what is held for a resume, unless `discard`)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if discard:
            self.partial.unlink(missing_ok=True)
        self.store.uploading.discard(self.key)
