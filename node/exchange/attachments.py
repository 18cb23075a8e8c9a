"""Content-addressed attachment store with resumable, verified uploads.

Files live in ``blobs/<sha256 hex>`` once verified; an upload in progress lives in
``blobs/partial/<sha256 hex>`` so a broken transfer resumes where it stopped.
Nothing is ever held whole in memory: data moves in chunks of at most 1 MiB.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from node.exchange.errors import ExchangeError, Reason

CHUNK_SIZE = 1024 * 1024


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial_dir = root / "partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        # Digests with an upload stream open: two streams appending to one partial file would
        # interleave their bytes, so a second stream for the same digest is refused.
        self.uploading: set[str] = set()

    def path_for(self, sha256_hex: str) -> Path:
        return self.root / sha256_hex

    def read(self, sha256_hex: str) -> bytes:
        """A stored blob whole (for small files: shared data, not evidence videos)."""
        return self.path_for(sha256_hex).read_bytes()

    def has(self, sha256_hex: str) -> bool:
        return self.path_for(sha256_hex).exists()

    def held(self, sha256_hex: str) -> int:
        """Bytes held for an upload in progress (0 when none, the size when complete)."""
        if self.has(sha256_hex):
            return self.path_for(sha256_hex).stat().st_size
        partial = self.partial_dir / sha256_hex
        return partial.stat().st_size if partial.exists() else 0

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

    def begin_upload(self, sha256_hex: str, offset: int, expected_size: int) -> Upload:
        """Open an upload (call in a worker thread: resuming re-reads what is held)."""
        if sha256_hex in self.uploading:
            raise ExchangeError(
                Reason.UNAVAILABLE,
                f"an upload of attachment {sha256_hex[:16]}… is already in progress; "
                "retry when it has finished",
            )
        held = self.held(sha256_hex)
        if offset > held:
            raise ExchangeError(
                Reason.PRECONDITION,
                f"upload offset {offset} is beyond the {held} bytes held; resume from {held}",
            )
        if offset > expected_size:
            raise ExchangeError(Reason.INVALID, "upload offset beyond the attachment's size")
        self.uploading.add(sha256_hex)
        try:
            return Upload(self, sha256_hex, offset, expected_size)
        except BaseException:
            self.uploading.discard(sha256_hex)
            raise

    def open(self, sha256_hex: str) -> BinaryIO:
        try:
            return self.path_for(sha256_hex).open("rb")
        except FileNotFoundError:
            raise ExchangeError(Reason.NOT_FOUND, f"attachment {sha256_hex} is not held") from None


class Upload:
    """One upload stream: appends chunks, then accepts the file only if the digest matches."""

    def __init__(self, store: BlobStore, sha256_hex: str, offset: int, expected_size: int) -> None:
        self.store = store
        self.sha256_hex = sha256_hex
        self.expected_size = expected_size
        self.partial = store.partial_dir / sha256_hex
        self.digest = hashlib.sha256()
        self.size = offset
        if store.has(sha256_hex):
            self.file: BinaryIO | None = None
            return
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
        if self.file is None:  # already held and verified: count, keep nothing
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
        os.replace(self.partial, self.store.path_for(self.sha256_hex))
        return True

    def abort(self, *, discard: bool = False) -> None:
        """Close the stream (keeping what is held for a resume, unless `discard`)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if discard:
            self.partial.unlink(missing_ok=True)
        self.store.uploading.discard(self.sha256_hex)
