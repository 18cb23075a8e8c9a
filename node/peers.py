"""The gRPC client side: delivering to peers over mutual TLS (implements PeerTransport), and
reading their Audit service as a witness (implements node.audit.witness.PeerAudit)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import BinaryIO

import grpc

from node._pb.liandong.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    envelope_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
)
from node.exchange.attachments import CHUNK_SIZE
from node.exchange.delivery import Answer, TransportError
from node.exchange.errors import shown
from node.federation import Member

RPC_FOR_FAMILY = {
    "clue": "TransferClue",
    "crime_transfer": "TransferCrime",
    "notice": "SendNotice",
    "evidence_request": "RequestEvidence",
    "recommendation": "IssueRecommendation",
    "reply": "Reply",
}

# A Deliver stream unused this long is closed, and a new one opened when there is something
# to send: well before a receiver ends it as idle ([limits] stream_idle_seconds, 600 s by
# default), so a batch is never sent on a stream the receiver is about to end.
STREAM_REUSE_SECONDS = 300.0

MAX_ANSWER_BYTES = 16 * 1024 * 1024

CHANNEL_OPTIONS = [
    # The receiver enforces the size limits, with a precise refusal; the client does not.
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    # What a peer answers is small (a batch's receipts and proofs: a few hundred KiB): a
    # hostile receiver's 256 MiB "receipt" is cut off by gRPC, not read and hashed.
    ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    # Reconnect quickly when a peer comes back: the outbox is waiting.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


class DeliveryStream:
    """One long-lived Deliver stream to a peer; many batches in flight, matched by seq."""

    def __init__(self, stub: exchange_pb2_grpc.ExchangeStub, member: Member) -> None:
        self.member = member
        self.broken: TransportError | None = None
        self.unimplemented = False
        self._requests: asyncio.Queue[exchange_pb2.DeliveryBatch | None] = asyncio.Queue()
        # Keyed by the first seq of each batch: a batch's seqs are consecutive.
        self._pending: dict[int, asyncio.Future[exchange_pb2.DeliveryResults]] = {}
        self._seq = itertools.count(1)
        self._call = stub.Deliver(self._outgoing())
        self._reader = asyncio.create_task(self._read())
        self.last_used = asyncio.get_running_loop().time()

    @property
    def stale(self) -> bool:
        """Broken, or unused long enough that the receiver may be about to end it."""
        idle = asyncio.get_running_loop().time() - self.last_used
        return self.broken is not None or (not self._pending and idle > STREAM_REUSE_SECONDS)

    async def _outgoing(self) -> AsyncIterator[exchange_pb2.DeliveryBatch]:
        while (batch := await self._requests.get()) is not None:
            yield batch

    async def _read(self) -> None:
        try:
            async for answer in self._call:
                if not answer.results:
                    continue
                future = self._pending.pop(min(r.seq for r in answer.results), None)
                if future is not None and not future.done():
                    future.set_result(answer)
            error = TransportError(f"{self.member.agency_id}: the peer closed the delivery stream")
        except grpc.aio.AioRpcError as rpc_error:
            self.unimplemented = rpc_error.code() == grpc.StatusCode.UNIMPLEMENTED
            error = TransportError(_describe(self.member, rpc_error))
        except asyncio.CancelledError:
            error = TransportError(f"{self.member.agency_id}: delivery stream closed")
        self.broken = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    async def send(
        self, envelopes: Sequence[envelope_pb2.Envelope], timeout: float
    ) -> list[Answer | TransportError]:
        """Send one batch; per envelope, the receipt (and proof) or the peer's refusal."""
        if self.broken is not None:
            raise self.broken
        self.last_used = asyncio.get_running_loop().time()
        batch = exchange_pb2.DeliveryBatch()
        seqs = [next(self._seq) for _ in envelopes]
        for seq, envelope in zip(seqs, envelopes, strict=True):
            batch.requests.add(seq=seq, envelope=envelope)
        future: asyncio.Future[exchange_pb2.DeliveryResults] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[seqs[0]] = future
        self._requests.put_nowait(batch)
        try:
            answer = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TransportError(
                f"{self.member.agency_id}: no answer within {timeout:g} s on the delivery stream"
            ) from None
        finally:
            self._pending.pop(seqs[0], None)
        by_seq = {result.seq: result for result in answer.results}
        return [self._outcome(by_seq.get(seq)) for seq in seqs]

    def _outcome(self, result: exchange_pb2.DeliveryResult | None) -> Answer | TransportError:
        if result is None:
            return TransportError(f"{self.member.agency_id}: no result for this message")
        if result.code != grpc.StatusCode.OK.value[0]:
            name = next((c.name for c in grpc.StatusCode if c.value[0] == result.code), "UNKNOWN")
            return TransportError(
                f"{self.member.agency_id} at {self.member.endpoint}: {name}: "
                f"{shown(result.message)}"
            )
        return Answer(result.receipt, result.receiver_proof)

    async def close(self) -> None:
        self._requests.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class GrpcPeerTransport:
    def __init__(self, ca_pem: bytes, key_pem: bytes, cert_pem: bytes, timeout: float) -> None:
        self.credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, DeliveryStream] = {}
        # Peers that answered UNIMPLEMENTED to Deliver get one unary call per message.
        self._unary_only: set[str] = set()

    def _channel(self, member: Member) -> grpc.aio.Channel:
        channel = self._channels.get(member.endpoint)
        if channel is None:
            channel = grpc.aio.secure_channel(member.endpoint, self.credentials, CHANNEL_OPTIONS)
            self._channels[member.endpoint] = channel
        return channel

    def _stub(self, member: Member) -> exchange_pb2_grpc.ExchangeStub:
        return exchange_pb2_grpc.ExchangeStub(self._channel(member))

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def deliver_many(
        self, member: Member, items: Sequence[tuple[str, envelope_pb2.Envelope]]
    ) -> list[Answer | TransportError]:
        if not items:
            return []
        if member.endpoint not in self._unary_only:
            stream = self._streams.get(member.endpoint)
            if stream is None or stream.stale:
                if stream is not None:
                    await stream.close()
                stream = DeliveryStream(self._stub(member), member)
                self._streams[member.endpoint] = stream
            try:
                return await stream.send([envelope for _, envelope in items], self.timeout)
            except TransportError as error:
                if not stream.unimplemented:
                    return [error] * len(items)
                self._unary_only.add(member.endpoint)
        answers = await asyncio.gather(
            *(self.deliver_unary(member, family, envelope) for family, envelope in items),
            return_exceptions=True,
        )
        return [
            answer
            if isinstance(answer, Answer | TransportError)
            else TransportError(f"{member.agency_id}: {answer!r}")
            for answer in answers
        ]

    async def deliver_unary(
        self, member: Member, family: str, envelope: envelope_pb2.Envelope
    ) -> Answer:
        method = getattr(self._stub(member), RPC_FOR_FAMILY[family])
        try:
            answer: exchange_pb2.DeliveryReceipt = await method(envelope, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise TransportError(_describe(member, error)) from None
        return Answer(answer.receipt, answer.receiver_proof)

    # -- the peer's Audit service (node.audit.witness.PeerAudit) ----------------------------

    async def fetch_checkpoint(self, member: Member) -> bytes:
        stub = audit_pb2_grpc.AuditStub(self._channel(member))
        try:
            answer = await stub.GetCheckpoint(
                audit_pb2.GetCheckpointRequest(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise TransportError(_describe(member, error)) from None
        return bytes(answer.note)

    async def fetch_consistency(self, member: Member, old_size: int, new_size: int) -> list[bytes]:
        stub = audit_pb2_grpc.AuditStub(self._channel(member))
        request = audit_pb2.ConsistencyProofRequest(old_size=old_size, new_size=new_size)
        try:
            answer = await stub.GetConsistencyProof(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise TransportError(_describe(member, error)) from None
        return list(answer.hashes)

    async def send_cosignature(self, member: Member, size: int, line: bytes) -> None:
        stub = audit_pb2_grpc.AuditStub(self._channel(member))
        request = audit_pb2.AddCosignatureRequest(size=size, signature_line=line)
        try:
            await stub.AddCosignature(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise TransportError(_describe(member, error)) from None

    async def attachment_held(
        self, member: Member, envelope: envelope_pb2.Envelope, sha256: bytes
    ) -> tuple[int, bool]:
        """The peer's QueryAttachment answer: (bytes it says it holds, complete). Its word
        only: the caller checks it against the file before resuming from it."""
        query = exchange_pb2.AttachmentQuery(envelope=envelope, sha256=sha256)
        try:
            status = await self._stub(member).QueryAttachment(query, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise TransportError(_describe(member, error)) from None
        return status.received, status.complete

    async def upload(
        self,
        member: Member,
        envelope: envelope_pb2.Envelope,
        sha256: bytes,
        offset: int,
        source: BinaryIO,
    ) -> bool:
        """Send `source` from byte `offset` to its end; True when the peer says the file is
        complete. No overall deadline (a large file may take long), but the upload is given up
        when the peer takes no data for the RPC timeout, or gives no answer that long after the
        last chunk (plus time to re-read, or sync, the bytes it holds at 20 MiB/s): a receiver
        that stalls must not hold a delivery slot for ever. It keeps what arrived, and the next
        attempt resumes from there."""
        disk_rate = 20 * 1024 * 1024  # bytes/s a receiver is given to re-hash or sync its copy
        loop = asyncio.get_running_loop()
        # The first chunk waits while the receiver re-hashes the `offset` bytes it holds.
        deadline = loop.time() + self.timeout + offset / disk_rate
        source.seek(offset)  # exactly the bytes from `offset` on, whatever was read before

        async def chunks() -> AsyncIterator[exchange_pb2.AttachmentChunk]:
            nonlocal deadline
            sent = 0
            data = source.read(CHUNK_SIZE)
            yield exchange_pb2.AttachmentChunk(
                envelope=envelope, sha256=sha256, offset=offset, data=data
            )
            while True:
                sent += len(data)
                deadline = loop.time() + self.timeout  # the chunk before was taken
                if not (data := source.read(CHUNK_SIZE)):
                    break
                yield exchange_pb2.AttachmentChunk(data=data)
            deadline += sent / disk_rate  # the receiver syncs what came

        call = self._stub(member).UploadAttachment(chunks())
        answer: asyncio.Future[exchange_pb2.AttachmentStatus] = asyncio.ensure_future(call)
        try:
            while not answer.done():
                if loop.time() >= deadline:
                    raise TransportError(
                        f"{member.agency_id} at {member.endpoint}: the upload of attachment "
                        f"{sha256.hex()[:16]}… made no progress for {self.timeout:g} s; given "
                        "up, to resume at the next attempt"
                    )
                await asyncio.wait({answer}, timeout=deadline - loop.time())
            status = answer.result()
        except grpc.aio.AioRpcError as error:
            raise TransportError(_describe(member, error)) from None
        finally:
            if not answer.done():
                call.cancel()
                answer.cancel()
        return bool(status.complete)


def _describe(member: Member, error: grpc.aio.AioRpcError) -> str:
    # The peer's own words, quoted and cut: a hostile peer's 3 MiB status message must not
    # reach the log and the outbox's last_error whole.
    details = shown(error.details() or "")
    return f"{member.agency_id} at {member.endpoint}: {error.code().name}: {details}"
