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
}


@asynccontextmanager
async def domain_errors(context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[None]:
    """Abort the call with the mapped status; never let an exception take the node down."""
    try:
        yield
    except ExchangeError as error:
        log.info("refused", rpc=rpc, reason=error.reason.value, error=error.message)
        await context.abort(STATUS_FOR_REASON[error.reason], error.message)
    except WriterStopped as error:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("internal error", rpc=rpc)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error in {rpc}; see the node's log"
        )


def item_status(error: Exception, rpc: str) -> tuple[int, str]:
    """(grpc status code number, message) for one item of a stream that failed."""
    if isinstance(error, ExchangeError):
        return STATUS_FOR_REASON[error.reason].value[0], error.message
    if isinstance(error, WriterStopped):
        return grpc.StatusCode.UNAVAILABLE.value[0], str(error)
    log.error("internal error", rpc=rpc, error=repr(error))
    return grpc.StatusCode.INTERNAL.value[0], f"internal error in {rpc}; see the node's log"
