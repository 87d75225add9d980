"""OpenAI's reference CLIP code, loaded by file path from the ``clip-anytorch`` test dependency.

The package's ``__init__`` imports torchvision, which this project never installs, so its modules are loaded
one by one from their files instead of through ``import clip``.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType


def reference_dir() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("clip-anytorch is not installed: run scripts/env.sh (it installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache
def load_reference(module: str) -> ModuleType:
    """``load_reference("model")`` or ``load_reference("simple_tokenizer")``: the reference module object."""
    name = f"_reference_clip_{module}"
    spec = importlib.util.spec_from_file_location(name, reference_dir() / f"{module}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
