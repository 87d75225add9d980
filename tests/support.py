"""What the tests and the bench share: the tiny CLIP architecture, its random-weight checkpoints, and a free port.

Importing this module loads only the standard library (``save_tiny_model`` imports clip_model when called), so
the bench's members import it as cheaply as the tests do (they run from the repository root:
``from tests.support import TINY_ARCH``).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# A random-weight CLIP small enough to encode hundreds of images per second on a CPU. Read it, never change it:
# a test that needs another shape takes a copy from tiny_arch().
TINY_ARCH: dict[str, Any] = {
    "embed_dim": 32,
    "vision": {"image_size": 32, "layers": 2, "width": 64, "heads": 2, "patch_size": 8, "mlp_width": 128},
    "text": {"width": 64, "heads": 2, "layers": 2},
}
TINY_IMAGE_SIZE: int = TINY_ARCH["vision"]["image_size"]  # pixels: the tiny model's input side


def tiny_arch(
    vision: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """A fresh copy of :data:`TINY_ARCH` with the given ``vision`` and ``text`` entries and top-level keys
    (``embed_dim``, ``activation``) replaced."""
    return {
        **TINY_ARCH,
        **top,
        "vision": {**TINY_ARCH["vision"], **(vision or {})},
        "text": {**TINY_ARCH["text"], **(text or {})},
    }


def save_tiny_model(path: Path, seed: int) -> Path:
    """:data:`TINY_ARCH` with random weights drawn from ``seed``, saved at ``path`` (a checkpoint carrying its
    config); returns the path."""
    import clip_model
    from clip_model.config import CLIPConfig

    model, _ = clip_model.create_model(CLIPConfig.from_dict(TINY_ARCH), seed=seed)
    return clip_model.save_checkpoint(model.eval(), path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
