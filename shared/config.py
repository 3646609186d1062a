"""Settings shared by every service (pydantic-settings, prefix MODELPRINT_) and secret handling."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.fingerprint import DEFAULT_SCHEME, SCHEMES

SECRETS_FILE_NAME = "secrets.json"
MIN_SECRET_LENGTH = 32
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "change-me", "changethis", "secret", "password", "admin", "token", "test", "example", "key"}
)


class SecretsError(ValueError):
    """A secret is missing, too weak for production, or unreadable."""


class Settings(BaseSettings):
    """Every setting of every service; each service reads the fields it needs."""

    model_config = SettingsConfigDict(env_prefix="MODELPRINT_", extra="ignore", validate_default=True)

    env: Literal["dev", "production"] = "dev"
    data_dir: Path = Path(".modelprint")

    # External servers; when unset, `modelprint up` starts embedded ones.
    redis_url: str | None = None
    database_url: str | None = None

    admin_token: SecretStr | None = None
    fingerprint_keys: dict[str, SecretStr] = Field(default_factory=dict)
    fingerprint_keys_file: Path | None = None
    fingerprint_active_key: str | None = None

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    auditor_host: str = "127.0.0.1"
    auditor_port: int = Field(default=8001, ge=0, le=65535)

    # The fingerprint scheme: applied by inference workers, recomputed by scans. Its strength alpha
    # defaults to the scheme's own (0.2 for hmac-all-classes, the paper's 0.08 for hmac-second-class).
    fingerprint_scheme: str = DEFAULT_SCHEME
    fingerprint_alpha: float | None = Field(default=None, gt=0.0, le=1.0)

    # Threads of the BLAS / OpenMP pools (numpy, scikit-learn) in each service process. Services scale
    # with processes; a second BLAS thread per process only spin-waits for work under load (measured:
    # half the inference worker's CPU with two threads per process on two cores).
    blas_threads: int = Field(default=1, ge=1, le=256)

    # Celery / broker behaviour: an unacknowledged message returns to its queue after this long.
    broker_visibility_timeout: int = Field(default=300, ge=1)

    # Embedded servers (only used when the URLs above are unset); 0 picks a free port.
    embedded_redis_port: int = Field(default=0, ge=0, le=65535)
    embedded_postgres_port: int = Field(default=0, ge=0, le=65535)

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Celery's two INFO lines per task ("received", "succeeded"): off by default, as at 200 jobs/s they
    # are about 100 KB/s of log per worker and a few % of its CPU; failures and retries are always logged.
    log_each_task: bool = False

    @field_validator("fingerprint_scheme")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value not in SCHEMES:
            raise ValueError(f"unknown fingerprint scheme {value!r}; known: {', '.join(sorted(SCHEMES))}")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _sqlalchemy_driver(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ValueError("MODELPRINT_DATABASE_URL must be a postgresql:// URL")
        for prefix in ("postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("MODELPRINT_REDIS_URL must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _production_secrets(self) -> Settings:
        if self.env == "production":
            if self.admin_token is not None:
                check_secret_strength("MODELPRINT_ADMIN_TOKEN", self.admin_token.get_secret_value())
            for key_id, secret in self.fingerprint_keys.items():
                check_secret_strength(f"fingerprint key {key_id!r}", secret.get_secret_value())
        return self

    @property
    def secrets_path(self) -> Path:
        return self.data_dir / SECRETS_FILE_NAME

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    @property
    def auditor_url(self) -> str:
        return f"http://{self.auditor_host}:{self.auditor_port}"

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("MODELPRINT_REDIS_URL is not set (start the stack with `modelprint up`)")
        return self.redis_url

    def require_database_url(self) -> str:
        if not self.database_url:
            raise RuntimeError("MODELPRINT_DATABASE_URL is not set (start the stack with `modelprint up`)")
        return self.database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, built once per process."""
    return Settings()


