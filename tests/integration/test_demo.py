"""`liandong demo`, the README's first command, as a new user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_demo_runs_the_scenario_and_verifies_the_audit_trail(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "sender and receiver hold the same envelope digest for every message: ok" in out
    assert "messages matched between sender and receiver: ok" in out
    assert "Demo finished" in out
    bundles = sorted(p.name for p in workdir.glob("*.audit-bundle"))
    assert bundles == [
        "140400-discipline.audit-bundle",
        "140400-ecology.audit-bundle",
        "140400-police.audit-bundle",
        "140400-procuratorate.audit-bundle",
    ]
    # The case story on the simulated clock: filed in time, the clue answered, the request
    # delayed, the recommendation reminded and escalated, then answered late.
    assert "ecology → police             crime_transfer    filed" in out
    assert "clue              feedback_sent" in out
    assert "evidence_request  completed" in out
    assert "escalated  recommendation.reply_urgent  responsible ecology  late by" in out
    assert "procuratorate → ecology      recommendation    replied" in out
    assert "督办 escalation" in out and "催办 reminder" in out
    # The bureau's enforcement system: the record over a threshold transferred by the plugin,
    # the quarter shared, and the one decided against found by the procuratorate (应移未移).
    assert "ecology plugin: 31号 (6.5 t hazardous waste ≥ 3 t) → crime transfer" in out
    assert "procuratorate: liandong report supervision finds 47号 (hidden pipe) 应移未移" in out
    assert "ecology → police             crime_transfer    filed          涉嫌污染环境罪" in out
    # Answered on arrival by a review rule; the quarterly-sharing clock closed by the sharing.
    assert "procuratorate's node: clue accepted (受理) on arrival by its review rule" in out
    assert "sharing clock (due 15 days after the quarter)" in out
