"""Encoder speed on the CPU: our CLIP towers against Hugging Face ``transformers``, float32, int8 and compiled.

Run from the repository root: ``.venv/bin/python -m bench.bench_encoders [--threads 2] [--repeat 3] [--smoke]``.
With random weights (identical on both sides), per architecture (``--archs``, default ViT-B/32 and ViT-L/14,
OpenAI's quick-GELU configs) and batch size (``--batches``, default 1 and 32):

- Parity first: a ``transformers.CLIPModel`` is built at random, converted to ours with
  :func:`clip_model.hf_convert.convert_hf_state_dict`, and both must give the same image and text features to
  ``PARITY_TOLERANCE`` before anything is timed (else the run stops).
- images/s of ``encode_image`` against ``CLIPModel.get_image_features`` (HF fp32, SDPA attention): ours fp32
  (plain ``nn.Linear`` layers), ours fp32 packed (:func:`clip_model.pack_for_cpu`: what the indexer and the server
  run in fp32; its max abs difference to the plain model is recorded), ours int8 (:func:`clip_model.quantize_int8`),
  and both ours compiled (``torch.compile(dynamic=False)`` with
  ``torch._inductor.config.freezing = True``, ``--compile-mode`` for e.g. ``max-autotune-no-cudagraphs``), with
  each compile's first-call latency and compile time (first call minus a steady call), cold: inductor's kernel
  cache is an empty temporary folder unless ``TORCHINDUCTOR_CACHE_DIR`` is set (a warm cache cuts it severalfold).
  Ratios to HF fp32 are taken within each repetition. int8 quality: min centred cosine to fp32 over the batch
  (after subtracting the fp32 batch mean: random weights map every image to nearly one direction).
- text: single-query latency p50/p99 of ``encode_text`` on a short prompt (``PROMPT``) padded to the full context
  (77) and cut to its real length (start + words + end), ours fp32 and int8 (HF fp32 at 77 for reference); and the
  identity check: the cut and the padded rows give the same features within ``IDENTITY_TOLERANCE`` (causal
  attention: no real token sees the padding; int8 scales are per token, so padding cannot change them either).

Method: ``torch.inference_mode()`` on both sides; ``--threads`` torch threads (fixed; default one per core, as the
server's inference thread); every variant warmed up first; the variants of one measurement run in turn inside each of
``--repeat`` repetitions (each repetition runs a variant for at least ``--min-time`` seconds), so machine noise hits
them alike; medians with min-max are reported. glibc malloc: large activation buffers are otherwise mmapped and
unmapped on every call (page faults and zeroing each forward pass), which skews CPU timings. The script calls
:func:`clip_model.process_tuning.malloc.tune_malloc` first (``mallopt``: mmap threshold 32 MiB, trim threshold 1 GiB,
the same as launching with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``; those variables are
only read at process start, ``mallopt`` works at any time). A ``MALLOC_*`` variable set by the launcher wins, and both
the setting and the environment are recorded; ``--no-tune-malloc`` measures glibc's defaults.

``--smoke`` runs tiny configs in under a minute (compiling at its larger batch only, with inductor's usual cache)
and writes its JSON to ``--workdir`` or a temporary folder; a full run writes
``bench/results/encoders-<date>[-tag].json`` (``--out`` overrides both). For a suite runner: :func:`measure`
returns the results dict, :func:`markdown` renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

import clip_model
from bench.common import RESULTS_DIR, fill_unset, median_min_max, new_results, results_file, summary, write_json
from clip_model.config import CLIPConfig, get_config
from clip_model.hf_convert import convert_hf_state_dict
from clip_model.process_tuning import ThreadPlan, set_thread_count, tune_malloc
from tests.support import TINY_ARCH

ARCHS = {"ViT-B-32": "ViT-B-32-quickgelu", "ViT-L-14": "ViT-L-14-quickgelu"}  # openai/clip-vit-*: quick GELU
PROMPT = "a photo of a dog"
QUALITY_COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "many")  # x QUALITY_THINGS: 64 prompts
QUALITY_THINGS = ("dogs", "cats", "red cars", "old houses", "mountains", "boats", "children", "birds")
HF_ATTENTION = "sdpa"  # transformers' default with torch >= 2.1, spelled out: the same kernel as ours
PARITY_TOLERANCE = 1e-4  # max abs difference of features, fp32
IDENTITY_TOLERANCE = 1e-5  # max abs difference, real length vs padded to the context
INT8_TARGET = 2.0  # ours int8 images/s over HF fp32 images/s
SMOKE = {"batches": (1, 4), "repeat": 3, "min_time": 0.05, "text_calls": 20}  # compiles at batch 4 only
DEFAULTS = {"batches": (1, 32), "repeat": 3, "min_time": 2.0, "text_calls": 50}
P99 = 98  # index of the 99th percentile in statistics.quantiles(n=100)


@dataclass(frozen=True)
class Settings:
    """What one run measures; see ``parse_args`` for the meaning of each field."""

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


# ---------------------------------------------------------------------------------------------------------- models


def hf_config(config: CLIPConfig) -> transformers.CLIPConfig:
    """The ``transformers.CLIPConfig`` with ``config``'s sizes (a ViT CLIP)."""
    v, t = config.vision, config.text
    vision = {"hidden_size": v.width, "intermediate_size": v.mlp_width or 4 * v.width, "num_attention_heads": v.heads,
              "num_hidden_layers": v.layers, "image_size": v.image_size, "patch_size": v.patch_size,
              "hidden_act": config.activation}  # fmt: skip
    text = {"hidden_size": t.width, "intermediate_size": 4 * t.width, "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers, "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
            "hidden_act": config.activation}  # fmt: skip
    return transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=config.embed_dim, attn_implementation=HF_ATTENTION
    )


