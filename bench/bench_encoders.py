"""Encoder speed on the CPU: our towers against Hugging Face ``transformers``, float32, int8 and compiled.

Run from the repository root:
``.venv/bin/python -m bench.bench_encoders [--family clip|siglip|xlm-roberta] [--threads 2] [--repeat 3] [--smoke]``.
With random weights (identical on both sides), per architecture (``--archs``; for ``clip``, the default, ViT-B/32
and ViT-L/14, OpenAI's quick-GELU configs; ``siglip``: ViT-B-16-SigLIP, or ViT-B-16-SigLIP2; ``xlm-roberta``:
xlm-roberta-base-ViT-B-32) and batch size (``--batches``, default 1 and 32). Each family's models, references and
converters are in :mod:`bench.encoder_families`; everything here goes through the API the indexer and the server use
(``encode_image``, :class:`clip_model.TextInput` over :func:`clip_model.tokenizer_for`, :func:`clip_model.trim_for`,
:func:`clip_model.encode_texts`), the same for every family:

- Parity first: the transformers model is built at random, converted to ours by the repository's converter, and
  both must give the same image and text features (unit features, and raw ones relative to their largest value, to
  ``PARITY_TOLERANCE``, as the parity tests check) before anything is timed (else the run stops). XLM-RoBERTa's image
  tower is CLIP's ViT (the ``clip`` family times it): only its text is compared and timed.
- images/s of ``encode_image`` against the reference's ``get_image_features`` (HF fp32, SDPA attention): ours fp32
  (plain ``nn.Linear`` layers), ours fp32 packed (:func:`clip_model.pack_for_cpu`: what the indexer and the server
  run in fp32; its max abs difference to the plain model is recorded), ours int8 (:func:`clip_model.quantize_int8`),
  and both ours compiled (``torch.compile(dynamic=False)`` with
  ``torch._inductor.config.freezing = True``, ``--compile-mode`` for e.g. ``max-autotune-no-cudagraphs``), with
  each compile's first-call latency and compile time (first call minus a steady call), cold: inductor's kernel
  cache is an empty temporary folder unless ``TORCHINDUCTOR_CACHE_DIR`` is set (a warm cache cuts it severalfold).
  Ratios to HF fp32 are taken within each repetition. int8 quality: min centred cosine to fp32 over the batch
  (after subtracting the fp32 batch mean: random weights map every image to nearly one direction).
- text: single-query latency p50/p99 of ``encode_text`` on a short prompt (``PROMPT``) padded to the full context
  (CLIP and XLM-RoBERTa 77, SigLIP 64) and cut to its real length (start + words + end; not for SigLIP, which reads
  the last position of the full row), ours fp32, fp32 packed and int8 (HF fp32 at the full context for reference);
  end to end as the server answers a query (``*_encode_texts``: tokenizer, cut, encoder, unit vector); and the
  identity check: the cut and the padded rows give the same features within ``IDENTITY_TOLERANCE`` (CLIP's causal
  attention: no real token sees the padding; XLM-RoBERTa masks it; int8 scales are per token, so padding cannot
  change them either). A SentencePiece family's vocabulary is trained at run time (the real files cannot be fetched
  here): the tokenizer's speed is of a 300-800-piece model, not of the real 32k-256k one.

Method: ``torch.inference_mode()`` on both sides; ``--threads`` torch threads (fixed; default one per core, as the
server's inference thread); every variant warmed up first; the variants of one measurement run in turn inside each of
``--repeat`` repetitions (each repetition runs a variant for at least ``--min-time`` seconds), so machine noise hits
them alike; medians with min-max are reported. glibc malloc: large activation buffers are otherwise mmapped and
unmapped on every call (page faults and zeroing each forward pass), which skews CPU timings. The script calls
:func:`clip_model.process_tuning.malloc.tune_malloc` first (``mallopt``: mmap threshold 32 MiB, trim threshold 1 GiB,
the same as launching with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``; those variables are
only read at process start, ``mallopt`` works at any time). A ``MALLOC_*`` variable set by the launcher wins, and both
the setting and the environment are recorded; ``--no-tune-malloc`` measures glibc's defaults.

``--smoke`` runs tiny configs in under a minute (compiling at its larger batch only, with inductor's usual cache;
SigLIP's with both tokenizers) and writes its JSON to ``--workdir`` or a temporary folder; a full run writes
``bench/results/encoders-<date>[-<family>][-tag].json`` (no family part for ``clip``; ``--out`` overrides both).
For a suite runner: :func:`measure` returns the results dict, :func:`markdown` renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel

import clip_model
from bench.common import RESULTS_DIR, fill_unset, median_min_max, new_results, results_file, summary, write_json
from bench.encoder_families import FAMILIES, Features, Pair, give_vocabulary
from clip_model.config import ModelConfig
from clip_model.process_tuning import ThreadPlan, set_thread_count, tune_malloc

PROMPT = "a photo of a dog"
QUALITY_COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "many")  # x QUALITY_THINGS: 64 prompts
QUALITY_THINGS = ("dogs", "cats", "red cars", "old houses", "mountains", "boats", "children", "birds")
PARITY_TOLERANCE = 1e-4  # max abs difference of unit features, and of raw ones over their largest value; fp32
IDENTITY_TOLERANCE = 1e-5  # max abs difference, real length vs padded to the context
INT8_TARGET = 2.0  # ours int8 images/s over HF fp32 images/s
SMOKE = {"batches": (1, 4), "repeat": 3, "min_time": 0.05, "text_calls": 20}  # compiles at batch 4 only
DEFAULTS = {"batches": (1, 32), "repeat": 3, "min_time": 2.0, "text_calls": 50}
P99 = 98  # index of the 99th percentile in statistics.quantiles(n=100)


@dataclass(frozen=True)
class Settings:
    """What one run measures; see ``parse_args`` for the meaning of each field."""

    family: str
    archs: tuple[str, ...]
    batches: tuple[int, ...]
    threads: int
    repeat: int
    min_time: float
    text_calls: int
    compile_batches: tuple[int, ...]  # the batch sizes that also get the torch.compile variants
    compile_mode: str | None
    smoke: bool
    inductor_cache: str = "TORCHINDUCTOR_CACHE_DIR"  # "fresh": an empty temporary one, so compile times are cold


# ---------------------------------------------------------------------------------------------------------- parity


def differences(name: str, ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Max abs difference of raw features (``name``), of unit features (``<name>_unit``) and of raw features over the
    reference's largest value (``<name>_relative``)."""
    raw = (ours - reference).abs().max().item()
    unit = (F.normalize(ours, dim=-1) - F.normalize(reference, dim=-1)).abs().max().item()
    return {name: raw, f"{name}_unit": unit, f"{name}_relative": raw / reference.abs().max().item()}


