"""Settings: flag > environment > file > default, and errors that name the setting."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from relay.config import HostPort, Settings, env_name, load
from relay.errors import ConfigError

SECRET = {"PGRELAY_JWT_SECRET": "s" * 40}
README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_follow_the_design() -> None:
    s = load({}, SECRET)
    assert s.listen == HostPort("127.0.0.1", 8765)
    assert s.admin_listen == HostPort("127.0.0.1", 8766)
    assert s.subscriber_role == "relay_subscriber"


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    toml = tmp_path / "pgrelay.toml"
    toml.write_text(
        'listen = "127.0.0.1:1111"\nreplay_limit = 7\n'
        'allowed_origins = ["https://a.example", "https://b.example"]\n'
    )
    env = SECRET | {"PGRELAY_LISTEN": "127.0.0.1:2222"}
    s = load({"listen": "127.0.0.1:3333"}, env, str(toml))
    assert s.listen.port == 3333
    assert load({}, env, str(toml)).listen.port == 2222
    from_file = load({}, SECRET, str(toml))
    assert from_file.listen.port == 1111 and from_file.replay_limit == 7
    assert from_file.allowed_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PGRELAY_LISTEN": "8765"}, "PGRELAY_LISTEN"),
        ({"PGRELAY_LISTEN": "127.0.0.1:99999"}, "PGRELAY_LISTEN"),
        ({"PGRELAY_POOL_SIZE": "0"}, "PGRELAY_POOL_SIZE"),
        ({"PGRELAY_REPLAY_LIMIT": "lots"}, "PGRELAY_REPLAY_LIMIT"),
        ({"PGRELAY_JWT_LEEWAY_S": "-1"}, "PGRELAY_JWT_LEEWAY_S"),
        ({"PGRELAY_ALLOWED_ORIGINS": "app.example.com"}, "PGRELAY_ALLOWED_ORIGINS"),
        ({"PGRELAY_LOG_LEVEL": "loud"}, "PGRELAY_LOG_LEVEL"),
    ],
)
def test_a_malformed_value_names_its_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load({}, SECRET | env)


def test_no_key_to_verify_tokens_is_refused() -> None:
    with pytest.raises(ConfigError, match="PGRELAY_JWT_SECRET"):
        load({}, {})


def test_unknown_or_malformed_file_keys_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('listne = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load({}, SECRET, str(bad))
    bad.write_text("listen = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load({}, SECRET, str(bad))
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load({}, SECRET, str(tmp_path / "missing.toml"))


def test_readme_documents_every_setting() -> None:
    text = README.read_text()
    missing = [env_name(f.name) for f in fields(Settings) if env_name(f.name) not in text]
    assert missing == []


def test_a_renamed_setting_still_works_with_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    s = load({}, SECRET | {"PGRELAY_MAX_PENDING_BYTES": "100000"}, warn=warnings.append)
    assert s.max_outbox_bytes == 100_000
    assert warnings == ["PGRELAY_MAX_PENDING_BYTES is deprecated: use PGRELAY_MAX_OUTBOX_BYTES"]
    # The new name wins at the same level; a flag beats either in the environment.
    both = SECRET | {"PGRELAY_MAX_PENDING_BYTES": "100000", "PGRELAY_MAX_OUTBOX_BYTES": "200000"}
    assert load({}, both).max_outbox_bytes == 200_000
    assert load({"max_pending_bytes": "300000"}, both).max_outbox_bytes == 300_000
    toml = tmp_path / "old.toml"
    toml.write_text("max_pending_bytes = 123456\n")
    warnings.clear()
    assert load({}, SECRET, str(toml), warn=warnings.append).max_outbox_bytes == 123_456
    assert warnings == [f"max_pending_bytes (in {toml}) is deprecated: use max_outbox_bytes"]


def test_each_component_gets_its_limits_from_the_settings() -> None:
    s = load(
        {},
        SECRET
        | {
            "PGRELAY_MAX_MESSAGE_BYTES": "65536",
            "PGRELAY_MAX_OUTBOX_BYTES": "100000",
            "PGRELAY_REPLAY_LIMIT": "77",
            "PGRELAY_SLOW_CLIENT_TIMEOUT_S": "5",
            "PGRELAY_MAX_CONNECTIONS_PER_USER": "3",
        },
    )
    assert s.ws_limits().max_message_bytes == 65536
    assert s.output_limits().outbox.max_bytes == 100_000
    assert s.output_limits().transport_bytes == s.ws_limits().max_unsent_bytes
    assert s.output_limits().max_stall_s == 5.0
    assert s.session_limits().catch_up.replay_limit == 77
    assert s.admission_limits().max_connections_per_user == 3


@pytest.mark.parametrize("value", ["100", "2000000"])
def test_the_message_size_limit_is_bounded(value: str) -> None:
    with pytest.raises(ConfigError, match="PGRELAY_MAX_MESSAGE_BYTES"):
        load({}, SECRET | {"PGRELAY_MAX_MESSAGE_BYTES": value})


def test_workers_default_to_one_and_auto_means_one_per_usable_core(tmp_path: Path) -> None:
    import os

    assert load({}, SECRET).workers == 1
    assert load({}, SECRET | {"PGRELAY_WORKERS": "3"}).workers == 3
    assert load({"workers": "auto"}, SECRET).workers == len(os.sched_getaffinity(0))
    assert load({}, SECRET | {"PGRELAY_WORKERS": "AUTO"}).workers == len(os.sched_getaffinity(0))
    toml = tmp_path / "pgrelay.toml"
    toml.write_text("workers = 2\n")
    assert load({}, SECRET, str(toml)).workers == 2
    toml.write_text('workers = "auto"\n')
    assert load({}, SECRET, str(toml)).workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_a_bad_number_of_workers_names_the_setting(value: str) -> None:
    with pytest.raises(ConfigError, match="PGRELAY_WORKERS"):
        load({}, SECRET | {"PGRELAY_WORKERS": value})
