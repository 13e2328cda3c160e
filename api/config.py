"""The service's settings: one object, read once from ``GT_*`` environment variables.

Defaults are the embedded ones (SQLite and kombu's SQLAlchemy transport under ``GT_DATA_DIR``); production
sets ``GT_DATABASE_URL=postgresql+psycopg://...`` and ``GT_BROKER_URL=redis://...``. Nothing else in the
project reads ``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from greencore.spec import EnergySettings

# Settings whose default is derived from others (None given for one means that default).
DERIVED = ("models_dir", "artifacts_dir", "database_url", "broker_url", "rate_limit_storage_url", "api_url")
MIN_KEY_CHARS = 24  # a bootstrap key shorter than this is refused at start: it would be guessable


class Settings(BaseSettings):
    """Every setting of the service and of the ``greentrainer`` command; env var = ``GT_`` + upper-case
    name."""

    model_config = SettingsConfigDict(env_prefix="GT_", extra="ignore")

    # Where things live.
    data_dir: Path = Field(Path(".greentrainer"), description="root of the embedded default's files")
    # Unset, the paths and URLs below are derived from the settings declared above them (validated first).
    models_dir: Path = Field(
        default_factory=lambda s: s["data_dir"] / "models",
        description="base models, one Hugging Face folder each (default DATA_DIR/models)",
    )
    artifacts_dir: Path = Field(
        default_factory=lambda s: s["data_dir"] / "artifacts",
        description="uploads and checkpoints (default DATA_DIR/artifacts)",
    )
    database_url: str = Field(
        default_factory=lambda s: f"sqlite:///{s['data_dir'] / 'greentrainer.db'}",
        description="SQLAlchemy URL (default sqlite:///DATA_DIR/greentrainer.db)",
    )
    broker_url: str = Field(
        default_factory=lambda s: f"sqla+sqlite:///{s['data_dir'] / 'broker.db'}",
        description="Celery broker (default sqla+sqlite:///DATA_DIR/broker.db)",
    )
    broker_prefix: str = Field(
        "", description="prefix of every Redis key, to share one Redis between deployments"
    )

    # The HTTP server.
    host: str = Field("127.0.0.1", description="address `greentrainer serve` binds")
    port: int = Field(8000, ge=1, le=65535, description="port `greentrainer serve` listens on")
    bootstrap_api_key: SecretStr | None = Field(None, description="a key valid for tenant `default`")
    demo_model: str = Field(
        "demo-tiny", description="name of the demo model created when MODELS_DIR is empty"
    )
    max_upload_bytes: int = Field(1 << 30, gt=0, description="largest dataset upload, bytes")
    # Datasets (docs/api.md, "Dataset limits"): refused with 400 naming the line where a limit is crossed.
    max_dataset_line_bytes: int = Field(
        1 << 20, gt=0, description="longest line of a dataset, bytes (its newline not counted)"
    )
    max_dataset_examples: int = Field(1_000_000, gt=0, description="examples (non-blank lines) of a dataset")
    max_dataset_tokens: int = Field(
        100_000_000,
        gt=0,
        description="tokens of a dataset's text, counted with the tokenizer of the upload's or the job's "
        "model",
    )
    dataset_threads: int = Field(
        2,
        ge=1,
        description="datasets validated or tokenized at once per API process (uploads, estimates, jobs)",
    )
    estimate_cache_tokens: int = Field(
        20_000_000,
        ge=0,
        description="token ids of tokenized datasets the estimates keep in memory per API process (0: none)",
    )
    max_body_bytes: int = Field(
        1 << 20, gt=0, description="largest request body other than an upload, bytes (413 past it)"
    )
    max_active_jobs: int = Field(
        10, ge=1, description="jobs a tenant may have validating, queued or running at once"
    )
    db_pool_size: int = Field(10, ge=1, description="database connections kept per process")
    access_log: bool = Field(False, description="log every HTTP request (uvicorn's access log)")
    forwarded_allow_ips: str = Field(
        "127.0.0.1,::1",
        description="comma-separated addresses or networks (or '*') whose X-Forwarded-For/-Proto headers "
        "`greentrainer serve` trusts for the client's address (uvicorn's default)",
    )

    # Rate limits, per minute; 0 = unlimited (docs/api.md, "Rate limits").
    rate_limit_key_per_min: int = Field(600, ge=0, description="requests one API key may make per minute")
    rate_limit_tenant_per_min: int = Field(
        1200, ge=0, description="requests one tenant may make per minute, all its keys together"
    )
    rate_limit_estimates_per_min: int = Field(
        30, ge=0, description="estimates (each profiles a model) one tenant may ask for per minute"
    )
    rate_limit_failed_auth_per_min: int = Field(
        20, ge=0, description="requests with a wrong API key one client address may make per minute"
    )
    rate_limit_storage_url: str = Field(
        default_factory=lambda s: s["broker_url"] if _is_redis(s["broker_url"]) else "memory://",
        description="where the rate-limit counters live: redis://, rediss:// or memory:// (per process; "
        "default the broker's Redis, else memory://)",
    )

    # The client commands (`greentrainer files|jobs ...`).
    api_url: str = Field(
        default_factory=lambda s: f"http://{_reachable(s['host'])}:{s['port']}",
        description="base URL the client commands call (default http://HOST:PORT)",
    )
    api_key: SecretStr | None = Field(None, description="API key the client commands send")

    # The worker.
    train_device: str | None = Field(
        None, description="'cuda' or 'cpu' for training; unset: CUDA when present"
    )
    cancel_poll_s: float = Field(
        1.0, gt=0, description="how often a running job reads its state (cancel, heartbeat)"
    )
    heartbeat_stale_s: float = Field(
        300.0,
        gt=0,
        description="a running job whose heartbeat is older has lost its worker: it is queued again",
    )
    max_attempts: int = Field(3, ge=1, description="times a job may be started before a lost worker fails it")
    stall_timeout_s: float = Field(
        3600.0,
        ge=0,
        description="a run with no training step for this long is killed and its job queued again, or "
        "failed `stalled` after GT_MAX_ATTEMPTS starts (0: never)",
    )
    recovery_interval_s: float = Field(
        60.0, gt=0, description="how often each worker looks for silent jobs and jobs the broker lost"
    )
    visibility_timeout_s: int = Field(
        7 * 24 * 3600, gt=0, description="Redis redelivers an unacknowledged job after this long"
    )
    worker_pool: str = Field("prefork", description="Celery pool of `greentrainer worker` (prefork or solo)")
    worker_nproc: int = Field(
        1,
        ge=1,
        le=1024,
        description="ranks each job of this worker runs as (torchrun on this machine: one per GPU with NCCL, "
        "or gloo processes on a CPU); the worker process keeps the heartbeat, cancel and database writes",
    )

    # The device profile behind estimates (and energy when no counter is readable).
    device_name: str = Field("cpu", description="name of the device profile")
    device_peak_flops: float = Field(1.0e12, gt=0, description="peak FLOP/s of the device")
    device_utilization: float = Field(0.3, gt=0, le=1, description="share of peak reached in training")
    device_watts: float = Field(65.0, gt=0, description="power drawn while training, W")
    device_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="the device's memory, bytes: a job whose estimated peak exceeds it is refused "
        "(insufficient_memory); a CPU worker's limit (unset: the host's available memory; a CUDA worker uses "
        "the smaller of this and its free memory)",
    )
    carbon_intensity_g_per_kwh: float = Field(475.0, ge=0, description="grid intensity, gCO2e/kWh")
    pue: float = Field(1.0, ge=1, description="data-centre power usage effectiveness")

    @field_validator("bootstrap_api_key", "api_key", "train_device", "device_memory_bytes", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # `GT_X=` in a compose file means "not set"

    @field_validator("bootstrap_api_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_KEY_CHARS:
            raise ValueError(f"GT_BOOTSTRAP_API_KEY must have at least {MIN_KEY_CHARS} characters")
        return value

    @field_validator("rate_limit_storage_url")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        if not (value == "memory://" or _is_redis(value)):
            raise ValueError("GT_RATE_LIMIT_STORAGE_URL must be memory:// or a redis:// or rediss:// URL")
        return value

    @field_validator("worker_pool")
    @classmethod
    def _known_pool(cls, value: str) -> str:
        if value not in ("prefork", "solo"):
            raise ValueError("GT_WORKER_POOL must be 'prefork' or 'solo'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _none_is_derived(cls, values: object) -> object:
        # Settings(database_url=None) means "the default", as leaving it out does.
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if not (k in DERIVED and v is None)}
        return values

    @field_validator("data_dir", "models_dir", "artifacts_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def energy(self) -> EnergySettings:
        """The device profile and carbon settings as greencore takes them, whole (training and estimates)."""
        return EnergySettings(
            carbon_intensity_g_per_kwh=self.carbon_intensity_g_per_kwh,
            pue=self.pue,
            device_name=self.device_name,
            peak_flops=self.device_peak_flops,
            utilization=self.device_utilization,
            watts=self.device_watts,
        )

    @property
    def embedded(self) -> bool:
        """True on the embedded default (SQLite database)."""
        return str(self.database_url).startswith("sqlite")

    def ensure_dirs(self) -> None:
        """Create the data, models and artifacts folders."""
        for path in (self.data_dir, self.models_dir, self.artifacts_dir):
            path.mkdir(parents=True, exist_ok=True)


def _is_redis(url: str) -> bool:
    """Whether ``url`` is a Redis server's (redis:// or rediss://)."""
    return url.startswith(("redis://", "rediss://"))


def _reachable(host: str) -> str:
    """An address clients on this machine reach a server bound to ``host`` at."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read once."""
    return Settings()
