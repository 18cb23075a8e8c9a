"""Crime thresholds: when an administrative penalty record is a suspected crime (to the police)
or a public-interest litigation clue (to the procuratorate).

The defaults follow the judicial interpretation on pollution crimes (最高人民法院、最高人民检察院
《关于办理环境污染刑事案件适用法律若干问题的解释》, 法释〔2023〕7号, 第一条) as the design notes
list them. They are data: each can be changed or switched off in config (``[plugins.ecology.
thresholds.NAME]`` on the bureau's node, ``[supervision.thresholds.NAME]`` on the
procuratorate's, where the 应移未移 check applies them to the penalty data shared with it), and
new ones added, as the law and local practice change.

A penalty record is a flat mapping, the same whether it comes from the bureau's SQL database,
a CSV row or a shared data file: ``record_id``, ``decided_on`` (YYYY-MM-DD), ``party`` and the
measurements and findings the thresholds name (``hazardous_waste_tonnes``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

Action = Literal["crime_transfer", "clue"]
ACTIONS: tuple[str, ...] = get_args(Action)

_YES = frozenset({"true", "yes", "y", "1", "是", "有"})
_NO = frozenset({"false", "no", "n", "0", "否", "无", ""})


class ThresholdError(ValueError):
    """A threshold table or a record's value is not usable; the message names the key."""


@dataclass(frozen=True)
class Threshold:
    name: str
    field: str
    """The record field the threshold reads."""
    action: Action
    basis: str
    """The legal basis, quoted in the transfer so the police see why."""
    at_least: float | None = None
    """A number the field must reach; ``None``: the field is a yes/no finding."""
    enabled: bool = True

    def describe(self, value: Any) -> str:
        if self.at_least is None:
            return f"{self.basis} ({self.field})"
        return f"{self.basis} ({self.field} = {value}, ≥ {self.at_least:g})"


@dataclass(frozen=True)
class Met:
    """A threshold a record meets, with the value that met it."""

    threshold: Threshold
    value: Any

    @property
    def action(self) -> Action:
        return self.threshold.action

    def describe(self) -> str:
        return self.threshold.describe(self.value)


def _threshold(
    name: str, field: str, action: Action, basis: str, at_least: float | None = None
) -> Threshold:
    return Threshold(name, field, action, basis, at_least)


LEGAL_THRESHOLDS: tuple[Threshold, ...] = (
    _threshold(
        "protected_zone",
        "protected_zone",
        "crime_transfer",
        "在饮用水水源一级保护区、自然保护区核心区排放、倾倒、处置有毒物质",
    ),
    _threshold(
        "hazardous_waste",
        "hazardous_waste_tonnes",
        "crime_transfer",
        "非法排放、倾倒、处置危险废物三吨以上",
        3,
    ),
    _threshold(
        "heavy_metals",
        "heavy_metal_multiple",
        "crime_transfer",
        "排放重金属、持久性有机污染物超过排放标准三倍以上",
        3,
    ),
    _threshold(
        "hidden_discharge",
        "hidden_discharge",
        "crime_transfer",
        "通过暗管、渗井、渗坑、裂隙、溶洞、灌注等逃避监管的方式排放有毒物质",
    ),
    _threshold(
        "repeat_offence",
        "penalties_within_two_years",
        "crime_transfer",
        "二年内曾因违反国家规定排放有毒物质受过二次以上行政处罚，又实施此类行为",
        2,
    ),
    _threshold(
        "monitoring_data",
        "monitoring_data_falsified",
        "crime_transfer",
        "重点排污单位篡改、伪造自动监测数据或者干扰自动监测设施",
    ),
    _threshold(
        "public_interest",
        "public_interest_damage",
        "clue",
        "损害社会公共利益的生态环境和资源保护违法行为，可能需要提起公益诉讼",
    ),
)

_KEYS = frozenset({"field", "action", "basis", "at_least", "enabled"})


