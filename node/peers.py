"""The gRPC client side: delivering to peers over mutual TLS (implements PeerTransport)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import BinaryIO

import grpc

from node._pb.liandong.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc
from node.exchange.attachments import CHUNK_SIZE
from node.exchange.delivery import TransportError
from node.federation import Member

RPC_FOR_FAMILY = {
    "clue": "TransferClue",
    "crime_transfer": "TransferCrime",
    "notice": "SendNotice",
    "evidence_request": "RequestEvidence",
    "recommendation": "IssueRecommendation",
    "reply": "Reply",
}

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    # Reconnect quickly when a peer comes back: the outbox is waiting.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


class GrpcPeerTransport:
    def __init__(self, ca_pem: bytes, key_pem: bytes, cert_pem: bytes, timeout: float) -> None:
        self.credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, member: Member) -> exchange_pb2_grpc.ExchangeStub:
        channel = self._channels.get(member.endpoint)
        if channel is None:
            channel = grpc.aio.secure_channel(member.endpoint, self.credentials, CHANNEL_OPTIONS)
            self._channels[member.endpoint] = channel
        return exchange_pb2_grpc.ExchangeStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def deliver(
        self, member: Member, family: str, envelope: envelope_pb2.Envelope
    ) -> envelope_pb2.Envelope:
        method = getattr(self._stub(member), RPC_FOR_FAMILY[family])
        try:
            answer: exchange_pb2.DeliveryReceipt = await method(envelope, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise TransportError(_describe(member, error)) from None
        return answer.receipt

    async def attachment_held(
        self, member: Member, envelope: envelope_pb2.Envelope, sha256: bytes
    ) -> tuple[int, bool]:
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
        async def chunks() -> AsyncIterator[exchange_pb2.AttachmentChunk]:
            yield exchange_pb2.AttachmentChunk(
                envelope=envelope, sha256=sha256, offset=offset, data=source.read(CHUNK_SIZE)
            )
            while data := source.read(CHUNK_SIZE):
                yield exchange_pb2.AttachmentChunk(data=data)

        try:
            # No overall deadline: a large file may take long; progress is kept for resume.
            status = await self._stub(member).UploadAttachment(chunks())
        except grpc.aio.AioRpcError as error:
            raise TransportError(_describe(member, error)) from None
        return bool(status.complete)


def _describe(member: Member, error: grpc.aio.AioRpcError) -> str:
    return f"{member.agency_id} at {member.endpoint}: {error.code().name}: {error.details()}"
