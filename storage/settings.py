"""Configuration from ``COMPACTOR_`` environment variables (or an env file)."""

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COMPACTOR_", extra="ignore")

    # object store
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint; unset means AWS")
    s3_bucket: str = "compactor"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_path_style: bool = True
    s3_connect_timeout_s: float = 5.0
    s3_read_timeout_s: float = 60.0
    s3_max_attempts: int = Field(default=5, ge=1)
    multipart_threshold_bytes: int = Field(default=64 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipart_chunk_bytes: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipart_concurrency: int = Field(default=4, ge=1, le=64)

    # local working space
    cache_dir: Path = Path("/tmp/compactor-cache")

    # local layer cache: verified copies of layers; oldest files are evicted beyond this size
    cache_max_bytes: int = Field(default=20 * 1024**3, ge=0)

    # operations
    log_level: str = Field(default="WARNING", description="logging level of every process")
    metrics_port: int | None = Field(default=None, description="Prometheus exporter port; unset: no exporter")

    # redis: broker, job records, node lock
    redis_url: str = "redis://127.0.0.1:6379/0"

    # compaction
    target_layer_bytes: int = Field(default=128 * 1024 * 1024, ge=1)
    node_id: str | None = None

    # distributed jobs (compactor.worker.runtime.app, compactor.coordinator.jobs.scheduler); durations in seconds
    task_hard_time_limit_s: float = Field(default=4 * 3600.0, gt=0)
    task_soft_time_limit_s: float = Field(default=4 * 3600.0 - 300.0, gt=0)
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    heartbeat_timeout_s: float = Field(default=90.0, gt=0)
    no_progress_timeout_s: float = Field(default=1800.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    max_replans: int = Field(default=3, ge=0)
    lock_ttl_s: float = Field(default=60.0, gt=0)
    lock_retry_delay_s: float = Field(default=5.0, gt=0)
    l0_slots: int = Field(
        default=1,
        ge=1,
        le=64,
        description="L0-compaction and image-creation sub-jobs a node runs at once (beside gc's one)",
    )
    max_job_bytes: int = Field(default=4 * 1024**3, ge=1)
    breaker_failures: int = Field(default=3, ge=1, description="consecutive failed meta jobs that open the breaker")
    breaker_cooldown_s: float = Field(default=3600.0, ge=0)
    coordinator_interval_s: float = Field(default=10.0, gt=0)
    auto_trigger_kinds: str = Field(
        default="gc",
        pattern=r"^((gc|l0|image)(,(gc|l0|image))*)?$",
        description="job kinds the coordinator's auto-trigger starts, comma-separated (l0,image,gc: L0 first)",
    )
    redis_timeout_s: float = Field(default=5.0, gt=0)
    # orphan cleanup by the coordinator loop (compactor.coordinator.jobs.orphans); 0 turns the periodic run off
    orphan_interval_s: float = Field(default=3600.0, ge=0, description="seconds between orphan cleanups")
    orphan_grace_s: float = Field(default=6 * 3600.0, ge=0, description="minimum age of an orphan before deletion")
    worker_plugins: str = Field(
        default="",
        pattern=r"^([\w.]+:\w+(,[\w.]+:\w+)*)?$",
        description="worker plugins, comma-separated module:factory (compactor.worker.runtime.plugins)",
    )
