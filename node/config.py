"""The node's TOML configuration, read into typed dataclasses.

Every error names the file and the key, so a deployment mistake is one line to
fix. Relative paths resolve against the directory of the config file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from node.exchange.deadlines import Deadlines, RuleError, WorkCalendar, override_rule
from node.exchange.thresholds import (
    LEGAL_THRESHOLDS,
    Threshold,
    ThresholdError,
    thresholds_from_config,
)
from node.identity import IdentityError, agency_kind, validate_agency_id

CONFIG_FILE_NAME = "node.toml"


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    clock_skew_seconds: float = 300.0
    # Deliveries are retried for as long as a peer is down, so old messages are normal;
    # the skew window bounds clocks running ahead, this bounds how stale a message may be.
    max_message_age_seconds: float = 30 * 86400.0
    max_envelope_bytes: int = 4 * 1024 * 1024
    max_attachment_bytes: int = 4 * 1024 * 1024 * 1024
    max_recipients: int = 32
    # What one member may hold open on the peer port at once (node.services.gate): calls
    # of Exchange and Audit, of which streams, and health/reflection calls apart.
    peer_calls: int = 64
    peer_streams: int = 16
    peer_checks: int = 8
    # A call's first request must arrive this soon; a stream idle this long is ended.
    first_message_seconds: float = 30.0
    stream_idle_seconds: float = 600.0
    # Uploads no received message cites yet (unfinished, or verified and waiting for their
    # message): bytes one member may hold, and how long one nobody touches is kept
    # (node.exchange.attachments).
    max_pending_upload_bytes: int = 16 * 1024 * 1024 * 1024
    pending_upload_ttl_seconds: float = 7 * 86400.0


@dataclass(frozen=True)
class Delivery:
    initial_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 300.0
    concurrency: int = 256
    batch_size: int = 64
    rpc_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class HandOff:
    """[handoff]: handing inbound messages to the local system (node.exchange.handoff). A
    failed hand-off is retried after retry_seconds, then twice as long each time up to
    max_backoff_seconds; after max_attempts failures it is recorded as failed (shown by
    `liandong inbox` and `show`) until the operator re-offers it (`liandong handoff retry`)."""

    max_attempts: int = 10
    retry_seconds: float = 5.0
    max_backoff_seconds: float = 900.0


@dataclass(frozen=True)
class NodeConfig:
    path: Path
    agency: str
    listen: str
    data_dir: Path
    admin_socket: Path
    signing_key: Path
    tls_key: Path
    tls_cert: Path
    ca_cert: Path
    operator_key: Path
    registry: Path
    registry_grace_seconds: float
    database_url: str
    limits: Limits = field(default_factory=Limits)
    delivery: Delivery = field(default_factory=Delivery)
    handoff: HandOff = field(default_factory=HandOff)
    poll_seconds: float = 1.0
    log_format: str = "auto"
    log_level: str = "info"
    plugins_enabled: tuple[str, ...] | None = None
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # How often this node witnesses (fetches, checks and cosigns) its peers' checkpoints; 0: never.
    witness_interval_seconds: float = 60.0
    deadlines: Deadlines = field(default_factory=Deadlines)
    # How often the deadline scheduler looks for clocks that came due.
    deadline_scan_seconds: float = 60.0
    # The crime thresholds the 应移未移 check applies to shared penalty data.
    supervision_thresholds: tuple[Threshold, ...] = LEGAL_THRESHOLDS


_KNOWN = {
    "node": {"agency", "listen", "data_dir", "admin_socket", "poll_seconds"},
    "keys": {"signing_key", "tls_key", "tls_cert"},
    "federation": {"ca_cert", "operator_key", "registry", "expiry_grace_seconds"},
    "storage": {"url"},
    "limits": set(Limits.__dataclass_fields__),
    "delivery": set(Delivery.__dataclass_fields__),
    "handoff": set(HandOff.__dataclass_fields__),
    "logging": {"format", "level"},
    "audit": {"witness_interval_seconds"},
    "supervision": {"thresholds"},
    "deadlines": {
        "supervisor",
        "escalation_grace_days",
        "speed",
        "scan_seconds",
        "holidays",
        "workdays",
        "rules",
        "sharing_from",
    },
}


def load_config(path: Path) -> NodeConfig:
    path = path.resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config {path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config {path}: not valid TOML: {error}") from None
    reader = _Reader(path, raw)
    base = path.parent
    for section in raw:
        if section not in _KNOWN and section != "plugins":
            raise ConfigError(f"config {path}: unknown section [{section}]")
    for section, keys in _KNOWN.items():
        for key in reader.table(section):
            if key not in keys:
                raise ConfigError(f"config {path}: unknown key '{section}.{key}'")

    agency = reader.string("node", "agency")
    try:
        validate_agency_id(agency)
    except IdentityError as error:
        raise ConfigError(f"config {path}: key 'node.agency': {error}") from None
    data_dir = base / reader.string("node", "data_dir", ".")
    url = reader.string("storage", "url", "")
    if not url:
        url = f"sqlite:///{(data_dir / 'node.db').resolve()}"
    log_format = reader.string("logging", "format", "auto")
    if log_format not in {"auto", "json", "console"}:
        raise ConfigError(f"config {path}: key 'logging.format' must be auto, json or console")
    log_level = reader.string("logging", "level", "info")
    if log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
        raise ConfigError(
            f"config {path}: key 'logging.level' must be debug, info, warning, error or critical"
        )

    plugins = reader.table("plugins")
    enabled: tuple[str, ...] | None
    if "enabled" in plugins:
        value = plugins["enabled"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config {path}: key 'plugins.enabled' must be a list of names")
        enabled = tuple(value)
    else:
        enabled = None
    settings = {k: v for k, v in plugins.items() if isinstance(v, dict)}

    limits = Limits(
        **{k: reader.number("limits", k, getattr(Limits(), k)) for k in _KNOWN["limits"]}
    )
    delivery = Delivery(
        **{k: reader.number("delivery", k, getattr(Delivery(), k)) for k in _KNOWN["delivery"]}
    )
    handoff = HandOff(
        **{k: reader.number("handoff", k, getattr(HandOff(), k)) for k in _KNOWN["handoff"]}
    )
    for section, key, value in (
        ("delivery", "concurrency", delivery.concurrency),
        ("delivery", "batch_size", delivery.batch_size),
        ("delivery", "rpc_timeout_seconds", delivery.rpc_timeout_seconds),
        ("limits", "max_envelope_bytes", limits.max_envelope_bytes),
        ("limits", "max_recipients", limits.max_recipients),
        ("handoff", "max_attempts", handoff.max_attempts),
        ("handoff", "retry_seconds", handoff.retry_seconds),
        ("handoff", "max_backoff_seconds", handoff.max_backoff_seconds),
        ("limits", "peer_calls", limits.peer_calls),
        ("limits", "peer_streams", limits.peer_streams),
        ("limits", "peer_checks", limits.peer_checks),
        ("limits", "first_message_seconds", limits.first_message_seconds),
        ("limits", "stream_idle_seconds", limits.stream_idle_seconds),
        ("limits", "max_pending_upload_bytes", limits.max_pending_upload_bytes),
        ("limits", "pending_upload_ttl_seconds", limits.pending_upload_ttl_seconds),
    ):
        if value <= 0:
            raise ConfigError(f"config {path}: key '{section}.{key}' must be at least 1")
    if limits.max_pending_upload_bytes < limits.max_attachment_bytes:
        raise ConfigError(
            f"config {path}: key 'limits.max_pending_upload_bytes' must be at least "
            f"'limits.max_attachment_bytes' ({limits.max_attachment_bytes}), or no file that "
            "large could be uploaded"
        )
    poll_seconds = reader.number("node", "poll_seconds", 1.0)
    if poll_seconds <= 0:
        raise ConfigError(f"config {path}: key 'node.poll_seconds' must be greater than 0")
    return NodeConfig(
        path=path,
        agency=agency,
        listen=_endpoint(path, reader.string("node", "listen")),
        data_dir=data_dir,
        admin_socket=data_dir / reader.string("node", "admin_socket", "admin.sock"),
        signing_key=base / reader.string("keys", "signing_key", "keys/signing.key"),
        tls_key=base / reader.string("keys", "tls_key", "keys/tls.key"),
        tls_cert=base / reader.string("keys", "tls_cert", "tls.crt"),
        ca_cert=base / reader.string("federation", "ca_cert", "ca.crt"),
        operator_key=base / reader.string("federation", "operator_key", "operator.pub"),
        registry=base / reader.string("federation", "registry", "registry.json"),
        registry_grace_seconds=reader.number("federation", "expiry_grace_seconds", 0.0),
        database_url=url,
        limits=limits,
        delivery=delivery,
        handoff=handoff,
        poll_seconds=poll_seconds,
        log_format=log_format,
        log_level=log_level,
        plugins_enabled=enabled,
        plugin_settings=settings,
        witness_interval_seconds=reader.number("audit", "witness_interval_seconds", 60.0),
        deadlines=_deadlines(reader),
        deadline_scan_seconds=_positive(reader, "deadlines", "scan_seconds", 60.0),
        supervision_thresholds=_thresholds(reader),
    )


def _thresholds(reader: _Reader) -> tuple[Threshold, ...]:
    try:
        return thresholds_from_config(
            reader.table("supervision").get("thresholds"), where="[supervision.thresholds]"
        )
    except ThresholdError as error:
        raise ConfigError(f"config {reader.path}: {error}") from None


def _positive(reader: _Reader, section: str, key: str, default: float) -> float:
    value = float(reader.number(section, key, default))
    if value <= 0:
        raise ConfigError(f"config {reader.path}: key '{section}.{key}' must be greater than 0")
    return value


def _deadlines(reader: _Reader) -> Deadlines:
    """[deadlines]: the supervising agency, the grace before escalating, the calendar, and
    rule overrides (``[deadlines.rules."clue.feedback"] amount = 20``)."""
    path = reader.path
    table = reader.table("deadlines")
    supervisor = reader.string("deadlines", "supervisor", "")
    if supervisor:
        try:
            validate_agency_id(supervisor)
        except IdentityError as error:
            raise ConfigError(f"config {path}: key 'deadlines.supervisor': {error}") from None

    def days(key: str) -> frozenset[date]:
        values = table.get(key, [])
        if not isinstance(values, list):
            raise ConfigError(f"config {path}: key 'deadlines.{key}' must be a list of dates")
        try:
            return frozenset(
                v if isinstance(v, date) else date.fromisoformat(str(v)) for v in values
            )
        except ValueError as error:
            raise ConfigError(f"config {path}: key 'deadlines.{key}': {error}") from None

    sharing_from = table.get("sharing_from", [])
    if not isinstance(sharing_from, list) or not all(isinstance(a, str) for a in sharing_from):
        raise ConfigError(
            f"config {path}: key 'deadlines.sharing_from' must be a list of agency ids"
        )
    for agency in sharing_from:
        try:
            validate_agency_id(agency)
        except IdentityError as error:
            raise ConfigError(f"config {path}: key 'deadlines.sharing_from': {error}") from None
    base = Deadlines(
        calendar=WorkCalendar(days("holidays"), days("workdays")),
        sharing_from=tuple(dict.fromkeys(sharing_from)),
        escalation_grace=timedelta(
            days=float(reader.number("deadlines", "escalation_grace_days", 3.0))
        ),
        supervisor=supervisor,
        speed=_positive(reader, "deadlines", "speed", 1.0),
    )
    rules = table.get("rules", {})
    if not isinstance(rules, dict) or not all(isinstance(v, dict) for v in rules.values()):
        raise ConfigError(f"config {path}: 'deadlines.rules' must hold one table per rule")
    try:
        overrides = [override_rule(base.rule(name), name, values) for name, values in rules.items()]
    except RuleError as error:
        raise ConfigError(f"config {path}: {error}") from None
    return replace(base.with_overrides(overrides), configured=frozenset(rules))


def default_plugins(config: NodeConfig) -> tuple[str, ...]:
    """Plugins to enable: as configured, else the one named after the agency's kind if any.

    A water or forestry bureau has no built-in plugin; its node still starts, with none.
    """
    from node.plugins import installed_plugin_names

    if config.plugins_enabled is not None:
        return config.plugins_enabled
    kind = agency_kind(config.agency)
    return (kind,) if kind in installed_plugin_names() else ()


def render_config(
    *,
    agency: str,
    listen: str,
    database_url: str = "",
    plugins: tuple[str, ...] | None = None,
    extra: str = "",
    witness_interval: float = 60.0,
) -> str:
    """A starting config for `liandong init`, with every path at its default."""
    plugin_line = "" if plugins is None else f"enabled = {list(plugins)!r}\n".replace("'", '"')
    return (
        "# Liandong node configuration. Relative paths are relative to this file.\n"
        "[node]\n"
        f'agency = "{agency}"\n'
        f'listen = "{listen}"        # TLS endpoint peers connect to\n'
        'data_dir = "."\n'
        'admin_socket = "admin.sock"    # local admin API (unix socket)\n\n'
        "[keys]\n"
        'signing_key = "keys/signing.key"\n'
        'tls_key = "keys/tls.key"\n'
        'tls_cert = "tls.crt"           # issued by the federation operator\n\n'
        "[federation]\n"
        'ca_cert = "ca.crt"             # from the federation operator\n'
        'operator_key = "operator.pub"  # from the federation operator\n'
        'registry = "registry.json"     # the signed registry the operator publishes\n'
        "expiry_grace_seconds = 0\n\n"
        "[storage]\n"
        f'url = "{database_url}"        # empty: SQLite in data_dir\n\n'
        "[logging]\n"
        'format = "auto"                # auto: JSON unless stderr is a terminal\n\n'
        "[audit]\n"
        f"witness_interval_seconds = {witness_interval:g}  # check and cosign peers' logs\n\n"
        "[plugins]\n"
        f"{plugin_line}{extra}"
    )


def _endpoint(path: Path, value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"config {path}: key 'node.listen': '{value}' is not HOST:PORT")
    return value


class _Reader:
    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path = path
        self.raw = raw

    def table(self, section: str) -> dict[str, Any]:
        value = self.raw.get(section, {})
        if not isinstance(value, dict):
            raise ConfigError(f"config {self.path}: '{section}' must be a table")
        return value

    def string(self, section: str, key: str, default: str | None = None) -> str:
        value = self.table(section).get(key, default)
        if value is None:
            raise ConfigError(f"config {self.path}: missing key '{section}.{key}'")
        if not isinstance(value, str):
            raise ConfigError(f"config {self.path}: key '{section}.{key}' must be a string")
        return value

    def number(self, section: str, key: str, default: float) -> Any:
        value = self.table(section).get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config {self.path}: key '{section}.{key}' must be a number")
        if value < 0:
            raise ConfigError(f"config {self.path}: key '{section}.{key}' must not be negative")
        return type(default)(value)
