"""The attachment store: each sender's uploads apart until a message cites them, bounded,
expiring, and an upload's reservation released on every path (node.exchange.attachments,
node.exchange.inbound)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from node.exchange.attachments import BlobStore, expire_pending, sender_folder
from node.exchange.errors import ExchangeError, Reason
from node.exchange.inbound import _to_thread_to_the_end

POLICE, ECOLOGY = "140400/police", "140400/ecology"
DATA = b"evidence" * 1000
DIGEST = hashlib.sha256(DATA).hexdigest()
BIG = 1 << 40


def upload(
    store: BlobStore, sender: str, data: bytes, offset: int = 0, owned: bool = False
) -> tuple[bool, int]:
    store.reserve(sender, DIGEST, len(DATA))
    started = store.begin_upload(
        sender, DIGEST, offset, len(DATA), owned=owned, max_pending_bytes=BIG
    )
    try:
        started.write([data])
        return started.finish(), started.size
    finally:
        started.abort()


def test_each_sender_resumes_only_its_own_bytes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert upload(store, POLICE, DATA[:3000]) == (False, 3000)
    assert store.held_by(POLICE, DIGEST) == 3000
    assert store.held_by(ECOLOGY, DIGEST) == 0
    assert (tmp_path / "partial" / sender_folder(POLICE) / DIGEST).exists()
    with pytest.raises(ExchangeError, match="beyond the 0 bytes held; resume from 0"):
        upload(store, ECOLOGY, DATA[3000:], offset=3000)
    assert upload(store, POLICE, DATA[3000:], offset=3000) == (True, len(DATA))
    # Verified, but the police's until a message of the police cites it.
    assert store.held_for(POLICE, DIGEST) and not store.held_for(ECOLOGY, DIGEST)
    assert not store.has(DIGEST)
    assert store.adopt(POLICE, DIGEST)
    assert store.has(DIGEST) and store.pending_bytes(POLICE) == 0
    # Another sender of the same file must send all of it: the node's copy is not its own.
    assert upload(store, ECOLOGY, DATA) == (True, len(DATA))
    assert store.adopt(ECOLOGY, DIGEST)  # the store keeps its one copy
    assert not store.verified_path(ECOLOGY, DIGEST).exists()
    assert not store.uploading


def test_a_copy_that_expired_cannot_be_adopted(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    upload(store, POLICE, DATA)
    store.verified_path(POLICE, DIGEST).unlink()
    assert not store.adopt(POLICE, DIGEST)


def test_only_one_stream_per_sender_and_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.reserve(POLICE, DIGEST, 10)
    with pytest.raises(ExchangeError) as caught:
        store.reserve(POLICE, DIGEST, 10)
    assert caught.value.reason is Reason.UNAVAILABLE
    store.reserve(ECOLOGY, DIGEST, 10)  # another sender's upload of the same file is its own


def test_a_refused_begin_releases_the_reservation(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.reserve(POLICE, DIGEST, len(DATA))
    with pytest.raises(ExchangeError, match="beyond the attachment's size"):
        store.begin_upload(
            POLICE, DIGEST, len(DATA) + 1, len(DATA), owned=False, max_pending_bytes=BIG
        )
    assert not store.uploading


def test_what_one_sender_holds_uncited_is_bounded(tmp_path: Path) -> None:
    """Files on disk count, and so do open uploads at their declared size: eight streams
    opened at once cannot each see the others' files as still empty."""
    store = BlobStore(tmp_path)
    other = tmp_path / "partial" / sender_folder(POLICE) / ("0" * 64)
    other.parent.mkdir(parents=True)
    other.write_bytes(b"z" * 5000)
    store.reserve(POLICE, DIGEST, len(DATA))
    with pytest.raises(ExchangeError) as caught:
        store.begin_upload(POLICE, DIGEST, 0, len(DATA), owned=False, max_pending_bytes=10_000)
    assert caught.value.reason is Reason.TOO_LARGE
    assert "holds 5000 bytes of '140400/police'" in caught.value.message
    assert not store.uploading
    other.unlink()
    store.reserve(POLICE, "1" * 64, 6000)  # an open upload, nothing written yet
    store.reserve(POLICE, DIGEST, len(DATA))
    with pytest.raises(ExchangeError, match="holds 6000 bytes"):
        store.begin_upload(POLICE, DIGEST, 0, len(DATA), owned=False, max_pending_bytes=10_000)
    store.release(POLICE, "1" * 64)
    verified = store.verified_path(POLICE, "3" * 64)
    verified.write_bytes(b"v" * 7000)  # verified, waiting for its message: counted too
    with pytest.raises(ExchangeError, match="holds 7000 bytes"):
        store.begin_upload(POLICE, DIGEST, 0, len(DATA), owned=False, max_pending_bytes=10_000)
    # Another sender's uploads do not count against the police.
    store.reserve(ECOLOGY, DIGEST, len(DATA))
    store.begin_upload(ECOLOGY, DIGEST, 0, len(DATA), owned=False, max_pending_bytes=10_000).abort()


def test_what_nobody_cites_expires_unless_a_stream_is_open(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    upload(store, POLICE, DATA[:100])  # unfinished
    upload(store, ECOLOGY, DATA[:100])
    other = "2" * 64
    verified = store.verified_path(POLICE, other)
    verified.write_bytes(b"verified, never cited")
    old = time.time() - 3600
    for path in (store.partial_path(POLICE, DIGEST), store.partial_path(ECOLOGY, DIGEST), verified):
        os.utime(path, (old, old))
    store.reserve(ECOLOGY, DIGEST, len(DATA))  # ecology is uploading right now
    assert asyncio.run(expire_pending(store, ttl_seconds=600)) == 2
    assert store.held_by(POLICE, DIGEST) == 0 and not verified.exists()
    assert store.held_by(ECOLOGY, DIGEST) == 100
    assert store.uploading == {(ECOLOGY, DIGEST): len(DATA)}  # its reservation untouched
    store.release(ECOLOGY, DIGEST)
    assert asyncio.run(expire_pending(store, ttl_seconds=7200)) == 0


def _cancelled_twice(on_cancel: list[str]) -> None:
    started, release = threading.Event(), threading.Event()

    def work() -> str:
        started.set()
        release.wait(10)
        return "opened"

    async def scenario() -> None:
        task = asyncio.create_task(_to_thread_to_the_end(work, on_cancel=on_cancel.append))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # still waiting for the thread
        task.cancel()  # and cancelled again while it waits
        await asyncio.sleep(0.05)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_cancelled_file_work_is_waited_out_and_undone() -> None:
    """The caller is cancelled (twice) while the thread works: the work finishes, its
    result is undone (the reservation released), and only then does the cancellation go on."""
    undone: list[str] = []
    _cancelled_twice(undone)
    assert undone == ["opened"]
