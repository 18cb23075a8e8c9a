"""The peer port's gate: every call from the network passes here before a servicer sees it.

In one place, for every service on the peer port (Exchange, Audit, health, reflection):

* **who is calling** — the agency the verified TLS client certificate names, checked against
  the registry *before anything of the request is read*: a non-member's call is refused at
  once instead of holding a slot while it waits for a first message;
* **how much one caller may hold** — concurrent calls and streams per member, and health
  and reflection in a share of their own (non-members share one small share), so one member
  cannot starve the others or the health checks; beyond a share a call is refused at once
  with RESOURCE_EXHAUSTED, never queued;
* **how long a call may wait for its caller** — the first request within
  `[limits] first_message_seconds`; a stream whose caller sends nothing for
  `[limits] stream_idle_seconds` is ended like a stream the caller closed;
* **what does not parse** — a request that is not the RPC's protobuf message is refused with
  INVALID_ARGUMENT (never gRPC's own UNKNOWN "Unexpected DecodeError"), except on `Deliver`,
  where one undecodable batch gets an error answer and the stream goes on;
* **how refusals leave** — an ExchangeError from anywhere below becomes its gRPC status
  (node.services.status), is written to the audit log unless it already was, and is logged
  once; anything else is logged with its traceback and answered INTERNAL.

To act before a request is read, the gate serves every method as a client stream (unary and
streaming requests look the same on the wire) and reads a unary method's one request itself.
The caller's identity reaches the servicers through `current_peer()`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from cryptography import x509

from node.config import Limits
from node.exchange.errors import ExchangeError, Reason, shown
from node.exchange.inbound import PeerIdentity
from node.pki import agency_from_certificate, certificate_fingerprint
from node.services.status import STATUS_FOR_REASON, as_refusal

log = structlog.get_logger(__name__)

UNKNOWN = "unknown"  # the peer an audit entry names when the certificate names no agency

_current_peer: ContextVar[PeerIdentity] = ContextVar("liandong_peer")


def current_peer() -> PeerIdentity:
    """The caller of the RPC being served, as the gate established it."""
    return _current_peer.get()


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not the RPC's message (what the lenient parser returns)."""

    message_type: str
    size: int

    def refusal(self) -> ExchangeError:
        return ExchangeError(
            Reason.INVALID,
            f"the request ({self.size} bytes) is not a valid {self.message_type} message; "
            "check that the client sends this RPC's protobuf message",
        )


