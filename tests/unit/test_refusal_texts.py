"""Refusal texts stay bounded and printable whatever a peer sends (node.exchange.errors)."""

from __future__ import annotations

import pytest

from node.exchange.errors import MAX_REASON, MAX_SHOWN, ExchangeError, Reason, cut, shown


def test_a_quoted_value_is_escaped_and_cut() -> None:
    assert shown("长治市生态环境局") == "'长治市生态环境局'"
    assert shown("a\nb\x00c\u202e") == "'a\\nb\\x00c\\u202e'"
    long = shown("类" * 10_000)
    assert len(long.encode()) <= MAX_SHOWN + 2
    assert long.endswith("…[30000 bytes]'")
    assert shown(b"\xff\xfeok") == "'\\xff\\xfeok'"


@pytest.mark.parametrize("limit", [1, 10, 40, 256])
def test_cut_never_splits_a_character(limit: int) -> None:
    text = "中" * 500
    result = cut(text, limit)
    assert len(result.encode()) <= max(limit, len(f"…[{len(text.encode())} bytes]".encode()))
    result.encode("utf-8")  # whole characters only


def test_a_refusal_is_at_most_max_reason_bytes_and_one_line() -> None:
    error = ExchangeError(Reason.INVALID, "bad: " + "x\n" * 1_000_000)
    assert len(error.message.encode()) <= MAX_REASON
    assert "\n" not in error.message
    assert str(error) == error.message
    assert error.audited is False
