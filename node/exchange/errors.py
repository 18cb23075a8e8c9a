"""Domain errors. Each names a reason; the gRPC edge maps reasons to status codes.

A refusal's text goes back to the caller (a gRPC status message), into the node's log and
into the audit log for good, so it is bounded: every value a peer chose is quoted through
`shown` (escaped, at most MAX_SHOWN bytes) and a whole text is cut at MAX_REASON bytes.
A 3 MiB payload type must not become a 3 MiB audit entry, nor a status trailer too large
for the caller's gRPC library to read.
"""

from __future__ import annotations

from enum import Enum

MAX_SHOWN = 256  # UTF-8 bytes of one quoted value
MAX_REASON = 1024  # UTF-8 bytes of a whole refusal text


class Reason(Enum):
    UNAUTHENTICATED = "unauthenticated"  # bad signature, unknown key, TLS identity mismatch
    PERMISSION_DENIED = "permission_denied"  # the registry does not allow it
    INVALID = "invalid"  # malformed input
    PRECONDITION = "precondition"  # wrong recipient, expired registry, missing attachment
    TOO_LARGE = "too_large"  # a size limit
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"  # shutting down, try again
    TIMEOUT = "timeout"  # the caller sent nothing in time
    UNIMPLEMENTED = "unimplemented"  # a method this node does not serve
    INTERNAL = "internal"  # a bug in this node (logged with its traceback)


def _escaped(text: str) -> str:
    """Printable characters as they are (Chinese included), anything else as an escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def cut(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes, never splitting a character; marked if cut."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return text
    marker = f"…[{len(data)} bytes]"
    room = max(0, limit - len(marker.encode()))
    return data[:room].decode("utf-8", "ignore") + marker


def bounded(text: str, limit: int = MAX_REASON) -> str:
    """`text` escaped and cut to `limit` bytes, without walking more of it than can show: a
    character takes at least one byte, so only the first `limit` can appear (and the marker
    still counts the whole)."""
    head = _escaped(text[: limit + 1])
    if len(text) <= limit + 1:
        return cut(head, limit)
    whole = len(text.encode("utf-8", "backslashreplace"))
    marker = f"…[{whole} bytes]"
    room = max(0, limit - len(marker.encode()))
    return head.encode("utf-8", "backslashreplace")[:room].decode("utf-8", "ignore") + marker


def shown(value: str | bytes, limit: int = MAX_SHOWN) -> str:
    """A value a peer chose, as a refusal may quote it: escaped, cut, in quotes."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return "'" + bounded(value, limit) + "'"


def shown_list(values: list[str], limit: int = 3) -> str:
    """At most `limit` quoted values, then how many more: 30,000 key ids stay one line."""
    listed = ", ".join(shown(v, 64) for v in values[:limit])
    more = len(values) - limit
    return listed + (f" and {more} more" if more > 0 else "")


class ExchangeError(Exception):
    """A refusal with a reason and a sentence a person can act on.

    `audited` is set once the refusal is accounted for in the audit log (its own entry, or
    counted: node.audit.refusals), or needs none; the edge that answers the caller writes an
    entry for every refusal not yet accounted for, and never a second.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        message = bounded(message, MAX_REASON)
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.audited = False
