"""Content-addressed attachment store with resumable, verified uploads.

Files that a stored message cites live in ``blobs/<sha256 hex>``, one copy whoever sent them.
Everything else a sender has uploaded stays in its own folder, ``blobs/partial/<sender>/``:
``<sha256 hex>`` while the upload is unfinished, ``<sha256 hex>.verified`` once its digest
matched, until a message citing it is received and the file is adopted into the store. So
each sender resumes only its own bytes, a file another agency uploaded is never offered to a
sender as already held (which sender may cite which file is recorded in the database:
node.exchange.inbound), and what a sender holds here without a message to show for it is
bounded and expires. Nothing is ever held whole in memory: data moves in chunks of 1 MiB.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from node.exchange.errors import ExchangeError, Reason

CHUNK_SIZE = 1024 * 1024
VERIFIED = ".verified"


def sender_folder(agency_id: str) -> str:
    """An agency id as one folder name: ``140400/police`` -> ``140400+police`` (ids never
    hold a ``+``, so the mapping cannot collide)."""
    return agency_id.replace("/", "+")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial_dir = root / "partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        # (sender, digest) -> declared size, for each upload stream open: two streams
        # appending to one file would interleave their bytes, so a second is refused; and an
        # open upload counts at its full size against the sender's bound. Released by
        # Upload.abort on every path, cancellation included (node.exchange.inbound).
        self.uploading: dict[tuple[str, str], int] = {}

    def path_for(self, sha256_hex: str) -> Path:
        return self.root / sha256_hex

    def partial_path(self, sender: str, sha256_hex: str) -> Path:
        return self.partial_dir / sender_folder(sender) / sha256_hex

    def verified_path(self, sender: str, sha256_hex: str) -> Path:
        return self.partial_dir / sender_folder(sender) / (sha256_hex + VERIFIED)

    def read(self, sha256_hex: str) -> bytes:
        """A stored blob whole (for small files: shared data, not evidence videos)."""
        return self.path_for(sha256_hex).read_bytes()

    def has(self, sha256_hex: str) -> bool:
        return self.path_for(sha256_hex).exists()

    def held_for(self, sender: str, sha256_hex: str) -> bool:
        """Whether a verified copy is here for `sender` to cite: adopted, or its own."""
        return self.has(sha256_hex) or self.verified_path(sender, sha256_hex).exists()

    def held_by(self, sender: str, sha256_hex: str) -> int:
        """Bytes `sender` has uploaded so far of an upload it has not finished."""
        try:
            return self.partial_path(sender, sha256_hex).stat().st_size
        except FileNotFoundError:
            return 0

    def pending_bytes(self, sender: str, *, besides: str = "") -> int:
        """Bytes `sender` holds here without a received message citing them — unfinished
        uploads, verified ones not yet cited, and open uploads at their declared size —
        other than those of digest `besides`."""
        open_sizes = {sha: size for (who, sha), size in self.uploading.items() if who == sender}
        total = sum(size for sha, size in open_sizes.items() if sha != besides)
        try:
            entries = list(os.scandir(self.partial_dir / sender_folder(sender)))
        except FileNotFoundError:
            return total
        for entry in entries:
            digest = entry.name.removesuffix(VERIFIED)
            if digest == besides or digest in open_sizes:
                continue
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def stale_uploads(self, ttl_seconds: float) -> list[tuple[str, str, Path]]:
        """(sender, digest, file) of what senders left here untouched for `ttl_seconds`:
        unfinished uploads and verified files no message cited. Call in a worker thread; the
        caller deletes each under the upload's reservation (node.runtime)."""
        cutoff = time.time() - ttl_seconds
        stale: list[tuple[str, str, Path]] = []
        for folder in self.partial_dir.iterdir():
            if not folder.is_dir():
                if folder.name.startswith("local-") and _older(folder, cutoff):
                    stale.append(("", "", folder))  # a local copy a crash left behind
                continue
            sender = folder.name.replace("+", "/")
            for path in folder.iterdir():
                if _older(path, cutoff):
                    stale.append((sender, path.name.removesuffix(VERIFIED), path))
        return stale

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

    def adopt(self, sender: str, sha256_hex: str) -> bool:
        """Make `sender`'s verified copy the store's, for a message that cites it; False
        when there is none (it expired): the sender must upload the file again."""
        mine = self.verified_path(sender, sha256_hex)
        try:
            if self.has(sha256_hex):
                mine.unlink(missing_ok=True)  # the same bytes are held already
            else:
                os.replace(mine, self.path_for(sha256_hex))
        except FileNotFoundError:
            return self.has(sha256_hex)
        return True

    def reserve(self, sender: str, sha256_hex: str, declared_size: int) -> None:
        """Claim the one upload stream of (sender, digest); Upload.abort releases it."""
        key = (sender, sha256_hex)
        if key in self.uploading:
            raise ExchangeError(
                Reason.UNAVAILABLE,
                f"an upload of attachment {sha256_hex[:16]}… is already in progress; "
                "retry when it has finished",
            )
        self.uploading[key] = declared_size

    def release(self, sender: str, sha256_hex: str) -> None:
        self.uploading.pop((sender, sha256_hex), None)

    def begin_upload(
        self,
        sender: str,
        sha256_hex: str,
        offset: int,
        expected_size: int,
        *,
        owned: bool,
        max_pending_bytes: int,
    ) -> Upload:
        """Open `sender`'s upload of a digest it has reserved (call in a worker thread:
        resuming re-reads what is held). `owned`: the sender uploaded this file before and
        its copy is held, so the stream completes at once. On a refusal the reservation is
        released."""
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
            others = self.pending_bytes(sender, besides=sha256_hex)
            if others + expected_size > max_pending_bytes:
                raise ExchangeError(
                    Reason.TOO_LARGE,
                    f"this node holds {others} bytes of '{sender}' that no message it "
                    f"delivered cites yet; with this file's {expected_size} that is over the "
                    f"{max_pending_bytes} bytes allowed. Deliver the messages those uploads "
                    "are for first (what none cites expires)",
                )
            return Upload(self, sender, sha256_hex, offset, expected_size, complete=False)
        except BaseException:
            self.release(sender, sha256_hex)
            raise

    def open(self, sha256_hex: str) -> BinaryIO:
        try:
            return self.path_for(sha256_hex).open("rb")
        except FileNotFoundError:
            raise ExchangeError(Reason.NOT_FOUND, f"attachment {sha256_hex} is not held") from None


