"""``clip-serve``: run the search server with uvicorn (settings from ``CLIPSEARCH_*`` variables and flags).

Exit codes: 0 after a clean shutdown, 1 when the server cannot start (the message says why), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clip_model import INFERENCE_PRECISIONS
from clip_model.device import DEVICE_CHOICES
from indexer.store.reader import ENV_PREFIX

from .logs import configure_logging
from .settings import Settings

logger = logging.getLogger("app")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-serve",
        description="Serve semantic image search over an index directory built by clip-index. Every option also "
        f"reads {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}INDEX_DIR); flags win.",
    )
    parser.add_argument("--index-dir", type=Path, help="index directory ($CLIPSEARCH_INDEX_DIR)")
    parser.add_argument("--model", help="model name or checkpoint path (default: the one the index was built with)")
    parser.add_argument("--arch", help="architecture config for checkpoint files that do not carry one")
    parser.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        help="encoder arithmetic: int8 on the CPU only, fp16 on CUDA only (default: fp32 on the CPU, fp16 on CUDA)",
    )
    parser.add_argument(
        "--device", help=f"where the encoders run: {', '.join(DEVICE_CHOICES)} (default auto: CUDA where there is some)"
    )
    parser.add_argument(
        "--compile-text",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the text tower in the background (needs a C++ compiler; default off)",
    )
    parser.add_argument("--image-root", type=Path, help="image folder (default: the one the indexer last read)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in the container)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    """Environment first, then the flags that were given."""
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    return Settings(**overrides)


def _setting_problem(error: Any) -> str:
    name = "_".join(str(part) for part in error["loc"])
    return f"{ENV_PREFIX}{name.upper()} (--{name.replace('_', '-')}): {error['msg']}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        problems = "; ".join(_setting_problem(error) for error in exc.errors())
        sys.stderr.write(f"clip-serve: invalid settings: {problems}\n")
        return 2
    configure_logging(settings.log_format, settings.log_level)
    import uvicorn

    from clip_model.process_tuning import ThreadPlan, tune_malloc

    tune_malloc()  # steadier encode times: activation buffers stay in the heap between calls

    from .http_protocols import PROTOCOLS
    from .main import create_app

    config = uvicorn.Config(
        create_app(settings, plan=ThreadPlan.for_serving(settings.torch_threads)),
        host=settings.host,
        port=settings.port,
        limit_concurrency=settings.limit_concurrency,
        log_config=None,
        timeout_graceful_shutdown=10,
        http=PROTOCOLS[settings.http_parser],
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits by itself when the lifespan fails (it logged why)
        return 0 if exc.code in (0, None) else 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
