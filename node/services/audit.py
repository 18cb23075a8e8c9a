"""The Audit service: members read this node's audit log over mutual TLS; each call is logged."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc

from node._pb.liandong.v1 import audit_pb2, audit_pb2_grpc
from node.audit.service import AuditLog, SignedCheckpoint
from node.exchange.errors import ExchangeError
from node.exchange.inbound import PeerIdentity
from node.services.exchange import peer_identity
from node.services.status import domain_errors

T = TypeVar("T")


def checkpoint_message(checkpoint: SignedCheckpoint) -> audit_pb2.SignedCheckpoint:
    return audit_pb2.SignedCheckpoint(
        size=checkpoint.size, root=checkpoint.root, note=checkpoint.note
    )


def inclusion_message(
    log: AuditLog, request: audit_pb2.InclusionProofRequest
) -> audit_pb2.InclusionProof:
    which = request.WhichOneof("leaf")
    proof = log.prove_inclusion(
        index=request.index if which == "index" else None,
        message_id=request.message_id if which == "message_id" else "",
        size=request.size,
    )
    return audit_pb2.InclusionProof(
        index=proof.index,
        size=proof.size,
        hashes=list(proof.hashes),
        entry=proof.entry or b"",
        tlog_proof=proof.text(),
    )


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(self, log: AuditLog) -> None:
        self.log = log

    async def _member(self, context: grpc.aio.ServicerContext, what: str) -> PeerIdentity:
        """The calling member, or (logged) refusal; the call itself is logged too."""
        peer = "unknown"
        try:
            identity = peer_identity(context)
            peer = identity.agency_id
            self.log.authorize(identity.agency_id, identity.certificate_sha256)
        except ExchangeError as error:
            await self.log.record_query(peer, f"{what} refused: {error.message}")
            raise
        await self.log.record_query(peer, what)
        return identity

    async def _answer(
        self, context: grpc.aio.ServicerContext, what: str, read: Callable[[], T]
    ) -> T:
        """Check the caller is a member, log the call (refused or not), then read."""
        await self._member(context, what)
        return await asyncio.to_thread(read)

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.SignedCheckpoint:
        async with domain_errors(context, "GetCheckpoint"):
            found = await self._answer(
                context,
                f"GetCheckpoint size={request.size or 'latest'}",
                lambda: self.log.checkpoint(request.size),
            )
            return checkpoint_message(found)
        raise AssertionError("unreachable")

    async def GetInclusionProof(
        self, request: audit_pb2.InclusionProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.InclusionProof:
        async with domain_errors(context, "GetInclusionProof"):
            which = request.WhichOneof("leaf")
            leaf = request.message_id if which == "message_id" else request.index
            return await self._answer(
                context,
                f"GetInclusionProof {which}={leaf} size={request.size or 'latest'}",
                lambda: inclusion_message(self.log, request),
            )
        raise AssertionError("unreachable")

    async def GetConsistencyProof(
        self, request: audit_pb2.ConsistencyProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ConsistencyProof:
        async with domain_errors(context, "GetConsistencyProof"):
            hashes = await self._answer(
                context,
                f"GetConsistencyProof {request.old_size}->{request.new_size}",
                lambda: self.log.prove_consistency(request.old_size, request.new_size),
            )
            return audit_pb2.ConsistencyProof(
                old_size=request.old_size, new_size=request.new_size, hashes=hashes
            )
        raise AssertionError("unreachable")

    async def AddCosignature(
        self, request: audit_pb2.AddCosignatureRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AddCosignatureResponse:
        async with domain_errors(context, "AddCosignature"):
            identity = await self._member(context, f"AddCosignature size={request.size}")
            try:
                await self.log.add_cosignature(
                    identity.agency_id, request.size, request.signature_line
                )
            except ExchangeError as error:
                await self.log.record_query(
                    identity.agency_id,
                    f"AddCosignature size={request.size} refused: {error.message}",
                )
                raise
            return audit_pb2.AddCosignatureResponse()
        raise AssertionError("unreachable")

    async def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AuditEntries:
        async with domain_errors(context, "GetEntries"):
            entries = await self._answer(
                context,
                f"GetEntries start={request.start} limit={request.limit}",
                lambda: self.log.entries(request.start, request.limit or 100),
            )
            return audit_pb2.AuditEntries(start=request.start, entries=entries)
        raise AssertionError("unreachable")