async def expire_pending(store: BlobStore, ttl_seconds: float) -> int:
    """Delete what senders left untouched for `ttl_seconds` (BlobStore.stale_uploads); the
    number of files deleted. Each is deleted while holding its upload's reservation, so no
    upload of it can start (or be running) meanwhile; one in progress is skipped."""
    cutoff_age = ttl_seconds
    removed = 0
    for sender, digest, path in await asyncio.to_thread(store.stale_uploads, cutoff_age):
        if sender:
            try:
                store.reserve(sender, digest, 0)
            except ExchangeError:  # an upload of it is open: not stale after all
                continue
        try:
            if await asyncio.to_thread(_older, path, time.time() - cutoff_age):
                await asyncio.to_thread(path.unlink, missing_ok=True)
                removed += 1
        finally:
            if sender:
                store.release(sender, digest)
    return removed


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


class Upload:
    """One upload stream: appends chunks, then keeps the file only if the digest matches."""

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
        self.sender = sender
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

    def write(self, chunks: Sequence[bytes]) -> None:
        """Append chunks (call in a worker thread: it writes and hashes)."""
        for data in chunks:
            if self.size + len(data) > self.expected_size:
                self.abort(discard=True)
                raise ExchangeError(
                    Reason.INVALID,
                    f"attachment {self.sha256_hex[:16]}… is larger than the "
                    f"{self.expected_size} bytes named in the signed message",
                )
            self.size += len(data)
            if self.file is None:  # this sender's own verified copy is held: count only
                continue
            self.file.write(data)
            self.digest.update(data)

    def finish(self) -> bool:
        """Close the stream; True when the file is complete, verified and kept.

        Call in a worker thread (it fsyncs).
        """
        if self.file is None:
            return self.store.held_for(self.sender, self.sha256_hex)
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
        os.replace(self.partial, self.store.verified_path(self.sender, self.sha256_hex))
        return True

    def abort(self, *, discard: bool = False) -> None:
        """Close the stream (keeping what is held for a resume, unless `discard`)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if discard:
            self.partial.unlink(missing_ok=True)
        self.store.release(self.sender, self.sha256_hex)