def check_secret_strength(name: str, value: str) -> None:
    """Refuse short or placeholder secrets (used in production mode)."""
    if value.strip().lower() in PLACEHOLDER_SECRETS or len(value) < MIN_SECRET_LENGTH:
        raise SecretsError(
            f"{name} is too weak for MODELPRINT_ENV=production: use at least {MIN_SECRET_LENGTH} random "
            "characters (for example `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )


@dataclass(frozen=True)
class Secrets:
    """Resolved secret material; never logged, never returned by an API."""

    admin_token: str
    fingerprint_keys: dict[str, bytes]
    active_key_id: str

    def __repr__(self) -> str:
        return f"Secrets(key_ids={sorted(self.fingerprint_keys)}, active_key_id={self.active_key_id!r})"

    @property
    def active_key(self) -> bytes:
        return self.fingerprint_keys[self.active_key_id]


def _read_json_object(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SecretsError(f"cannot read secrets from {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SecretsError(f"{path} must hold a JSON object")
    return data


def generate_secrets_file(settings: Settings) -> Path | None:
    """Create the data dir's secrets file (mode 0600) for whatever is not configured; None if not needed."""
    path = settings.secrets_path
    if path.exists():
        return None
    need_token = settings.admin_token is None
    need_keys = not settings.fingerprint_keys and settings.fingerprint_keys_file is None
    if not (need_token or need_keys):
        return None
    content: dict[str, object] = {}
    if need_token:
        content["admin_token"] = secrets.token_urlsafe(32)
    if need_keys:
        key_id = "k1"
        content["fingerprint_keys"] = {key_id: secrets.token_hex(32)}
        content["fingerprint_active_key"] = key_id
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(content, handle, indent=2)
    return path


def load_secrets(settings: Settings) -> Secrets:
    """Resolve secrets: environment first, then the keys file, then the data dir's secrets file."""
    stored: dict[str, object] = (
        _read_json_object(settings.secrets_path) if settings.secrets_path.exists() else {}
    )

    if settings.admin_token is not None:
        admin_token = settings.admin_token.get_secret_value()
    elif isinstance(stored.get("admin_token"), str):
        admin_token = str(stored["admin_token"])
    else:
        raise SecretsError(
            "no admin token: set MODELPRINT_ADMIN_TOKEN or run `modelprint up` once to generate one "
            f"in {settings.secrets_path}"
        )

    keys: dict[str, str] = {}
    active: str | None = settings.fingerprint_active_key
    if settings.fingerprint_keys and settings.fingerprint_keys_file is not None:
        # Silently preferring one would answer with keys the operator did not mean to use.
        raise SecretsError(
            "both MODELPRINT_FINGERPRINT_KEYS and MODELPRINT_FINGERPRINT_KEYS_FILE are set; keep one of them"
        )
    if settings.fingerprint_keys:
        keys = {key_id: secret.get_secret_value() for key_id, secret in settings.fingerprint_keys.items()}
    elif settings.fingerprint_keys_file is not None:
        file_content = _read_json_object(settings.fingerprint_keys_file)
        raw_keys = file_content.get("keys", file_content)
        if not isinstance(raw_keys, dict):
            raise SecretsError(f"{settings.fingerprint_keys_file}: 'keys' must map key ids to secrets")
        keys = {str(key_id): str(secret) for key_id, secret in raw_keys.items() if key_id != "active"}
        active = active or (str(file_content["active"]) if "active" in file_content else None)
    elif isinstance(stored_keys := stored.get("fingerprint_keys"), dict):
        keys = {str(k): str(v) for k, v in stored_keys.items()}
        stored_active = stored.get("fingerprint_active_key")
        active = active or (str(stored_active) if stored_active else None)
    if not keys:
        raise SecretsError(
            "no fingerprint key: set MODELPRINT_FINGERPRINT_KEYS (JSON: key id -> secret), "
            "MODELPRINT_FINGERPRINT_KEYS_FILE, or run `modelprint up` once to generate one"
        )
    if active is None:
        if len(keys) > 1:
            raise SecretsError(
                "several fingerprint keys are configured: set MODELPRINT_FINGERPRINT_ACTIVE_KEY"
            )
        active = next(iter(keys))
    if active not in keys:
        raise SecretsError(
            f"MODELPRINT_FINGERPRINT_ACTIVE_KEY names {active!r}, which is not a configured key id"
        )

    if settings.env == "production":
        check_secret_strength("admin token", admin_token)
        for key_id, secret in keys.items():
            check_secret_strength(f"fingerprint key {key_id!r}", secret)
    return Secrets(
        admin_token=admin_token,
        fingerprint_keys={key_id: secret.encode("utf-8") for key_id, secret in keys.items()},
        active_key_id=active,
    )
