"""Tokenizer speed: 10,000 distinct short prompts, clip_model vs OpenAI's reference, median of 5 runs after warm-up.

Run from the repository root: ``.venv/bin/python -m bench.bench_tokenizer``. The reference (``clip-anytorch``) is
loaded from its file because ``import clip`` needs torchvision; it is skipped if the package is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from clip_model.process_tuning import set_thread_count
from clip_model.tokenizer import Tokenizer

NUM_PROMPTS = 10_000
RUNS = 5
CONTEXT_LENGTH = 77
TEMPLATES = [
    "a photo of a {} {}.", "a picture of the {} {}", "an image of a {} {}", "a close-up photo of a {} {}",
    "a blurry photo of the {} {}", "a drawing of a {} {}", "a painting of the {} {}", "a sketch of a {} {}",
    "a bright photo of a {} {}", "a cropped photo of the {} {}",
]  # fmt: skip
ADJECTIVES = [
    "red", "blue", "green", "small", "large", "old", "young", "happy", "sleepy", "wet", "fluffy", "shiny", "dirty",
    "striped", "spotted", "wooden", "metal", "tiny", "giant", "ancient", "modern", "broken", "frozen", "golden", "pink",
]  # fmt: skip
NOUNS = [
    "cat", "dog", "car", "tree", "house", "bird", "boat", "chair", "lamp", "river", "mountain", "bicycle", "guitar",
    "teapot", "castle", "bridge", "train", "horse", "flower", "robot", "clock", "piano", "umbrella", "kite", "owl",
    "lighthouse", "sandwich", "penguin", "tractor", "violin", "cactus", "fox", "rabbit", "skateboard", "volcano",
    "sofa", "bottle", "butterfly", "helicopter", "giraffe",
]  # fmt: skip


def prompts(count: int = NUM_PROMPTS) -> list[str]:
    """``count`` distinct prompts (templates x adjectives x nouns)."""
    combos = itertools.product(TEMPLATES, ADJECTIVES, NOUNS)
    texts = [template.format(adjective, noun) for template, adjective, noun in itertools.islice(combos, count)]
    if len(set(texts)) != count:
        raise SystemExit(f"only {len(set(texts))} distinct prompts available, asked for {count}")
    return texts


def load_reference_tokenizer() -> Any | None:
    """OpenAI's ``SimpleTokenizer`` loaded by file path, or None when clip-anytorch is not installed."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_bench_reference_simple_tokenizer", path)
    assert module_spec is not None and module_spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def reference_tokenize(ref: Any, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """``clip.tokenize``'s body (its module imports torchvision), truncation omitted: the prompts are short."""
    sot, eot = ref.encoder["<|startoftext|>"], ref.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [sot, *ref.encode(text), eot]
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


def median_seconds(fn: Callable[[], object], runs: int = RUNS) -> float:
    fn()  # warm-up: fills the per-word caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=NUM_PROMPTS)
    parser.add_argument("--no-reference", action="store_true", help="time clip_model only")
    args = parser.parse_args()

    texts = prompts(args.count)
    set_thread_count(1)
    ours = Tokenizer()
    start = time.perf_counter()
    fresh = Tokenizer()
    load = time.perf_counter() - start
    start = time.perf_counter()
    fresh(texts)
    cold = time.perf_counter() - start
    print(f"{len(texts)} distinct prompts, median of {RUNS} runs after one warm-up run, torch threads = 1")
    print(f"clip_model   tokenize (tensor): {median_seconds(lambda: ours(texts)):.4f} s")
    print(f"clip_model   encode only:       {median_seconds(lambda: [ours.encode(t) for t in texts]):.4f} s")
    print(f"clip_model   first call on a fresh tokenizer (cold caches): {cold:.4f} s (+ {load:.4f} s to load it)")

    ref = None if args.no_reference else load_reference_tokenizer()
    if ref is None:
        print("reference    skipped")
        return
    print(f"reference    tokenize (tensor): {median_seconds(lambda: reference_tokenize(ref, texts)):.4f} s")
    print(f"reference    encode only:       {median_seconds(lambda: [ref.encode(t) for t in texts]):.4f} s")
    if not torch.equal(ours(texts), reference_tokenize(ref, texts)):
        raise SystemExit("MISMATCH between clip_model and the reference")
    print("ids identical to the reference")


if __name__ == "__main__":
    main()