def _lenient(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """The handler's parser, returning Undecodable instead of raising."""
    owner = getattr(parse, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = str(descriptor.full_name) if descriptor is not None else "request"

    def lenient(data: bytes) -> Any:
        if parse is None:
            return data
        try:
            return parse(data)
        except Exception:  # any parser failure is the caller's malformed request
            return Undecodable(name, len(data))

    return lenient


@functools.lru_cache(maxsize=256)
def _identity_from_pem(pem: bytes) -> tuple[PeerIdentity, str]:
    """(the caller, why it names no agency or ""); parsing per call is measurable."""
    try:
        fingerprint = certificate_fingerprint(ssl.PEM_cert_to_DER_cert(pem.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return PeerIdentity(UNKNOWN, ""), "the client certificate could not be read"
    try:
        agency = agency_from_certificate(x509.load_pem_x509_certificate(pem))
    except Exception as error:  # a CA-issued certificate with a malformed SAN, say
        return PeerIdentity(UNKNOWN, fingerprint), (
            f"client certificate sha256 {fingerprint[:16]}… names no agency: {error}"
        )
    return PeerIdentity(agency, fingerprint), ""


def identify(context: grpc.aio.ServicerContext) -> tuple[PeerIdentity, str]:
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    if not pem:
        return PeerIdentity(UNKNOWN, ""), "no client certificate: peers must use mutual TLS"
    return _identity_from_pem(pem[0])


class _Shares:
    """Calls each caller has open, per kind; a call beyond its limit is refused, not queued."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], int] = {}

    @contextmanager
    def hold(self, holder: str, kinds: list[tuple[str, int]]) -> Iterator[None]:
        for kind, limit in kinds:
            if self._open.get((holder, kind), 0) >= limit:
                raise ExchangeError(
                    Reason.TOO_LARGE,
                    f"{holder} already has {limit} {kind} open on this node, the most allowed "
                    "at once; wait for answers before opening more",
                )
        for kind, _limit in kinds:
            self._open[holder, kind] = self._open.get((holder, kind), 0) + 1
        try:
            yield
        finally:
            for kind, _limit in kinds:
                left = self._open[holder, kind] - 1
                if left:
                    self._open[holder, kind] = left
                else:
                    del self._open[holder, kind]


class _Requests:
    """A call's requests, with the gate's time limits and Undecodable handling."""

    def __init__(
        self, source: AsyncIterator[Any], limits: Limits, method: str, *, tolerant: bool
    ) -> None:
        self._source = source
        self._limits = limits
        self._method = method
        self._tolerant = tolerant
        self._started = False

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        limit = (
            self._limits.stream_idle_seconds
            if self._started
            else self._limits.first_message_seconds
        )
        try:
            async with asyncio.timeout(limit):  # no task per request, unlike wait_for
                request = await anext(self._source)
        except TimeoutError:
            if not self._started:
                raise ExchangeError(
                    Reason.TIMEOUT,
                    f"no request arrived within {limit:g} s of opening {self._method}; "
                    "send the request when opening the call",
                ) from None
            # Idle: ended as if the caller had closed it (a sender reopens when it has more).
            log.info("idle stream ended", rpc=self._method, idle_seconds=limit)
            raise StopAsyncIteration from None
        self._started = True
        if isinstance(request, Undecodable) and not self._tolerant:
            raise request.refusal()
        return request

    async def single(self) -> Any:
        """The one request of a unary method."""
        try:
            return await anext(self)
        except StopAsyncIteration:
            raise ExchangeError(
                Reason.INVALID, f"{self._method} was closed without a request"
            ) from None


Admission = Callable[[PeerIdentity], None]  # raises ExchangeError when the caller may not
RecordRefusal = Callable[[str, PeerIdentity, ExchangeError], Awaitable[None]]


class PeerGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """See the module docstring.

    `admissions` maps a service's full name to its check of the caller (Exchange and Audit:
    a member of the usable registry with its registered certificate); services not listed
    (health, reflection) are open to any client the federation CA certified. `is_member`
    says which share a caller of an open service counts against. `record_refusal` writes
    the audit entry of a refusal (RPC path, caller, error). Methods in `tolerant` receive
    Undecodable stream items themselves.
    """

    def __init__(
        self,
        limits: Limits,
        admissions: Mapping[str, Admission],
        is_member: Callable[[PeerIdentity], bool],
        record_refusal: RecordRefusal,
        tolerant: frozenset[str] = frozenset(),
    ) -> None:
        self.limits = limits
        self.admissions = admissions
        self.is_member = is_member
        self.record_refusal = record_refusal
        self.tolerant = tolerant
        self.shares = _Shares()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return self._unknown(details.method)
        return self._guarded(handler, details.method)

    def _unknown(self, method: str) -> grpc.RpcMethodHandler:
        """A method no service here has: UNIMPLEMENTED, audited like any refusal."""

        named = shown(method, 128)  # the caller chose it: quoted and cut wherever it goes

        async def refuse(_source: AsyncIterator[bytes], context: Any) -> None:
            _current_peer.set(identify(context)[0])
            error = ExchangeError(Reason.UNIMPLEMENTED, f"this node serves no method {named}")
            await self._refuse(context, named, error)

        return grpc.stream_stream_rpc_method_handler(refuse)

    # -- one call ---------------------------------------------------------------------------

    def _admit(self, method: str, peer: PeerIdentity, problem: str) -> tuple[str, str]:
        """(the caller's share, the service's name); raises ExchangeError to refuse."""
        service = method.strip("/").split("/", 1)[0]
        admission = self.admissions.get(service)
        if admission is None:  # open: counted in the caller's own share of checks
            # A member's own share; outside the registry, one per certificate the CA issued
            # (so one stranger cannot squat on the checks of another, a monitor, say).
            if not problem and self.is_member(peer):
                return f"'{peer.agency_id}'", service
            return f"certificate {peer.certificate_sha256[:16]}…", service
        if problem:
            raise ExchangeError(Reason.UNAUTHENTICATED, problem)
        admission(peer)
        return f"'{peer.agency_id}'", service

    def _kinds(self, service: str, streaming: bool) -> list[tuple[str, int]]:
        if service not in self.admissions:
            return [("health or reflection calls", self.limits.peer_checks)]
        kinds = [("calls", self.limits.peer_calls)]
        if streaming:
            kinds.append(("streams", self.limits.peer_streams))
        return kinds

    @contextmanager
    def _entered(
        self, method: str, context: grpc.aio.ServicerContext, streaming: bool
    ) -> Iterator[None]:
        peer, problem = identify(context)
        _current_peer.set(peer)
        holder, service = self._admit(method, peer, problem)
        with self.shares.hold(holder, self._kinds(service, streaming)):
            yield

    async def _refuse(
        self, context: grpc.aio.ServicerContext, method: str, error: ExchangeError
    ) -> None:
        peer = _current_peer.get(PeerIdentity(UNKNOWN, ""))
        if not error.audited:
            try:
                await self.record_refusal(method, peer, error)
            except Exception as failure:  # e.g. the node is stopping: the answer still goes
                log.warning("refusal not audited", rpc=method, error=str(failure))
        log.info(
            "refused",
            rpc=method,
            peer=peer.agency_id,
            reason=error.reason.value,
            error=error.message,
        )
        await context.abort(STATUS_FOR_REASON[error.reason], error.message)

    async def _failed(
        self, context: grpc.aio.ServicerContext, method: str, error: BaseException
    ) -> None:
        """Answer (and audit) whatever escaped a servicer (node.services.status)."""
        await self._refuse(context, method, as_refusal(error, method))

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse = _lenient(handler.request_deserializer)
        serialize = handler.response_serializer
        streaming = handler.request_streaming or handler.response_streaming
        tolerant = method in self.tolerant
        inner: Callable[..., Any] = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary
        ) or handler.stream_stream

        def requests(source: AsyncIterator[Any]) -> _Requests:
            return _Requests(source, self.limits, method, tolerant=tolerant)

        async def argument(source: AsyncIterator[Any]) -> Any:
            wrapped = requests(source)
            return wrapped if handler.request_streaming else await wrapped.single()

        if not handler.response_streaming:

            async def unary_response(source: AsyncIterator[Any], context: Any) -> Any:
                try:
                    with self._entered(method, context, streaming):
                        return await inner(await argument(source), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await self._failed(context, method, error)

            return grpc.stream_unary_rpc_method_handler(
                unary_response, request_deserializer=parse, response_serializer=serialize
            )

        if inspect.isasyncgenfunction(inner):

            async def response_stream(source: AsyncIterator[Any], context: Any) -> Any:
                try:
                    with self._entered(method, context, streaming):
                        async for response in inner(await argument(source), context):
                            yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await self._failed(context, method, error)

            return grpc.stream_stream_rpc_method_handler(
                response_stream, request_deserializer=parse, response_serializer=serialize
            )

        async def written_stream(source: AsyncIterator[Any], context: Any) -> None:
            # A handler that writes with context.write (e.g. health's Watch).
            try:
                with self._entered(method, context, streaming):
                    await inner(await argument(source), context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await self._failed(context, method, error)

        return grpc.stream_stream_rpc_method_handler(
            written_stream, request_deserializer=parse, response_serializer=serialize
        )
