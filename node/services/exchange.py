"""The Exchange service: what peers call, over mutual TLS.

Thin: the gate (node.services.gate) has already established the caller, held its share of
calls, parsed the request and will map any refusal to its status; each method hands the
request to the Receiver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from node._pb.liandong.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc
from node.exchange.attachments import CHUNK_SIZE, BlobStore
from node.exchange.errors import ExchangeError, Reason
from node.exchange.inbound import MAX_BATCH, Receiver, batch_too_large
from node.services.gate import Undecodable, current_peer
from node.services.status import item_status
from node.services.streams import answer_concurrently


class ExchangeServicer(exchange_pb2_grpc.ExchangeServicer):
    def __init__(self, receiver: Receiver, blobs: BlobStore) -> None:
        self.receiver = receiver
        self.blobs = blobs
        # Set when the node stops: open Deliver streams finish what they hold and end.
        self.draining = asyncio.Event()

    async def _receive(
        self, request: envelope_pb2.Envelope, family: str
    ) -> exchange_pb2.DeliveryReceipt:
        accepted = await self.receiver.receive(request, current_peer(), family)
        return exchange_pb2.DeliveryReceipt(receipt=accepted.receipt, receiver_proof=accepted.proof)

    async def TransferClue(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, "clue")

    async def TransferCrime(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, "crime_transfer")

    async def SendNotice(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, "notice")

    async def RequestEvidence(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, "evidence_request")

    async def IssueRecommendation(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, "recommendation")

    async def Reply(self, request, context):  # type: ignore[no-untyped-def]
        return await self._receive(request, "reply")

    async def Deliver(
        self,
        request_iterator: AsyncIterator[exchange_pb2.DeliveryBatch | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[exchange_pb2.DeliveryResults]:
        """Batches of messages on one stream; each batch answered whole, in completion order.

        A batch refused whole — it does not parse, or holds more than MAX_BATCH requests —
        gets one result with seq 0 (never a sender's seq) carrying the refusal, and the stream
        goes on. The count is checked before any request is touched: 4 million empty requests
        fit in one gRPC message.
        """
        peer = current_peer()

        async def refuse_batch(refusal: ExchangeError) -> exchange_pb2.DeliveryResults:
            try:
                await self.receiver.record_rejections([(None, refusal)], peer)
            except Exception as error:  # the node is stopping: the answer still goes
                refusal = ExchangeError(Reason.UNAVAILABLE, str(error))
            code, message = item_status(refusal, "Deliver")
            return exchange_pb2.DeliveryResults(
                results=[exchange_pb2.DeliveryResult(seq=0, code=code, message=message)]
            )

        async def receive_batch(
            batch: exchange_pb2.DeliveryBatch | Undecodable,
        ) -> exchange_pb2.DeliveryResults:
            if isinstance(batch, Undecodable):
                return await refuse_batch(batch.refusal())
            if len(batch.requests) > MAX_BATCH:
                return await refuse_batch(batch_too_large(len(batch.requests)))
            results = exchange_pb2.DeliveryResults()
            requests = batch.requests
            try:
                outcomes = await self.receiver.receive_many([r.envelope for r in requests], peer)
            except Exception as error:  # e.g. the node is stopping: every request gets it
                outcomes = [error] * len(requests)
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
        held, complete = await self.receiver.attachment_status(
            request.envelope, request.sha256, current_peer()
        )
        return exchange_pb2.AttachmentStatus(
            sha256=request.sha256, received=held, complete=complete
        )

    async def UploadAttachment(
        self,
        request_iterator: AsyncIterator[exchange_pb2.AttachmentChunk],
        context: grpc.aio.ServicerContext,
    ) -> exchange_pb2.AttachmentStatus:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise ExchangeError(
                Reason.INVALID, "empty upload: the first chunk must carry the envelope"
            )

        async def data() -> AsyncIterator[bytes]:
            yield first.data
            async for chunk in request_iterator:
                yield chunk.data

        held, complete = await self.receiver.accept_upload(
            first.envelope, first.sha256, first.offset, data(), current_peer()
        )
        return exchange_pb2.AttachmentStatus(sha256=first.sha256, received=held, complete=complete)

    async def DownloadAttachment(
        self, request: exchange_pb2.AttachmentQuery, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[exchange_pb2.AttachmentChunk]:
        await self.receiver.authorize_download(request.envelope, request.sha256, current_peer())
        with self.blobs.open(request.sha256.hex()) as source:
            offset = 0
            while data := await asyncio.to_thread(source.read, CHUNK_SIZE):
                yield exchange_pb2.AttachmentChunk(sha256=request.sha256, offset=offset, data=data)
                offset += len(data)