def check_parity(pair: Pair, text_input: clip_model.TextInput) -> dict[str, float]:
    """:func:`differences` of image (where the pair has an image reference) and text features; raises if a unit or
    relative one exceeds ``PARITY_TOLERANCE`` (the parity tests' criteria)."""
    ours, size = pair.ours, pair.ours.image_size
    tokens = text_input.rows([PROMPT, "two cats asleep on a red sofa in the afternoon sun"]).tokens
    with torch.inference_mode():
        diffs = differences("text", ours.encode_text(tokens), pair.text_features(tokens))
        if pair.image_features is not None:
            images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
            diffs |= differences("image", ours.encode_image(images), pair.image_features(images))
    checked = {k: v for k, v in diffs.items() if k.endswith(("_unit", "_relative"))}
    if not all(math.isfinite(v) and v <= PARITY_TOLERANCE for v in checked.values()):
        raise RuntimeError(f"ours and transformers disagree beyond {PARITY_TOLERANCE}: {diffs}")
    return diffs


def centred_cosine_min(features: torch.Tensor, reference: torch.Tensor) -> float:
    mean = reference.mean(dim=0)
    return F.cosine_similarity(features - mean, reference - mean, dim=-1).min().item()


# ---------------------------------------------------------------------------------------------------------- timing


def interleaved(variants: dict[str, Callable[[], object]], settings: Settings) -> dict[str, list[float]]:
    """Seconds per call of each variant, one value per repetition; the variants take turns in each repetition."""
    for run in variants.values():
        run()  # warm-up: first-call allocations, kernel selection
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(settings.repeat):
        for name, run in variants.items():
            calls, started = 0, time.perf_counter()
            while True:
                run()
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= settings.min_time:
                    break
            seconds[name].append(elapsed / calls)
    return seconds


def compiled(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, mode: str | None) -> dict[str, Any]:
    """``torch.compile(fn)`` and the wall time of its first call (compile included) and of its second call."""
    compiled_fn = torch.compile(fn, dynamic=False, mode=mode)
    started = time.perf_counter()
    compiled_fn(example)
    first = time.perf_counter() - started
    started = time.perf_counter()
    compiled_fn(example)
    second = time.perf_counter() - started
    return {"fn": compiled_fn, "first_call_s": first, "second_call_s": second, "compile_s": first - second}


