"""A stand-in for the NodeAPI a plugin gets, for unit tests of plugins without a node."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from node.plugin_api import Draft


class FakeNodeAPI:
    """``submit`` records the draft and numbers it (``msg-1``, ...); ``submit_many`` calls
    ``submit`` per draft and returns each outcome, as the node does. ``config`` is the
    ``[plugins.<plugin>]`` table."""

    def __init__(
        self,
        data_dir: Path,
        *,
        agency: str,
        plugin: str = "",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self._data_dir = data_dir
        self._agency = agency
        self._plugin = plugin
        self._config = dict(config or {})
        self.submitted: list[Draft] = []

    @property
    def agency(self) -> str:
        return self._agency

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    def plugin_config(self, name: str) -> Mapping[str, Any]:
        return self._config if name == self._plugin else {}

    def submit(self, draft: Draft) -> str:
        self.submitted.append(draft)
        return f"msg-{len(self.submitted)}"

    def submit_many(self, drafts: Sequence[Draft]) -> list[str | Exception]:
        results: list[str | Exception] = []
        for draft in drafts:
            try:
                results.append(self.submit(draft))
            except Exception as error:  # as the node does: per draft, never raised
                results.append(error)
        return results

    @property
    def log(self) -> Any:
        return structlog.get_logger()