def model_pair(config: CLIPConfig, seed: int = 0) -> tuple[clip_model.CLIP, transformers.CLIPModel]:
    """(ours, HF) in eval mode holding the same random weights: HF's init, converted to our layout."""
    torch.manual_seed(seed)
    reference = transformers.CLIPModel(hf_config(config)).eval()
    ours = clip_model.CLIP(config)
    ours.load_state_dict(convert_hf_state_dict(reference.state_dict()), strict=True)
    return ours.eval(), reference


def hf_features(output: torch.Tensor | transformers.utils.ModelOutput) -> torch.Tensor:
    """transformers 4 returns the projected tensor; 5 wraps it as ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def check_parity(ours: clip_model.CLIP, reference: transformers.CLIPModel) -> dict[str, float]:
    """Max abs differences of image and text features; raises if either exceeds ``PARITY_TOLERANCE``."""
    size = ours.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = clip_model.tokenize([PROMPT, "two cats asleep on a red sofa in the afternoon sun"])
    with torch.inference_mode():
        image = (ours.encode_image(images) - hf_features(reference.get_image_features(pixel_values=images))).abs()
        text = (ours.encode_text(tokens) - hf_features(reference.get_text_features(input_ids=tokens))).abs()
    diffs = {"image": image.max().item(), "text": text.max().item()}
    if max(diffs.values()) > PARITY_TOLERANCE:
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
    ours: clip_model.CLIP,
    packed: clip_model.CLIP,
    int8: clip_model.CLIP,
    reference: transformers.CLIPModel,
    batch: int,
    settings: Settings,
) -> dict[str, Any]:
    """images/s of every variant at one batch size, ratios to HF fp32, compile costs, int8 centred cosine."""
    size = ours.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    variants: dict[str, Callable[[], object]] = {
        "hf_fp32": lambda: reference.get_image_features(pixel_values=images),
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
    ours: clip_model.CLIP,
    packed: clip_model.CLIP,
    int8: clip_model.CLIP,
    reference: transformers.CLIPModel,
    settings: Settings,
) -> dict[str, Any]:
    """Single-query latency at the full context and at the prompt's real length; the identity check."""
    padded = clip_model.tokenize([PROMPT], context_length=ours.context_length)  # [1, 77]
    cut = clip_model.trim_tokens(padded)  # start token, words, end token
    length = cut.shape[1]
    identity = {
        "fp32": (ours.encode_text(cut) - ours.encode_text(padded)).abs().max().item(),
        "fp32_packed": (packed.encode_text(cut) - packed.encode_text(padded)).abs().max().item(),
        "int8": (int8.encode_text(cut) - int8.encode_text(padded)).abs().max().item(),
    }
    variants: dict[str, Callable[[], object]] = {
        f"ours_fp32_{padded.shape[1]}": lambda: ours.encode_text(padded),
        f"ours_fp32_{length}": lambda: ours.encode_text(cut),
        f"ours_fp32_packed_{padded.shape[1]}": lambda: packed.encode_text(padded),
        f"ours_fp32_packed_{length}": lambda: packed.encode_text(cut),
        f"ours_int8_{padded.shape[1]}": lambda: int8.encode_text(padded),
        f"ours_int8_{length}": lambda: int8.encode_text(cut),
        f"hf_fp32_{padded.shape[1]}": lambda: reference.get_text_features(input_ids=padded),
    }
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
    prompts = clip_model.tokenize([f"a photo of {n} {thing}" for n in QUALITY_COUNTS for thing in QUALITY_THINGS])
    prompts = clip_model.trim_tokens(prompts)  # [64, L]: distinct prompts at their real length
    return {
        "prompt": PROMPT,
        "int8_centred_cosine_min": centred_cosine_min(int8.encode_text(prompts), ours.encode_text(prompts)),
        "int8_centred_cosine_prompts": len(prompts),
        "tokens": length,
        "context_length": padded.shape[1],
        "identity_max_abs_diff": identity,
        "identity_ok": max(identity.values()) <= IDENTITY_TOLERANCE,
        "latency_ms": {name: {k: summary(v) for k, v in stats.items()} for name, stats in per_rep.items()},
    }


