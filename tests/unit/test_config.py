"""Settings and secrets: generation, precedence, and refusal of weak secrets in production."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config import SecretsError, Settings, generate_secrets_file, load_secrets


def test_first_run_generates_strong_private_secrets(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    path = generate_secrets_file(settings)
    assert path == settings.secrets_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secrets = load_secrets(settings)
    assert len(secrets.admin_token) >= 32
    assert len(secrets.active_key) >= 32
    assert secrets.active_key_id in secrets.fingerprint_keys
    # A second run keeps what is there.
    assert generate_secrets_file(settings) is None
    assert load_secrets(settings) == secrets


def test_secrets_repr_hides_values(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    generate_secrets_file(settings)
    secrets = load_secrets(settings)
    shown = repr(secrets) + str(secrets)
    assert secrets.admin_token not in shown
    assert secrets.active_key.decode() not in shown


def test_environment_keys_take_precedence_and_need_an_active_key(tmp_path: Path) -> None:
    strong = "x" * 40
    settings = Settings(
        data_dir=tmp_path,
        admin_token=strong,
        fingerprint_keys={"old": "a" * 64, "new": "b" * 64},
        fingerprint_active_key="new",
    )
    secrets = load_secrets(settings)
    assert secrets.active_key_id == "new"
    assert secrets.active_key == b"b" * 64
    with pytest.raises(SecretsError, match="ACTIVE_KEY"):
        load_secrets(settings.model_copy(update={"fingerprint_active_key": None}))
    with pytest.raises(SecretsError, match="not a configured key id"):
        load_secrets(settings.model_copy(update={"fingerprint_active_key": "missing"}))


def test_keys_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The session's test stack exports its own keys; this test is about the file alone.
    monkeypatch.delenv("MODELPRINT_FINGERPRINT_KEYS", raising=False)
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": {"2026-q4": "c" * 64}, "active": "2026-q4"}))
    settings = Settings(data_dir=tmp_path, admin_token="t" * 40, fingerprint_keys_file=keys_file)
    assert load_secrets(settings).active_key_id == "2026-q4"
    both = Settings(
        data_dir=tmp_path,
        admin_token="t" * 40,
        fingerprint_keys_file=keys_file,
        fingerprint_keys={"k1": "d" * 64},
    )
    with pytest.raises(SecretsError, match="keep one of them"):
        load_secrets(both)


def test_missing_secrets_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match="modelprint up"):
        load_secrets(Settings(data_dir=tmp_path))


@pytest.mark.parametrize("weak", ["changeme", "secret", "short-token"])
def test_production_refuses_weak_admin_token(tmp_path: Path, weak: str) -> None:
    with pytest.raises(ValidationError, match="too weak"):
        Settings(env="production", data_dir=tmp_path, admin_token=weak)
    # The same value is accepted in dev mode.
    assert Settings(env="dev", data_dir=tmp_path, admin_token=weak).admin_token is not None


def test_production_refuses_weak_fingerprint_key(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="too weak"):
        Settings(env="production", data_dir=tmp_path, admin_token="t" * 40, fingerprint_keys={"k": "1234"})


def test_urls_are_validated_and_normalised(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql://u:p@db:5432/modelprint")
    assert settings.database_url == "postgresql+psycopg://u:p@db:5432/modelprint"
    with pytest.raises(ValidationError, match="postgresql://"):
        Settings(data_dir=tmp_path, database_url="sqlite:///x.db")
    with pytest.raises(ValidationError, match="redis://"):
        Settings(data_dir=tmp_path, redis_url="http://localhost:6379")


def test_settings_read_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRINT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MODELPRINT_GATEWAY_PORT", "9100")
    monkeypatch.setenv("MODELPRINT_FINGERPRINT_KEYS", '{"k9": "' + "d" * 64 + '"}')
    settings = Settings()
    assert settings.gateway_port == 9100
    assert settings.data_dir == tmp_path.resolve()
    assert list(settings.fingerprint_keys) == ["k9"]


def test_service_processes_cap_their_blas_thread_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    from modelprint.cli import BLAS_THREAD_VARIABLES, limit_blas_threads

    for variable in BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with threadpool_limits(limits=2):  # restores this process's pools afterwards
        limit_blas_threads(1)
        assert {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"} == {1}
    assert all(os.environ[variable] == "1" for variable in BLAS_THREAD_VARIABLES)


@pytest.mark.parametrize(("visibility", "mutex"), [(5, 5), (300, 60), (1, 5)])
def test_a_dead_sweeper_cannot_block_redelivery_for_long(visibility: int, mutex: int) -> None:
    from shared.celery_app import create_celery_app

    settings = Settings(redis_url="redis://127.0.0.1:1/0", broker_visibility_timeout=visibility)
    options = create_celery_app(settings).conf.broker_transport_options
    # kombu's restore sweep holds a Redis mutex; a worker killed while holding it would otherwise stop
    # every redelivery for kombu's default of 300 s.
    assert options["unacked_mutex_expire"] == mutex
    assert options["unacked_restore_interval"] <= max(1, visibility // 2)
