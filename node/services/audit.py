"""The Audit service: members read this node's audit log over mutual TLS; each call is logged."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc

from node._pb.liandong.v1 import audit_pb2, audit_pb2_grpc
from node.audit.service import AuditLog, SignedCheckpoint
from node.exchange.errors import ExchangeError, shown
from node.services.gate import current_peer

T = TypeVar("T")


def checkpoint_message(checkpoint: SignedCheckpoint) -> audit_pb2.SignedCheckpoint:
    return audit_pb2.SignedCheckpoint(
        size=checkpoint.size, root=checkpoint.root, note=checkpoint.note
    )


def inclusion_message(
    log: AuditLog, request: audit_pb2.InclusionProofRequest, reader: str | None
) -> audit_pb2.InclusionProof:
    """`reader`: the member asking, who sees the entry only where it may (AuditLog); None for
    the node's own operator (the local admin API)."""
    which = request.WhichOneof("leaf")
    proof = log.prove_inclusion(
        reader=reader,
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
    """Thin: the gate (node.services.gate) has admitted the caller as a member; each method
    answers off the event loop and writes one `audit_query` entry for the call, naming the
    question and, for a refusal, why (docs/protocol.md 12.2)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    async def _logged(self, what: str, answer: Callable[[], T]) -> T:
        peer = current_peer().agency_id
        try:
            result = await asyncio.to_thread(answer)
        except ExchangeError as error:
            await self.log.record_refused_query(peer, what, error)
            raise
        await self.log.record_query(peer, what)
        return result

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.SignedCheckpoint:
        found = await self._logged(
            f"GetCheckpoint size={request.size or 'latest'}",
            lambda: self.log.checkpoint(request.size),
        )
        return checkpoint_message(found)

    async def GetInclusionProof(
        self, request: audit_pb2.InclusionProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.InclusionProof:
        which = request.WhichOneof("leaf")
        leaf = shown(request.message_id, 64) if which == "message_id" else request.index
        reader = current_peer().agency_id
        return await self._logged(
            f"GetInclusionProof {which}={leaf} size={request.size or 'latest'}",
            lambda: inclusion_message(self.log, request, reader),
        )

    async def GetConsistencyProof(
        self, request: audit_pb2.ConsistencyProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ConsistencyProof:
        hashes = await self._logged(
            f"GetConsistencyProof {request.old_size}->{request.new_size}",
            lambda: self.log.prove_consistency(request.old_size, request.new_size),
        )
        return audit_pb2.ConsistencyProof(
            old_size=request.old_size, new_size=request.new_size, hashes=hashes
        )

    async def AddCosignature(
        self, request: audit_pb2.AddCosignatureRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AddCosignatureResponse:
        witness = current_peer().agency_id
        line = await self._logged(
            f"AddCosignature size={request.size}",
            lambda: self.log.check_cosignature(witness, request.size, request.signature_line),
        )
        await self.log.store_cosignature(witness, request.size, line)
        return audit_pb2.AddCosignatureResponse()

    async def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AuditEntries:
        reader = current_peer().agency_id
        entries = await self._logged(
            f"GetEntries start={request.start} limit={request.limit}",
            lambda: self.log.entries(request.start, request.limit or 100, reader=reader),
        )
        return audit_pb2.AuditEntries(start=request.start, entries=entries)
