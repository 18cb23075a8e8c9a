"""The Exchange service: what peers call, over mutual TLS."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from node._pb.liandong.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc
from node.exchange.attachments import CHUNK_SIZE, BlobStore
from node.exchange.errors import ExchangeError, Reason
from node.exchange.inbound import PeerIdentity, Receiver
from node.pki import SetupError, agency_from_certificate, certificate_fingerprint
from node.services.status import STATUS_FOR_REASON, domain_errors, item_status
from node.services.streams import answer_concurrently

UNKNOWN_PEER = PeerIdentity("unknown", "")


def peer_identity(context: grpc.aio.ServicerContext) -> PeerIdentity:
    """The agency the verified TLS client certificate names."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    if not pem:
        raise ExchangeError(
            Reason.UNAUTHENTICATED, "no client certificate: peers must connect with mutual TLS"
        )
    return _identity_from_pem(pem[0])


@functools.lru_cache(maxsize=256)
def _identity_from_pem(pem: bytes) -> PeerIdentity:
    # Parsing the certificate on every call is measurable; a peer keeps one certificate.
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        agency = agency_from_certificate(certificate)
    except SetupError as error:
        raise ExchangeError(Reason.UNAUTHENTICATED, str(error)) from None
    der = certificate.public_bytes(Encoding.DER)
    return PeerIdentity(agency, certificate_fingerprint(der))


class ExchangeServicer(exchange_pb2_grpc.ExchangeServicer):
    def __init__(self, receiver: Receiver, blobs: BlobStore) -> None:
        self.receiver = receiver
        self.blobs = blobs
        # Set when the node stops: open Deliver streams finish what they hold and end.
        self.draining = asyncio.Event()

    async def _receive(
        self, request: envelope_pb2.Envelope, context: grpc.aio.ServicerContext, family: str
    ) -> exchange_pb2.DeliveryReceipt:
        async with domain_errors(context, family):
            peer = await self._peer(request, context)
            accepted = await self.receiver.receive(request, peer, family)
            return exchange_pb2.DeliveryReceipt(
                receipt=accepted.receipt, receiver_proof=accepted.proof
            )
        raise AssertionError("unreachable")  # domain_errors aborts

    async def _peer(
        self, envelope: envelope_pb2.Envelope, context: grpc.aio.ServicerContext
    ) -> PeerIdentity:
        try:
            return peer_identity(context)
        except ExchangeError as error:
            await self.receiver.record_rejection(envelope, UNKNOWN_PEER, error)
            raise

    async def TransferClue(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, context, "clue")

    async def TransferCrime(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, context, "crime_transfer")

    async def SendNotice(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, context, "notice")

    async def RequestEvidence(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, context, "evidence_request")

    async def IssueRecommendation(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, context, "recommendation")

    async def Reply(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, context, "reply")

    async def Deliver(
        self,
        request_iterator: AsyncIterator[exchange_pb2.DeliveryBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[exchange_pb2.DeliveryResults]:
        """Batches of messages on one stream; each batch answered whole, in completion order."""
        try:
            peer = await self._peer(envelope_pb2.Envelope(), context)  # audited like the others
        except ExchangeError as error:
            await context.abort(STATUS_FOR_REASON[error.reason], error.message)
            return

        async def receive_batch(batch: exchange_pb2.DeliveryBatch) -> exchange_pb2.DeliveryResults:
            requests = batch.requests
            try:
                outcomes = await self.receiver.receive_many([r.envelope for r in requests], peer)
            except Exception as error:  # e.g. the node is stopping: every request gets it
                outcomes = [error] * len(requests)
            results = exchange_pb2.DeliveryResults()
            for request, outcome in zip(requests, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    code, message = item_status(outcome, "Deliver")
                    results.results.add(seq=request.seq, code=code, message=message)
                else:
                    results.results.add(
                        seq=request.seq, receipt=outcome.receipt, receiver_proof=outcome.proof
                    )
            return results

        async for results in answer_concurrently(request_iterator, receive_batch, self.draining):
            yield results

    async def QueryAttachment(
        self, request: exchange_pb2.AttachmentQuery, context: grpc.aio.ServicerContext
    ) -> exchange_pb2.AttachmentStatus:
        async with domain_errors(context, "QueryAttachment"):
            peer = await self._peer(request.envelope, context)
            held, complete = await self.receiver.attachment_status(
                request.envelope, request.sha256, peer
            )
            return exchange_pb2.AttachmentStatus(
                sha256=request.sha256, received=held, complete=complete
            )
        raise AssertionError("unreachable")

    async def UploadAttachment(
        self,
        request_iterator: AsyncIterator[exchange_pb2.AttachmentChunk],
        context: grpc.aio.ServicerContext,
    ) -> exchange_pb2.AttachmentStatus:
        async with domain_errors(context, "UploadAttachment"):
            first = await anext(aiter(request_iterator), None)
            if first is None:
                raise ExchangeError(
                    Reason.INVALID, "empty upload: the first chunk must carry the envelope"
                )
            peer = await self._peer(first.envelope, context)

            async def data() -> AsyncIterator[bytes]:
                yield first.data
                async for chunk in request_iterator:
                    yield chunk.data

            held, complete = await self.receiver.accept_upload(
                first.envelope, first.sha256, first.offset, data(), peer
            )
            return exchange_pb2.AttachmentStatus(
                sha256=first.sha256, received=held, complete=complete
            )
        raise AssertionError("unreachable")

    async def DownloadAttachment(
        self, request: exchange_pb2.AttachmentQuery, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[exchange_pb2.AttachmentChunk]:
        async with domain_errors(context, "DownloadAttachment"):
            peer = await self._peer(request.envelope, context)
            await self.receiver.authorize_download(request.envelope, request.sha256, peer)
            with self.blobs.open(request.sha256.hex()) as source:
                offset = 0
                while data := source.read(CHUNK_SIZE):
                    yield exchange_pb2.AttachmentChunk(
                        sha256=request.sha256, offset=offset, data=data
                    )
                    offset += len(data)
