"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import structlog

from node.exchange.errors import ExchangeError, Reason
from node.store.writer import WriterStopped

log = structlog.get_logger(__name__)

STATUS_FOR_REASON: dict[Reason, grpc.StatusCode] = {
    Reason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    Reason.INTERNAL: grpc.StatusCode.INTERNAL,
}


def as_refusal(error: BaseException, rpc: str) -> ExchangeError:
    """Whatever failed below an edge, as the refusal the caller gets: a refusal as it is, a
    stopping writer as UNAVAILABLE, a generated servicer's unimplemented method as
    UNIMPLEMENTED, anything else (a bug) logged with its traceback and INTERNAL."""
    if isinstance(error, ExchangeError):
        return error
    if isinstance(error, WriterStopped):
        refusal = ExchangeError(Reason.UNAVAILABLE, str(error))
        refusal.audited = True  # the node is stopping: nothing can be written now
        return refusal
    if isinstance(error, NotImplementedError):
        return ExchangeError(Reason.UNIMPLEMENTED, f"{rpc} is not implemented here")
    log.error("internal error", rpc=rpc, exc_info=error)
    return ExchangeError(Reason.INTERNAL, f"internal error in {rpc}; see the node's log")


@asynccontextmanager
async def domain_errors(context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[None]:
    """Abort the call with the mapped status; never let an exception take the node down.
    (The local admin API's; the peer port's calls pass node.services.gate, which also
    audits.)"""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as error:
        refusal = as_refusal(error, rpc)
        if isinstance(error, ExchangeError):
            log.info("refused", rpc=rpc, reason=error.reason.value, error=error.message)
        await context.abort(STATUS_FOR_REASON[refusal.reason], refusal.message)


def item_status(error: Exception, rpc: str) -> tuple[int, str]:
    """(grpc status code number, message) for one item of a stream that failed."""
    refusal = as_refusal(error, rpc)
    return STATUS_FOR_REASON[refusal.reason].value[0], refusal.message
