"""ruff, mypy, the generated-code check and the migration check are part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from node.store.db import Base, make_engine, upgrade

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_check() -> None:
    result = run("ruff", "check", "node", "plugins", "tests", "bench", "dev")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run("ruff", "format", "--check", "node", "plugins", "tests", "bench", "dev")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_node_and_plugins() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_protobuf_modules_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "dev" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr


def test_migrations_match_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'check.db'}")
    upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == [], "run: alembic revision --autogenerate (see node/store/migrations)"
