"""Domain errors. Each names a reason; the gRPC edge maps reasons to status codes."""

from __future__ import annotations

from enum import Enum


class Reason(Enum):
    UNAUTHENTICATED = "unauthenticated"  # bad signature, unknown key, TLS identity mismatch
    PERMISSION_DENIED = "permission_denied"  # the registry does not allow it
    INVALID = "invalid"  # malformed input
    PRECONDITION = "precondition"  # wrong recipient, expired registry, missing attachment
    TOO_LARGE = "too_large"  # a size limit
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"  # shutting down, try again


class ExchangeError(Exception):
    """A refusal with a reason and a sentence a person can act on."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