@contextlib.contextmanager
def frozen_inductor() -> Iterator[None]:
    """Inductor with ``freezing`` on: weights become constants, so fp32 linears can use prepacked oneDNN kernels."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


# ----------------------------------------------------------------------------------------------------------- image


def bench_image_batch(
    ours: clip_model.ImageTextModel,
    packed: clip_model.ImageTextModel,
    int8: clip_model.ImageTextModel,
    reference: Features,
    batch: int,
    settings: Settings,
) -> dict[str, Any]:
    """images/s of every variant at one batch size, ratios to HF fp32, compile costs, int8 centred cosine."""
    size = ours.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    variants: dict[str, Callable[[], object]] = {
        "hf_fp32": lambda: reference(images),
        "ours_fp32": lambda: ours.encode_image(images),
        "ours_fp32_packed": lambda: packed.encode_image(images),
        "ours_int8": lambda: int8.encode_image(images),
    }
    out: dict[str, Any] = {"compile": {}}
    out["packed_max_abs_diff"] = (packed.encode_image(images) - ours.encode_image(images)).abs().max().item()
    compiled_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if batch in settings.compile_batches:
        torch._dynamo.reset()  # fresh caches: every (model, batch) compiles under the same conditions
        for name, model in (("ours_fp32_compiled", ours), ("ours_int8_compiled", int8)):
            result = compiled(model.encode_image, images, settings.compile_mode)
            compiled_fns[name] = result.pop("fn")
            variants[name] = lambda fn=compiled_fns[name]: fn(images)
            out["compile"][name] = result
    seconds = interleaved(variants, settings)
    out["images_per_s"] = {name: summary([batch / s for s in runs]) for name, runs in seconds.items()}
    out["vs_hf_fp32"] = {  # speed ratios, per repetition
        name: summary([hf / s for hf, s in zip(seconds["hf_fp32"], runs, strict=True)])
        for name, runs in seconds.items()
        if name != "hf_fp32"
    }
    if batch > 1:
        fp32 = ours.encode_image(images)
        cosines = {"ours_int8": centred_cosine_min(int8.encode_image(images), fp32)}
        if compiled_fns:
            cosines["ours_int8_compiled"] = centred_cosine_min(compiled_fns["ours_int8_compiled"](images), fp32)
            out["compiled_fp32_max_abs_diff"] = (compiled_fns["ours_fp32_compiled"](images) - fp32).abs().max().item()
        out["int8_centred_cosine_min"] = cosines
    return out


# ------------------------------------------------------------------------------------------------------------ text


def bench_text(
    ours: clip_model.ImageTextModel,
    packed: clip_model.ImageTextModel,
    int8: clip_model.ImageTextModel,
    pair: Pair,
    text_input: clip_model.TextInput,
    settings: Settings,
) -> dict[str, Any]:
    """Single-query latency at the full context, at the prompt's real length (where :func:`clip_model.trim_for` cuts
    the row: not SigLIP's, which reads its last position) and end to end (:func:`clip_model.encode_texts`: tokenizer,
    cut, encoder, unit vector, as the server runs a query); the identity check."""
    padded = text_input.rows([PROMPT]).tokens  # [1, context]
    cut = clip_model.trim_for(ours, padded)  # CLIP: start token, words, end token; XLM-RoBERTa: the same, unpadded
    context, length = padded.shape[1], cut.shape[1]
    identity = {
        "fp32": (ours.encode_text(cut) - ours.encode_text(padded)).abs().max().item(),
        "fp32_packed": (packed.encode_text(cut) - packed.encode_text(padded)).abs().max().item(),
        "int8": (int8.encode_text(cut) - int8.encode_text(padded)).abs().max().item(),
    }
    variants: dict[str, Callable[[], object]] = {}
    for name, model in (("ours_fp32", ours), ("ours_fp32_packed", packed), ("ours_int8", int8)):
        variants[f"{name}_{context}"] = functools.partial(model.encode_text, padded)
        if length < context:
            variants[f"{name}_{length}"] = functools.partial(model.encode_text, cut)
    for name, model in (("ours_fp32_packed", packed), ("ours_int8", int8)):
        variants[f"{name}_encode_texts"] = functools.partial(
            clip_model.encode_texts, model, [PROMPT], "truncate", text_input
        )
    variants[f"hf_fp32_{context}"] = lambda: pair.text_features(padded)
    per_rep: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p99": []} for name in variants}
    for run in variants.values():
        run()
    for _ in range(settings.repeat):
        latencies: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(settings.text_calls):  # one call of each variant in turn
            for name, run in variants.items():
                started = time.perf_counter()
                run()
                latencies[name].append((time.perf_counter() - started) * 1e3)
        for name, values in latencies.items():
            per_rep[name]["p50"].append(statistics.median(values))
            per_rep[name]["p99"].append(statistics.quantiles(values, n=100, method="inclusive")[P99])
    prompts = text_input.rows([f"a photo of {n} {thing}" for n in QUALITY_COUNTS for thing in QUALITY_THINGS]).tokens
    prompts = clip_model.trim_for(ours, prompts)  # [64, L]: distinct prompts, cut where the family allows
    return {
        "prompt": PROMPT,
        "int8_centred_cosine_min": centred_cosine_min(int8.encode_text(prompts), ours.encode_text(prompts)),
        "int8_centred_cosine_prompts": len(prompts),
        "tokens": length,
        "context_length": context,
        "identity_max_abs_diff": identity,
        "identity_ok": max(identity.values()) <= IDENTITY_TOLERANCE,
        "latency_ms": {name: {k: summary(v) for k, v in stats.items()} for name, stats in per_rep.items()},
    }


# ------------------------------------------------------------------------------------------------------------ main


def bench_arch(config: ModelConfig, settings: Settings, vocabulary: Path) -> dict[str, Any]:
    """Parity, then image (where the family's pair has an image reference) and text timings of one config;
    ``vocabulary``: a folder for the SentencePiece model of a family that needs one."""
    pair = FAMILIES[settings.family].build(config, 0)
    ours = pair.ours
    give_vocabulary(ours, vocabulary)
    text_input = clip_model.TextInput.of(ours)  # the family's tokenizer, as the indexer and the server make it
    parity = check_parity(pair, text_input)
    int8 = clip_model.quantize_int8(ours)
    packed = clip_model.pack_for_cpu(ours)  # what the indexer and the server run in fp32
    out: dict[str, Any] = {
        "model": type(ours).__name__,
        "reference": type(pair.reference).__name__,
        "tokenizer": type(text_input.tokenizer).__name__,
        "parity_max_abs_diff": parity,
        "hf_attn_implementation": next(  # what transformers chose, the first of the reference's models
            m.config._attn_implementation for m in pair.reference.modules() if isinstance(m, PreTrainedModel)
        ),
    }
    out["image"] = {}
    if pair.image_features is not None:
        for batch in settings.batches:
            print(f"  image batch {batch}", flush=True)
            out["image"][str(batch)] = bench_image_batch(ours, packed, int8, pair.image_features, batch, settings)
    print("  text", flush=True)
    out["text"] = bench_text(ours, packed, int8, pair, text_input, settings)
    return out


def measure(settings: Settings) -> dict[str, Any]:
    """Run every measurement ``settings`` asks for; returns the results dict (what the JSON file holds)."""
    started = time.perf_counter()
    set_thread_count(settings.threads)
    results = new_results()
    results["settings"] = {**settings.__dict__, "transformers": transformers.__version__}
    results["archs"] = {}
    configs = FAMILIES[settings.family].configs(settings.archs, settings.smoke)
    with torch.inference_mode(), frozen_inductor(), tempfile.TemporaryDirectory(prefix="bench_vocab_") as vocab:
        for name, config in configs.items():
            print(f"{name}:", flush=True)
            results["archs"][name] = bench_arch(config, settings, Path(vocab) / name)
    results["targets"] = {"ours_int8_vs_hf_fp32_images_per_s": INT8_TARGET, "identity_max_abs_diff": IDENTITY_TOLERANCE}
    results["wall_s"] = time.perf_counter() - started
    return results


def _rates(s: dict[str, Any]) -> str:
    """images/s with 3 significant digits, without exponents: 0.477, 23.6, 7136."""
    return median_min_max(s, ".0f" if s["min"] >= 100 else ".1f" if s["min"] >= 10 else ".3g")


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (also what ``bench.suite`` puts in its report)."""
    machine, settings = results["machine"], results["settings"]
    family = settings.get("family", "clip")
    lines = [f"{family}: {machine['cpu']}, {settings['threads']} threads, torch {machine['torch']}, "
             f"transformers {settings['transformers']}; malloc {results.get('malloc')}", "",
             "| model | batch | variant | images/s | vs HF fp32 | first call s | int8 centred cos |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for arch, data in results["archs"].items():
        for batch, b in data["image"].items():
            for name, rate in b["images_per_s"].items():
                ratio = median_min_max(b["vs_hf_fp32"][name], ".2f") if name in b["vs_hf_fp32"] else "1"
                first = f"{b['compile'][name]['first_call_s']:.1f}" if name in b["compile"] else ""
                cos = b.get("int8_centred_cosine_min", {}).get(name)
                cos_text = "" if cos is None else f"{cos:.4f}"
                lines.append(f"| {arch} | {batch} | {name} | {_rates(rate)} | {ratio} | {first} | {cos_text} |")
    lines += ["", "| model | variant | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
    for arch, data in results["archs"].items():
        for name, lat in data["text"]["latency_ms"].items():
            p50, p99 = median_min_max(lat["p50"], ".2f"), median_min_max(lat["p99"], ".2f")
            lines.append(f"| {arch} | {name} | {p50} | {p99} |")
    lines.append("")
    for arch, data in results["archs"].items():
        t, parity = data["text"], data["parity_max_abs_diff"]
        checked = ", ".join(f"{k} {parity[k]:.1e}" for k in ("image", "text") if k in parity)
        identity = (
            f"text identity ({t['tokens']} vs {t['context_length']} tokens): "
            f"fp32 {t['identity_max_abs_diff']['fp32']:.1e}, "
            f"fp32 packed {t['identity_max_abs_diff'].get('fp32_packed', float('nan')):.1e}, "
            f"int8 {t['identity_max_abs_diff']['int8']:.1e} ({'ok' if t['identity_ok'] else 'FAILED'})"
            if t["tokens"] < t["context_length"]
            else f"text rows not cut ({t['context_length']} tokens: the encoder reads the last position)"
        )
        lines.append(
            f"- {arch}: parity with HF: {checked}; {identity}; int8 text "
            f"min centred cosine to fp32 over {t['int8_centred_cosine_prompts']} prompts "
            f"{t['int8_centred_cosine_min']:.4f}"
        )
    return "\n".join(lines) + "\n"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=tuple(FAMILIES), default="clip", help="model family (default clip)")
    parser.add_argument("--archs", type=lambda s: tuple(s.split(",")), help="e.g. ViT-B-32 (default: the family's)")
    parser.add_argument("--batches", type=_ints, help=f"image batch sizes (default {DEFAULTS['batches']})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core, as the server)")
    parser.add_argument("--repeat", type=int, help=f"repetitions (default {DEFAULTS['repeat']})")
    parser.add_argument("--min-time", type=float, help=f"seconds per variant per repetition ({DEFAULTS['min_time']})")
    parser.add_argument(
        "--text-calls", type=int, help=f"text calls per variant per repetition ({DEFAULTS['text_calls']})"
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor's default)")
    parser.add_argument("--no-tune-malloc", dest="tune_malloc", action="store_false", help="keep glibc's defaults")
    parser.add_argument("--smoke", action="store_true", help="tiny configs, to check that the script works (< 1 min)")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path (default: bench/results/...)")
    parser.add_argument("--workdir", type=Path, default=None, help="where --smoke writes (default: a temporary folder)")
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    args.archs = args.archs or family.default_archs
    unknown = set(args.archs) - set(family.archs)
    if unknown:
        parser.error(f"unknown --archs {sorted(unknown)} for {args.family}; choose from {', '.join(family.archs)}")
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    malloc = tune_malloc() if args.tune_malloc else None  # before the big allocations
    compile_batches = () if not args.compile else args.batches[-1:] if args.smoke else args.batches
    threads = ThreadPlan.for_serving(args.threads).torch_threads
    settings = Settings(family=args.family, archs=args.archs, batches=args.batches, threads=threads, repeat=args.repeat,
                        min_time=args.min_time, text_calls=args.text_calls, compile_batches=compile_batches,
                        compile_mode=args.compile_mode, smoke=args.smoke)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_encoders_inductor_") as cache:
        if not args.smoke and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold compiles: nothing cached before
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            settings = dataclasses.replace(settings, inductor_cache="fresh")
        results = measure(settings)
    results["malloc"] = malloc
    print("\n" + markdown(results))
    with tempfile.TemporaryDirectory(prefix="bench_encoders_") as tmp:
        out_dir = (args.workdir or Path(tmp)) if args.smoke else RESULTS_DIR  # smoke: bench/results/ stays untouched
        family = "" if args.family == "clip" else args.family  # CLIP's file names as before families existed
        path = results_file("encoders", "smoke" if args.smoke else "", family, args.tag, out=args.out, folder=out_dir)
        write_json(path, results)
        print(f"\nwrote {path} ({results['wall_s']:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
