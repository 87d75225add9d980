"""The server's settings: one pydantic-settings class, read from ``CLIPSEARCH_*`` environment variables (and an
optional ``.env`` file). The indexer's CLI reads the same names (``CLIPSEARCH_INDEX_DIR``, ``CLIPSEARCH_MODEL``,
``CLIPSEARCH_IMAGE_ROOT``), so one environment configures both.

Never instantiated at import: :func:`get_settings` builds it once, and tests pass their own to ``create_app``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CLIPSEARCH_"
MIB = 1 << 20


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/clip-search``, else ``~/.cache/clip-search`` (thumbnails live below it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clip-search"


class Settings(BaseSettings):
    """Every knob of the server. Environment variable = ``CLIPSEARCH_`` + the field name in upper case."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", env_ignore_empty=True, extra="ignore")

    index_dir: Path = Field(description="index directory written by `clip-index build`")
    model: str | None = Field(
        None,
        description="registry name or checkpoint path; default: the model the published index was built with",
    )
    arch: str | None = Field(None, description="architecture config for checkpoint files that do not carry one")
    image_root: Path | None = Field(None, description="image folder; default: the folder of the last indexer run")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="thumbnail cache")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    limit_concurrency: int = Field(256, ge=1, description="open connections before uvicorn answers 503")
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools", description="uvicorn's HTTP/1.1 parser: httptools (C, the default) or the pure-Python h11"
    )

    api_key: SecretStr | None = Field(None, description="if set, every /api request needs it (X-API-Key header)")
    admin_api_key: SecretStr | None = Field(None, description="if set, admin endpoints need it; else they are off")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS; empty: CORS off"
    )

    max_upload_bytes: int = Field(20 * MIB, ge=1024, description="largest request body, counted as it arrives")
    max_image_pixels: int = Field(90_000_000, ge=1, description="uploads with more pixels are refused (bombs)")
    max_text_chars: int = Field(1000, ge=1, le=100_000)
    default_k: int = Field(20, ge=1, le=1000)
    max_labels: int = Field(100, ge=1, le=100, description="zero-shot labels (and candidate texts) per request")
    max_templates: int = Field(80, ge=1, le=80, description="zero-shot prompt templates per request")

    precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="encoder arithmetic: fp32, or int8 (CPU: int8 linear layers, about 2x faster; embeddings stay "
        "compatible with an fp32-built index, measured in bench/README.md)",
    )
    torch_threads: int = Field(0, ge=0, description="torch and FAISS threads; 0 = one per core")
    compile_text: bool = Field(
        False,
        description="compile the text tower with torch.compile in the background (needs a C++ compiler; ~1 min of "
        "one core at start, eager until then): int8 text queries ~2x faster, see bench/README.md",
    )
    inference_queue: int = Field(
        32,
        ge=1,
        description="encoder jobs waiting at most (keep below the 40 threads of the request pool); beyond: 503",
    )
    text_batch_size: int = Field(64, ge=1, description="most texts encoded in one call (micro-batching)")
    text_cache_size: int = Field(4096, ge=0, description="text embeddings kept in the LRU cache")
    thumbnail_size: Literal[64, 128, 256, 512, 1024] = Field(256, description="default thumbnail side in pixels")
    reload_interval_s: float = Field(2.0, gt=0, description="how often the published generation is checked")

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()  # index_dir comes from the environment (a ValidationError names it when missing)
