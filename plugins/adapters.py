"""The adapters every built-in agency plugin has: a drop folder, SQL sources, a clearance.

An agency module binds them to its name, which selects its ``[plugins.<name>]`` table::

    _adapters = AgencyAdapters("police")
    liandong_node_started = _adapters.liandong_node_started
    ...

Config (all optional)::

    [plugins.police]
    folder = "local"            # the drop folder (plugins.dropfolder), under the data directory
    cleared_for = "internal"    # the highest marking the local system may receive

    [plugins.police.sql.decisions]   # outbound drafts from SQL rows (plugins.sqlsource)
    ...

Rows of a SQL source become drafts the way CSV rows do (:func:`plugins.dropfolder.flat_draft`):
their output fields are ``family``, ``to``, ``body_type``, ``case_ref``, ``in_reply_to``,
``confidentiality``, ``attachments`` (relative to the drop folder) and ``body.<field>``.

Confidentiality (002 §五(三)): an inbound item whose own marking is above ``cleared_for`` is
not written to the local system; the node audits it as withheld and keeps it for ``liandong
show``. An item whose own marking is within the clearance but with fields marked above it is
written without those fields, listed in the file's ``withheld_fields``.

Outbound, ``[plugins.<name>.recipients]`` says what each recipient may get (002 §五(三))::

    [plugins.ecology.recipients]
    "140400/discipline" = "internal"   # fields marked above internal are left out for it

A recipient not listed gets every message whole. For a listed one (``liandong_redact``), fields
marked above its clearance are taken out of its version, and a message whose own marking is
above it is refused, naming the recipient.

Inbound cases can be answered on arrival (``liandong_review_inbound``) by rules tried in
order, the first that matches deciding::

    [[plugins.procuratorate.review]]
    family = "clue"
    without_attachments = true         # only items that came with no attachment
    decline = "declined"               # 不予受理: answered, not handed to the local system
    reason = "线索未附证据材料，请补充后重新移送"

    [[plugins.procuratorate.review]]
    family = "clue"
    from = "140400/ecology"            # only items from this agency
    accept = "accepted"                # 受理 at once; handed to the local system as usual

Every case change (``liandong_cases_changed``) is appended to the drop folder's
``cases/<date>.jsonl``, without title and reason for a case marked above ``cleared_for``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

from node.exchange.review import VerdictError, check_verdict
from node.hookspecs import hookimpl
from node.identity import IdentityError, validate_agency_id
from node.plugin_api import (
    MARKINGS,
    Accept,
    CaseChange,
    Decline,
    DeliveryConfirmation,
    Draft,
    DraftRejected,
    HandOffWithheld,
    InboundItem,
    NodeAPI,
    Verdict,
    cleared,
)
from plugins.dropfolder import DraftError, DropFolder, draft_from_json, flat_draft
from plugins.sqlsource import PickUp, RowError, SqlConfigError, SqlQuery, SqlSource

__all__ = ["AgencyAdapters"]

# One object each, so an unset table is checked once, not on every call.
_NO_RECIPIENTS: Mapping[str, str] = {}
_NO_RULES: list[Any] = []
_DRAFT_FIELDS = frozenset(
    {
        "family",
        "to",
        "body_type",
        "case_ref",
        "in_reply_to",
        "confidentiality",
        "attachments",
        "field_markings",
    }
)


@dataclass(frozen=True)
class ReviewRule:
    """One ``[[plugins.<name>.review]]`` rule: which items it matches and the verdict."""

    family: str
    verdict: Verdict
    sender: str = ""
    without_attachments: bool = False

    def matches(self, item: InboundItem) -> bool:
        return (
            item.family == self.family
            and (not self.sender or item.sender == self.sender)
            and (not self.without_attachments or not item.attachments)
        )

    @classmethod
    def from_config(cls, where: str, table: object) -> ReviewRule:
        if not isinstance(table, Mapping):
            raise ValueError(f"{where}: expected a table (family, accept or decline, ...)")
        unknown = sorted(
            set(table) - {"family", "from", "without_attachments", "accept", "decline", "reason"}
        )
        if unknown:
            raise ValueError(
                f"{where}: unknown key {', '.join(unknown)} (family, from, "
                "without_attachments, accept, decline, reason)"
            )
        family = table.get("family")
        if not isinstance(family, str) or not family:
            raise ValueError(f'{where}: family is required, e.g. family = "clue"')
        reason = table.get("reason", "")
        if not isinstance(reason, str):
            raise ValueError(f"{where} reason: expected a string")
        if ("accept" in table) == ("decline" in table):
            raise ValueError(f"{where}: give either accept = EVENT or decline = EVENT")
        event = table.get("accept", table.get("decline"))
        if not isinstance(event, str) or not event:
            raise ValueError(f'{where}: the event must be a lifecycle event, e.g. "accepted"')
        verdict: Verdict = Accept(event, reason) if "accept" in table else Decline(reason, event)
        try:
            check_verdict(family, verdict)
        except VerdictError as error:
            raise ValueError(f"{where}: {error}") from None
        sender = table.get("from", "")
        if sender:
            try:
                validate_agency_id(sender)
            except IdentityError as error:
                raise ValueError(f"{where} from: {error}") from None
        without = table.get("without_attachments", False)
        if not isinstance(without, bool):
            raise ValueError(f"{where} without_attachments: expected true or false")
        return cls(family, verdict, sender, without)


class AgencyAdapters:
    """The hook implementations shared by the built-in agency plugins."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._folders: dict[Path, DropFolder] = {}
        self._sources: dict[Path, list[SqlSource]] = {}
        # The recipients table last checked: checked again only when the config changes.
        self._recipients: object = None
        self._review_rules: tuple[object, list[ReviewRule]] | None = None  # (config, rules)

    def settings(self, api: NodeAPI) -> Mapping[str, Any]:
        return api.plugin_config(self.name)

    def folder(self, api: NodeAPI) -> DropFolder:
        configured = self.settings(api).get("folder", "local")
        if not isinstance(configured, str) or not configured:
            raise ValueError(f"[plugins.{self.name}] folder: expected a non-empty path string")
        root = api.data_dir / configured
        folder = self._folders.get(root)
        if folder is None:
            folder = self._folders.setdefault(root, DropFolder(root))
        return folder

    def clearance(self, api: NodeAPI) -> str:
        value = self.settings(api).get("cleared_for", "internal")
        if value not in MARKINGS:
            raise ValueError(
                f"[plugins.{self.name}] cleared_for: {value!r} is not one of {', '.join(MARKINGS)}"
            )
        return str(value)

    def recipient_clearances(self, api: NodeAPI) -> Mapping[str, str]:
        """``[plugins.<name>.recipients]``: agency id -> the highest marking it may get.

        Checked once per table: the redactor asks for every recipient of every message."""
        table = self.settings(api).get("recipients", _NO_RECIPIENTS)
        if table is self._recipients:
            return cast(Mapping[str, str], table)
        where = f"[plugins.{self.name}.recipients]"
        if not isinstance(table, Mapping):
            raise ValueError(f'{where}: expected a table of "agency id" = "marking"')
        for agency, marking in table.items():
            try:
                # A misspelt id would leave that recipient unlisted: sent everything whole.
                validate_agency_id(agency)
            except IdentityError as error:
                raise ValueError(f"{where} {agency!r}: {error}") from None
            if marking not in MARKINGS:
                raise ValueError(
                    f"{where} {agency!r}: {marking!r} is not one of {', '.join(MARKINGS)}"
                )
        self._recipients = table
        return table

    def review_rules(self, api: NodeAPI) -> list[ReviewRule]:
        """``[[plugins.<name>.review]]``, checked once per config."""
        configured = self.settings(api).get("review", _NO_RULES)
        if self._review_rules is not None and self._review_rules[0] is configured:
            return self._review_rules[1]
        where = f"[[plugins.{self.name}.review]]"
        if not isinstance(configured, list):
            raise ValueError(f"{where}: expected an array of tables")
        rules = [
            ReviewRule.from_config(f"{where} #{n}", table) for n, table in enumerate(configured, 1)
        ]
        self._review_rules = (configured, rules)
        return rules

    def state_dir(self, api: NodeAPI) -> Path:
        """Where the plugin keeps what it remembers (SQL cursors, failed rows)."""
        return api.data_dir / "plugins" / self.name

    def sql_sources(self, api: NodeAPI, table: str = "sql") -> list[SqlSource]:
        """The SQL sources configured under ``[plugins.<name>.<table>.*]``."""
        state = self.state_dir(api) / table
        sources = self._sources.get(state)
        if sources is None:
            configured = self.settings(api).get(table, {})
            if not isinstance(configured, Mapping):
                raise SqlConfigError(f"[plugins.{self.name}.{table}]: expected tables of sources")
            sources = []
            for name, settings in configured.items():
                query = SqlQuery.from_config(self.name, name, settings, table)
                outputs = {*query.columns, *query.fixed}
                bad = sorted(
                    o for o in outputs if o not in _DRAFT_FIELDS and not o.startswith("body.")
                )
                if table == "sql" and bad:
                    raise SqlConfigError(
                        f"{query.where}: {', '.join(bad)} is not a draft field; use "
                        f"{', '.join(sorted(_DRAFT_FIELDS))} or body.<field>"
                    )
                sources.append(SqlSource(query, state))
            self._sources[state] = sources
        return sources

    def submit_row(self, api: NodeAPI, source: SqlSource, record: Mapping[str, Any]) -> str:
        """Submit one SQL row as a draft; a row that is not a valid draft raises RowError."""
        fields = flat_draft({k: v for k, v in record.items() if not k.startswith("_")})
        root = self.folder(api).root
        try:
            draft = draft_from_json(
                fields,
                base_dir=root,
                root=root,
                source=f"sql:{self.name}:{source.query.name}:{record['_key']}",
            )
        except DraftError as error:
            raise RowError(str(error)) from None
        try:
            return api.submit(draft)
        except DraftRejected as error:
            raise RowError(f"rejected by the node: {error}") from None

    @hookimpl
    def liandong_node_started(self, api: NodeAPI) -> None:
        folder = self.folder(api)
        folder.ensure_folders()
        api.log.info(
            "local system adapters ready",
            plugin=self.name,
            folder=str(folder.root),
            sql=[s.query.name for s in self.sql_sources(api)],
            # A wrong marking name fails here, at start, not at the first item.
            cleared_for=self.clearance(api),
            recipients=dict(self.recipient_clearances(api)),
            review=len(self.review_rules(api)),
        )

    @hookimpl
    def liandong_poll_local_system(self, api: NodeAPI) -> None:
        for outcome in self.folder(api).collect_drafts(api.submit, api.submit_many):
            if outcome.message_id is not None:
                api.log.info(
                    "draft submitted",
                    plugin=self.name,
                    file=str(outcome.path),
                    message_id=outcome.message_id,
                )
            else:
                api.log.warning(
                    "draft not submitted",
                    plugin=self.name,
                    file=str(outcome.path),
                    error=outcome.error,
                )
        for source in self.sql_sources(api):
            self.report(api, source, source.pick_up(partial(self.submit_row, api, source)))

    def report(self, api: NodeAPI, source: SqlSource, picked: PickUp) -> None:
        for problem in picked.failed:
            api.log.warning("row not submitted", plugin=self.name, error=problem)
        if picked.error:
            api.log.warning("SQL source not read", plugin=self.name, error=picked.error)
        elif picked.handled:
            api.log.info(
                "rows submitted", plugin=self.name, source=source.query.name, rows=picked.handled
            )

    @hookimpl
    def liandong_review_inbound(self, item: InboundItem, api: NodeAPI) -> Verdict | None:
        if api.agency not in item.recipients:
            return None
        for rule in self.review_rules(api):
            if rule.matches(item):
                return rule.verdict
        return None

    @hookimpl
    def liandong_hand_off(self, item: InboundItem, api: NodeAPI) -> str | None:
        if api.agency not in item.recipients:
            return None
        clearance = self.clearance(api)
        if not cleared(item.confidentiality, clearance):
            raise HandOffWithheld(
                f"marked {item.confidentiality}; the {self.name} adapter is cleared for "
                f"{clearance} ([plugins.{self.name}] cleared_for)"
            )
        withheld = sorted(
            name for name, marking in item.field_markings.items() if not cleared(marking, clearance)
        )
        path = str(self.folder(api).write_inbound(item, withheld))
        if withheld:
            # The reference the node records shows what the local system did not get.
            return f"{path} (without {', '.join(withheld)}: above {clearance})"
        return path

    @hookimpl
    def liandong_redact(self, draft: Draft, recipient: str, api: NodeAPI) -> Draft | None:
        clearance = self.recipient_clearances(api).get(recipient)
        if clearance is None:
            return None
        if not cleared(draft.confidentiality, clearance):
            raise DraftRejected(
                f"recipient '{recipient}' may get at most {clearance} "
                f"([plugins.{self.name}.recipients]), and the message is marked "
                f"{draft.confidentiality}; send it to them separately, marked {clearance}, or "
                "mark only the fields that need it"
            )
        above = {
            name
            for name, marking in draft.field_markings.items()
            if not cleared(marking, clearance)
        }
        if not above:
            return None
        return replace(
            draft,
            body={k: v for k, v in draft.body.items() if not any(_same_field(k, n) for n in above)},
            field_markings={k: v for k, v in draft.field_markings.items() if k not in above},
        )

    @hookimpl
    def liandong_deliveries_confirmed(
        self, confirmations: Sequence[DeliveryConfirmation], api: NodeAPI
    ) -> None:
        self.folder(api).append_confirmations(confirmations)

    @hookimpl
    def liandong_cases_changed(self, changes: Sequence[CaseChange], api: NodeAPI) -> None:
        self.folder(api).append_case_changes(
            changes, self.clearance(api), self.state_dir(api) / "cases-reported"
        )


def _same_field(key: str, name: str) -> bool:
    """Whether a body key and a marked field name the same field, in proto or JSON spelling
    (``legal_basis`` and ``legalBasis``)."""
    return key.replace("_", "").lower() == name.replace("_", "").lower()