# ------------------------------------------------------------------------------------------------------------ main


def bench_arch(config: CLIPConfig, settings: Settings) -> dict[str, Any]:
    ours, reference = model_pair(config)
    parity = check_parity(ours, reference)
    int8 = clip_model.quantize_int8(ours)
    packed = clip_model.pack_for_cpu(ours)  # what the indexer and the server run in fp32
    out: dict[str, Any] = {
        "parity_max_abs_diff": parity,
        "hf_attn_implementation": reference.config._attn_implementation,
    }
    out["image"] = {}
    for batch in settings.batches:
        print(f"  image batch {batch}", flush=True)
        out["image"][str(batch)] = bench_image_batch(ours, packed, int8, reference, batch, settings)
    print("  text", flush=True)
    out["text"] = bench_text(ours, packed, int8, reference, settings)
    return out


def measure(settings: Settings) -> dict[str, Any]:
    """Run every measurement ``settings`` asks for; returns the results dict (what the JSON file holds)."""
    started = time.perf_counter()
    set_thread_count(settings.threads)
    results = new_results()
    results["settings"] = {**settings.__dict__, "transformers": transformers.__version__}
    results["archs"] = {}
    configs = (
        {"tiny": CLIPConfig.from_dict(TINY_ARCH)}
        if settings.smoke
        else {a: get_config(ARCHS[a]) for a in settings.archs}
    )
    with torch.inference_mode(), frozen_inductor():
        for name, config in configs.items():
            print(f"{name}:", flush=True)
            results["archs"][name] = bench_arch(config, settings)
    results["targets"] = {"ours_int8_vs_hf_fp32_images_per_s": INT8_TARGET, "identity_max_abs_diff": IDENTITY_TOLERANCE}
    results["wall_s"] = time.perf_counter() - started
    return results


def _rates(s: dict[str, Any]) -> str:
    """images/s with 3 significant digits, without exponents: 0.477, 23.6, 7136."""
    return median_min_max(s, ".0f" if s["min"] >= 100 else ".1f" if s["min"] >= 10 else ".3g")


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (also what ``bench.suite`` puts in its report)."""
    machine, settings = results["machine"], results["settings"]
    lines = [f"{machine['cpu']}, {settings['threads']} threads, torch {machine['torch']}, "
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
        lines.append(
            f"- {arch}: parity with HF: image {parity['image']:.1e}, text {parity['text']:.1e}; text identity "
            f"({t['tokens']} vs {t['context_length']} tokens): fp32 {t['identity_max_abs_diff']['fp32']:.1e}, "
            f"fp32 packed {t['identity_max_abs_diff'].get('fp32_packed', float('nan')):.1e}, "
            f"int8 {t['identity_max_abs_diff']['int8']:.1e} ({'ok' if t['identity_ok'] else 'FAILED'}); int8 text "
            f"min centred cosine to fp32 over {t['int8_centred_cosine_prompts']} prompts "
            f"{t['int8_centred_cosine_min']:.4f}"
        )
    return "\n".join(lines) + "\n"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=lambda s: tuple(s.split(",")), default=tuple(ARCHS), help="e.g. ViT-B-32")
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
    unknown = set(args.archs) - set(ARCHS)
    if unknown:
        parser.error(f"unknown --archs {sorted(unknown)}; choose from {', '.join(ARCHS)}")
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    malloc = tune_malloc() if args.tune_malloc else None  # before the big allocations
    compile_batches = () if not args.compile else args.batches[-1:] if args.smoke else args.batches
    threads = ThreadPlan.for_serving(args.threads).torch_threads
    settings = Settings(archs=args.archs, batches=args.batches, threads=threads, repeat=args.repeat,
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
        path = results_file("encoders", "smoke" if args.smoke else "", args.tag, out=args.out, folder=out_dir)
        write_json(path, results)
        print(f"\nwrote {path} ({results['wall_s']:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
