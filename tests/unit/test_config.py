"""Config errors name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, default_plugins, load_config, render_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_rendered_config_loads_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, render_config(agency="140400/police", listen="127.0.0.1:7002"))
    config = load_config(path)
    assert config.agency == "140400/police"
    assert config.signing_key == tmp_path / "keys" / "signing.key"
    assert config.database_url == f"sqlite:///{tmp_path / 'node.db'}"
    assert config.limits.clock_skew_seconds == 300
    assert default_plugins(config) == ("police",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[node]\nagency = "140400/ecolgy"\nlisten = "h:1"\n', "key 'node.agency'"),
        ('[node]\nagency = "140400/ecology"\n', "missing key 'node.listen'"),
        ('[node]\nagency = "140400/ecology"\nlisten = "nohost"\n', "'nohost' is not HOST:PORT"),
        (
            '[node]\nagency = "140400/ecology"\nlisten = "h:1"\ncolour = 1\n',
            "unknown key 'node.colour'",
        ),
        (
            '[node]\nagency = "140400/ecology"\nlisten = "h:1"\n[limits]\nmax_recipients = "x"\n',
            "'limits.max_recipients' must be a number",
        ),
        ('[node]\nagency = "140400/ecology"\nlisten = "h:1"\n[spam]\n', "unknown section [spam]"),
        ("[node\n", "not valid TOML"),
        (
            '[node]\nagency = "140400/ecology"\nlisten = "h:1"\n[delivery]\nconcurrency = 0.5\n',
            "'delivery.concurrency' must be at least 1",
        ),
        (
            '[node]\nagency = "140400/ecology"\nlisten = "h:1"\npoll_seconds = 0\n',
            "'node.poll_seconds' must be greater than 0",
        ),
        (
            '[node]\nagency = "140400/ecology"\nlisten = "h:1"\n[logging]\nlevel = "loud"\n',
            "'logging.level' must be",
        ),
        (
            '[node]\nagency = "140400/procuratorate"\nlisten = "h:1"\n'
            '[deadlines]\nsharing_from = ["140400/ecolgy"]\n',
            "key 'deadlines.sharing_from'",
        ),
        (
            '[node]\nagency = "140400/procuratorate"\nlisten = "h:1"\n'
            '[deadlines]\nsharing_from = "140400/ecology"\n',
            "'deadlines.sharing_from' must be a list of agency ids",
        ),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"config {path}:")
    assert message in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_the_peer_port_limits_are_read_and_checked(tmp_path: Path) -> None:
    from node.config import Limits

    base = '[node]\nagency = "140400/ecology"\nlisten = "h:1"\n[limits]\n'
    limits = load_config(
        write(tmp_path, base + "peer_streams = 3\nfirst_message_seconds = 2.5\n")
    ).limits
    assert (limits.peer_streams, limits.first_message_seconds) == (3, 2.5)
    assert limits.peer_calls == Limits().peer_calls
    with pytest.raises(ConfigError, match=r"'limits\.peer_calls' must be at least 1"):
        load_config(write(tmp_path, base + "peer_calls = 0\n"))
    with pytest.raises(ConfigError, match=r"'limits\.max_pending_upload_bytes' must be at least"):
        load_config(write(tmp_path, base + "max_pending_upload_bytes = 1000\n"))