def thresholds_from_config(
    table: Mapping[str, Any] | None,
    *,
    where: str,
    base: Sequence[Threshold] = LEGAL_THRESHOLDS,
) -> tuple[Threshold, ...]:
    """The thresholds in force: ``base`` with the config's changes, new ones appended.

    ``table`` maps a threshold name to its keys (``field``, ``action``, ``basis``,
    ``at_least``, ``enabled``); a known name may give only the keys it changes, a new one
    needs ``field``, ``action`` and ``basis``.

    :param where: the config table's name, e.g. ``[plugins.ecology.thresholds]``, for errors.
    :raises ThresholdError: naming the threshold and key.
    """
    by_name = {t.name: t for t in base}
    if table is not None and not isinstance(table, Mapping):
        raise ThresholdError(f"{where}: expected a table of thresholds, one per name")
    for name, settings in (table or {}).items():
        here = f"{where.rstrip(']')}.{name}]"
        if not isinstance(settings, Mapping):
            raise ThresholdError(f"{here}: expected a table of field, action, basis, at_least")
        unknown = sorted(set(settings) - _KEYS)
        if unknown:
            raise ThresholdError(
                f"{here}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}"
            )
        known = by_name.get(name)
        if known is None:
            missing = [key for key in ("field", "action", "basis") if key not in settings]
            if missing:
                raise ThresholdError(
                    f"{here}: a new threshold needs {', '.join(missing)} "
                    f"(known thresholds: {', '.join(by_name)})"
                )
            known = Threshold(name, "", "crime_transfer", "")
        changes: dict[str, Any] = {}
        for key in ("field", "basis"):
            if key in settings:
                if not isinstance(settings[key], str) or not settings[key]:
                    raise ThresholdError(f"{here} {key}: expected a non-empty string")
                changes[key] = settings[key]
        if "action" in settings:
            if settings["action"] not in ACTIONS:
                raise ThresholdError(
                    f"{here} action: {settings['action']!r} is not one of {', '.join(ACTIONS)}"
                )
            changes["action"] = settings["action"]
        if "at_least" in settings:
            value = settings["at_least"]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ThresholdError(f"{here} at_least: expected a number ≥ 0, got {value!r}")
            changes["at_least"] = float(value)
        if "enabled" in settings:
            if not isinstance(settings["enabled"], bool):
                raise ThresholdError(f"{here} enabled: expected true or false")
            changes["enabled"] = settings["enabled"]
        by_name[name] = replace(known, **changes)
    return tuple(by_name.values())


def _number(value: Any, field: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ThresholdError(f"field {field!r}: expected a number, got {value!r}")
    try:
        number = float(value) if isinstance(value, int | float) else float(str(value).strip())
    except (ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise ThresholdError(f"field {field!r}: expected a number, got {str(value)[:40]!r}")
    return number


def _finding(value: Any, field: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int | float):
        return value != 0
    text = str(value).strip().lower()
    if text in _YES:
        return True
    if text in _NO:
        return False
    raise ThresholdError(f"field {field!r}: expected yes or no (true/false, 是/否), got {value!r}")


def classify(record: Mapping[str, Any], thresholds: Sequence[Threshold]) -> list[Met]:
    """The enabled thresholds ``record`` meets, in table order.

    A field the record lacks or leaves empty meets nothing: a penalty record holds only the
    measurements its case had.

    :raises ThresholdError: a field holds something that is not a number or a yes/no.
    """
    met: list[Met] = []
    for threshold in thresholds:
        if not threshold.enabled:
            continue
        value = record.get(threshold.field)
        if threshold.at_least is None:
            if _finding(value, threshold.field):
                met.append(Met(threshold, value))
            continue
        number = _number(value, threshold.field)
        if number is not None and number >= threshold.at_least:
            met.append(Met(threshold, value))
    return met


def actions_of(met: Sequence[Met]) -> dict[Action, list[Met]]:
    """``met`` grouped by what it calls for: one crime transfer, one clue."""
    grouped: dict[Action, list[Met]] = {}
    for m in met:
        grouped.setdefault(m.action, []).append(m)
    return grouped
