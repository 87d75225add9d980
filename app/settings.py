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

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from clip_model import DEFAULT_LONG_TEXT, InferencePrecision, LongText, Placement, parse_device, resolve_placement
from clip_model.device import DEFAULT_DEVICE
from indexer.store.reader import ENV_PREFIX

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
        description="registry name or checkpoint path; default: the model the published index was built with. "
        "Pinning it refuses indexes of other weights",
    )
    arch: str | None = Field(None, description="architecture config for checkpoint files that do not carry one")
    image_root: Path | None = Field(None, description="image folder; default: the folder of the last indexer run")
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="thumbnail cache",
        json_schema_extra={"shown_default": "`$XDG_CACHE_HOME/clip-search` or `~/.cache/clip-search`"},
    )

    host: str = Field("127.0.0.1", description="address to listen on (`0.0.0.0`: every interface)")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    limit_concurrency: int = Field(256, ge=1, description="open connections before uvicorn answers 503")
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools", description="uvicorn's HTTP/1.1 parser: httptools (C, the default) or the pure-Python h11"
    )

    api_key: SecretStr | None = Field(
        None, description="if set, every `/api` request needs it in `X-API-Key` (or `?api_key=` for `<img>` tags)"
    )
    admin_api_key: SecretStr | None = Field(None, description="if set, admin endpoints need it; else they are off")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS; empty: CORS off"
    )

    max_upload_bytes: int = Field(20 * MIB, ge=1024, description="largest request body, counted as it arrives")
    max_image_pixels: int = Field(
        90_000_000,
        ge=1,
        description="uploads with more pixels are refused as decompression bombs; thumbnails of larger files get 409",
    )
    max_text_chars: int = Field(1000, ge=1, le=100_000, description="longest query text, in characters")
    default_k: int = Field(20, ge=1, le=1000, description="results of a search that does not give `k`")
    max_labels: int = Field(100, ge=1, le=100, description="zero-shot labels (and candidate texts) per request")
    max_templates: int = Field(80, ge=1, le=80, description="zero-shot prompt templates per request")

    precision: InferencePrecision | None = Field(
        None,
        description="encoder arithmetic: fp32 (float32; on the CPU through oneDNN-packed matmuls), int8 (int8 linear "
        "layers, CPU only: faster, and an fp32-built index still works; see docs/performance.md) or fp16 (CUDA "
        "only); unset: fp32 on the CPU, fp16 on CUDA",
    )
    device: str = Field(
        DEFAULT_DEVICE,
        description="where the encoders run: `auto` (CUDA where torch finds it, else the CPU), `cpu`, `cuda` or "
        "`cuda:N`; a device this machine lacks, or a precision it cannot run (int8 on CUDA, fp16 on the CPU), is "
        "refused at start; see docs/deployment.md",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch and FAISS threads of the inference thread (every other thread uses one); 0: one per core",
    )
    compile_text: bool = Field(
        False,
        description="compile the text tower with `torch.compile` in the background (needs a C++ compiler such as "
        "`g++`; eager until it is done, `/api/stats` shows `text_encoder`); see docs/performance.md",
    )
    inference_queue: int = Field(
        32,
        ge=1,
        description="encoder jobs waiting at most (keep below the 40 threads of the request pool); beyond: 503",
    )
    text_batch_size: int = Field(64, ge=1, description="most texts encoded in one call (micro-batching)")
    text_cache_size: int = Field(4096, ge=0, description="text embeddings kept in the LRU cache")
    long_text: LongText = Field(
        DEFAULT_LONG_TEXT,
        description="text longer than the model's context: `truncate` it, or `chunk` it into overlapping windows "
        "whose embeddings are averaged; each request may override it (`long_text`)",
    )
    thumbnail_size: Literal[64, 128, 256, 512, 1024] = Field(
        256, description="default thumbnail side in pixels (64, 128, 256, 512 or 1024)"
    )
    reload_interval_s: float = Field(2.0, gt=0, description="how often the published generation is checked")

    log_format: Literal["text", "json"] = Field(
        "text", description="`json` writes one object per line; every line carries the request id (`X-Request-ID`)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="least severe level logged")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str, info: ValidationInfo) -> str:
        resolve_placement(value, info.data.get("precision"))  # ValueError naming the settings: this machine refuses
        return parse_device(value)

    def placement(self) -> Placement:
        """Where the encoders run on this machine, and in which arithmetic (:mod:`clip_model.device`)."""
        return resolve_placement(self.device, self.precision)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value


def settings_table() -> str:
    """The settings as the Markdown table docs/serving.md shows (``scripts/settings_doc.py`` writes it there)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "shown_default" in extra:
            default = str(extra["shown_default"])
        elif field.is_required():
            default = "(required)"
        elif field.default is None or field.default_factory is not None:
            default = ""
        else:
            default = f"`{str(field.default).lower() if isinstance(field.default, bool) else field.default}`"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows) + "\n"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()  # index_dir comes from the environment (a ValidationError names it when missing)
