"""The crime-threshold table: legal defaults, config changes, and records that do not fit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from node.exchange.thresholds import (
    LEGAL_THRESHOLDS,
    Threshold,
    ThresholdError,
    actions_of,
    classify,
    thresholds_from_config,
)


def names(
    record: dict[str, object], thresholds: Sequence[Threshold] = LEGAL_THRESHOLDS
) -> list[str]:
    return [m.threshold.name for m in classify(record, thresholds)]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"hazardous_waste_tonnes": 3}, ["hazardous_waste"]),
        ({"hazardous_waste_tonnes": "2.99"}, []),
        (
            {"heavy_metal_multiple": 3.5, "hidden_discharge": "是"},
            ["heavy_metals", "hidden_discharge"],
        ),
        ({"penalties_within_two_years": 2}, ["repeat_offence"]),
        ({"penalties_within_two_years": 1}, []),
        ({"monitoring_data_falsified": True}, ["monitoring_data"]),
        ({"protected_zone": "no", "public_interest_damage": "yes"}, ["public_interest"]),
        ({"hazardous_waste_tonnes": "", "protected_zone": None}, []),  # not measured
    ],
)
def test_the_legal_defaults(record: dict[str, object], expected: list[str]) -> None:
    assert names(record) == expected


def test_a_record_meeting_both_kinds_calls_for_a_transfer_and_a_clue() -> None:
    met = classify({"hazardous_waste_tonnes": 8, "public_interest_damage": 1}, LEGAL_THRESHOLDS)
    grouped = actions_of(met)
    assert sorted(grouped) == ["clue", "crime_transfer"]
    assert "8" in grouped["crime_transfer"][0].describe()
    assert "三吨以上" in grouped["crime_transfer"][0].describe()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"hazardous_waste_tonnes": "lots"}, "field 'hazardous_waste_tonnes': expected a number"),
        ({"hazardous_waste_tonnes": True}, "expected a number"),
        ({"hidden_discharge": "perhaps"}, "field 'hidden_discharge': expected yes or no"),
    ],
)
def test_a_value_that_is_neither_a_number_nor_yes_no_is_named(
    record: dict[str, object], message: str
) -> None:
    with pytest.raises(ThresholdError, match=message):
        classify(record, LEGAL_THRESHOLDS)


def test_config_changes_switches_off_and_adds_thresholds() -> None:
    thresholds = thresholds_from_config(
        {
            "hazardous_waste": {"at_least": 1},
            "repeat_offence": {"enabled": False},
            "wildlife": {"field": "protected_species", "action": "clue", "basis": "野生动物"},
        },
        where="[plugins.ecology.thresholds]",
    )
    assert names({"hazardous_waste_tonnes": 1.5}, thresholds) == ["hazardous_waste"]
    assert names({"penalties_within_two_years": 5}, thresholds) == []
    assert names({"protected_species": "是"}, thresholds) == ["wildlife"]
    assert names({"hazardous_waste_tonnes": 1.5}) == []  # the defaults are untouched


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"hazardous_waste": {"at_lest": 1}},
            r"\[plugins.ecology.thresholds.hazardous_waste\]: unknown key\(s\) at_lest",
        ),
        ({"hazardous_waste": {"at_least": "three"}}, "at_least: expected a number"),
        (
            {"hazardous_waste": {"action": "arrest"}},
            "action: 'arrest' is not one of crime_transfer, clue",
        ),
        ({"new_one": {"field": "x"}}, "a new threshold needs action, basis"),
        ({"hazardous_waste": 3}, "expected a table"),
        ({"hazardous_waste": {"enabled": "no"}}, "enabled: expected true or false"),
    ],
)
def test_a_bad_threshold_table_is_named(table: dict[str, object], message: str) -> None:
    with pytest.raises(ThresholdError, match=message):
        thresholds_from_config(table, where="[plugins.ecology.thresholds]")
