"""The attachment store: each sender's unfinished uploads apart, bounded, expiring, and an
upload's reservation released on every path (node.exchange.attachments, node.exchange.inbound)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from node.exchange.attachments import BlobStore, sender_folder
from node.exchange.errors import ExchangeError, Reason
from node.exchange.inbound import _to_thread_to_the_end

POLICE, ECOLOGY = "140400/police", "140400/ecology"
DATA = b"evidence" * 1000
DIGEST = hashlib.sha256(DATA).hexdigest()
BIG = 1 << 40


def upload(store: BlobStore, sender: str, data: bytes, offset: int = 0, owned: bool = False):  # type: ignore[no-untyped-def]
    store.reserve(sender, DIGEST)
    started = store.begin_upload(
        sender, DIGEST, offset, len(DATA), owned=owned, max_partial_bytes=BIG
    )
    try:
        started.write(data)
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
    assert store.has(DIGEST)
    # Another sender of the same file must send all of it: the node's copy is not its own.
    assert upload(store, ECOLOGY, DATA) == (True, len(DATA))
    assert not store.uploading


def test_only_one_stream_per_sender_and_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.reserve(POLICE, DIGEST)
    with pytest.raises(ExchangeError) as caught:
        store.reserve(POLICE, DIGEST)
    assert caught.value.reason is Reason.UNAVAILABLE
    store.reserve(ECOLOGY, DIGEST)  # another sender's upload of the same file is its own


def test_a_refused_begin_releases_the_reservation(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.reserve(POLICE, DIGEST)
    with pytest.raises(ExchangeError, match="beyond the attachment's size"):
        store.begin_upload(
            POLICE, DIGEST, len(DATA) + 1, len(DATA), owned=False, max_partial_bytes=BIG
        )
    assert not store.uploading


def test_unfinished_uploads_of_one_sender_are_bounded(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    other = tmp_path / "partial" / sender_folder(POLICE) / ("0" * 64)
    other.parent.mkdir(parents=True)
    other.write_bytes(b"z" * 5000)
    store.reserve(POLICE, DIGEST)
    with pytest.raises(ExchangeError) as caught:
        store.begin_upload(POLICE, DIGEST, 0, len(DATA), owned=False, max_partial_bytes=10_000)
    assert caught.value.reason is Reason.TOO_LARGE
    assert "holds 5000 bytes of other unfinished uploads" in caught.value.message
    assert not store.uploading
    # Another sender's unfinished uploads do not count against the police.
    store.reserve(ECOLOGY, DIGEST)
    store.begin_upload(ECOLOGY, DIGEST, 0, len(DATA), owned=False, max_partial_bytes=10_000).abort()


def test_unfinished_uploads_expire_unless_a_stream_is_open(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    upload(store, POLICE, DATA[:100])
    upload(store, ECOLOGY, DATA[:100])
    old = time.time() - 3600
    for sender in (POLICE, ECOLOGY):
        os.utime(store.partial_path(sender, DIGEST), (old, old))
    store.reserve(ECOLOGY, DIGEST)  # ecology is uploading right now
    assert store.expire_partials(ttl_seconds=600) == 1
    assert store.held_by(POLICE, DIGEST) == 0
    assert store.held_by(ECOLOGY, DIGEST) == 100
    assert store.expire_partials(ttl_seconds=7200) == 0


def test_cancelled_file_work_is_waited_out_and_undone() -> None:
    """The caller is cancelled while the thread works: the work finishes, its result is
    undone (the reservation released), and only then does the cancellation go on."""
    started, release = threading.Event(), threading.Event()
    undone: list[str] = []

    def work() -> str:
        started.set()
        release.wait(10)
        return "opened"

    async def scenario() -> None:
        task = asyncio.create_task(_to_thread_to_the_end(work, on_cancel=undone.append))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # still waiting for the thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert undone == ["opened"]

    asyncio.run(scenario())
