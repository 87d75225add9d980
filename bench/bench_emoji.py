"""Emoji CLIP: a small CLIP trained from scratch on two emoji styles, evaluated on a third style it never saw.

Run from the repository root: ``.venv/bin/python -m bench.bench_emoji --workdir /some/cache [--quick]``.

Data: the npm packages ``emoji-datasource-{google,twitter,apple}`` (``EMOJI_VERSION``) ship the same 1,911 emoji
drawn by three vendors, with one ``emoji.json`` (name, short names, category). ``npm pack`` fetches them into
``--workdir`` (cached there, nothing is committed); only ``emoji.json`` and the 64x64 PNGs of the base emoji
(``img/<style>/64/<image>``; skin-tone variations ignored) are extracted. Datasets (``clip_model.train.data`` layout,
paths relative to the folder, label = the emoji's category):

- ``train/``: the google and twitter images of every emoji (an emoji drawn by both gives 2 images).
  ``captions.jsonl`` captions each image with its lower-cased name ("grinning face"); ``captions-phrasings.jsonl``
  has one record per phrasing of the name (the name, "an emoji of a grinning face", "grinning face emoji", and the
  short names when they say something else, "zany face"), in a fixed order.
- ``train/eval-google.jsonl``, ``train/eval-twitter.jsonl``: the training styles with plain-name captions, to measure
  how well the model fits what it saw (the generalisation gap to apple).
- ``apple/``: the apple image of every emoji that has one (1,908), plain-name captions: never seen in training.

Each variant (architecture, steps, batch, lr, captions, augmentation) trains with ``clip_model.train.fit.fit`` on one
torch thread and one loader process, in chunks of ``CHUNK_STEPS`` steps that resume from fit's checkpoint (a killed
run continues; the result equals an uninterrupted run). fit has no augmentation, so ``augment=N`` writes N random
variants of each training image once (``augment_image``: scale, shift, small rotation, contrast/saturation jitter,
sometimes blur or posterize; no flips) and trains on them beside the originals. Then it is evaluated on apple,
google and twitter:
text->image and image->text recall@1/5/10 under ``clip_model.train.evaluate.retrieval_metrics``'s caption-equality
rule (the query is the plain name; two emoji share the name "man in tuxedo", and either image counts for it), and
zero-shot category accuracy with two templates ("a photo of a {}." and "an emoji of {}.") over two sets of class
names (the categories as written, "smileys and emotion", and one-word readable names, "face"). Chance levels are
exact expectations under a random ranking (recall) or the majority class (zero-shot).

Results: a table on stdout and JSON in ``bench/results/emoji-<date>[-tag].json`` (machine, data, every variant's
settings, training seconds and metrics). Runs are cached in ``--workdir/runs/<variant>-<hash>``: a finished variant
is evaluated again without retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import resource
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from bench.bench_int8_quality import compare
from bench.common import new_results, results_file, workdir_or_temporary, write_json
from clip_model.preprocess import WHITE, to_rgb

EMOJI_VERSION = "16.0.0"
TRAIN_STYLES = ("google", "twitter")
EVAL_STYLE = "apple"
STYLES = (*TRAIN_STYLES, EVAL_STYLE)
IMAGE_PX = 64  # the packages also ship 16, 20, 32 px; the model's input is 64 px
THREADS = 1  # torch threads: the 2 cores are shared, and 2-thread torch on a busy core stalls badly
LOADER_WORKERS = 1
EVAL_BATCH_SIZE = 256
RECALL_KS = (1, 5, 10)
DATA_VERSION = 1  # bump when the datasets' captions change: cached runs of another version retrain
ZERO_SHOT_TEMPLATES = {"photo": "a photo of a {}.", "emoji": "an emoji of {}."}
CATEGORY_WORDS = {  # one-word readable class names, in the vocabulary of the emoji names where possible
    "Activities": "activity",
    "Animals & Nature": "animal",
    "Component": "skin tone",
    "Flags": "flag",
    "Food & Drink": "food",
    "Objects": "object",
    "People & Body": "person",
    "Smileys & Emotion": "face",
    "Symbols": "symbol",
    "Travel & Places": "place",
}
ARCH_S: dict[str, Any] = {  # 8.0 M parameters, 6.3 M of them the token embedding; 8x8 patches of 8 px
    "embed_dim": 128,
    "activation": "gelu",  # from scratch: erf GELU is ~40% faster per step on CPU than QuickGELU's mul + sigmoid
    "vision": {"image_size": IMAGE_PX, "layers": 4, "width": 128, "heads": 4, "patch_size": 8, "mlp_width": 512},
    "text": {"width": 128, "heads": 4, "layers": 4, "context_length": 32},
}
ARCH_M: dict[str, Any] = {  # 14.1 M parameters; ~2.7x the compute of ARCH_S per image
    "embed_dim": 192,
    "activation": "gelu",
    "vision": {"image_size": IMAGE_PX, "layers": 6, "width": 192, "heads": 6, "patch_size": 8, "mlp_width": 768},
    "text": {"width": 192, "heads": 6, "layers": 4, "context_length": 32},
}


@dataclass(frozen=True)
class Variant:
    """One training run; ``captions`` is ``plain`` (the name) or ``phrasings`` (one record per phrasing)."""

    name: str
    arch: dict[str, Any]
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.2
    captions: str = "plain"
    augment: int = 0  # augmented copies of each training image beside the original (see augment_image)
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({"data": DATA_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


VARIANTS = {
    v.name: v
    for v in (
        Variant("s-plain", ARCH_S, steps=1200),
        Variant("s-phrasings", ARCH_S, steps=1200, captions="phrasings"),
        Variant("s-plain-aug4", ARCH_S, steps=1200, augment=4),
        Variant("s-plain-aug4-long", ARCH_S, steps=2400, augment=4),
        Variant("m-plain-aug4", ARCH_M, steps=480, warmup_steps=80, augment=4),
    )
}
DEFAULT_VARIANT = "s-plain-aug4-long"  # the best on apple (bench/README.md, "emoji")
QUICK_STEPS = 60
AUGMENT_VERSION = 1  # bump when augment_image changes: augmented folders of another version are regenerated
CHUNK_STEPS = 200  # steps per fit call; each ends in a training checkpoint that the next call resumes from


# ------------------------------------------------------------------------------------------------------------ data


def fetch_package(workdir: Path, style: str) -> Path:
    """The ``npm pack`` tarball of ``emoji-datasource-<style>``, downloaded into ``workdir/npm`` once."""
    folder = workdir / "npm"
    tarball = folder / f"emoji-datasource-{style}-{EMOJI_VERSION}.tgz"
    if not tarball.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"  npm pack emoji-datasource-{style}@{EMOJI_VERSION}", flush=True)
        subprocess.run(
            ["npm", "pack", "--silent", f"emoji-datasource-{style}@{EMOJI_VERSION}"],
            cwd=folder,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return tarball


def extract_package(tarball: Path, style: str, dest: Path) -> Path:
    """``emoji.json`` and ``img/<style>/64/*.png`` of ``tarball`` under ``dest`` (once); returns the image folder."""
    images = dest / style
    done = dest / f".{style}-extracted"
    if not done.is_file():
        prefix = f"package/img/{style}/{IMAGE_PX}/"
        images.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                name = member.name.removeprefix(prefix)  # the file name, for a PNG of the 64 px folder
                if member.isfile() and name != member.name and "/" not in name and name.endswith(".png"):
                    source = archive.extractfile(member)
                    if source is not None:
                        (images / name).write_bytes(source.read())
                elif member.name == "package/emoji.json":
                    source = archive.extractfile(member)
                    if source is not None:
                        (dest / f"emoji-{style}.json").write_bytes(source.read())
        done.touch()
    return images


def phrasings(emoji: dict[str, Any]) -> list[str]:
    """Training captions of one emoji, the plain name first, without repeats."""
    name = caption_of(emoji)
    article = "an" if name[0] in "aeiou" else "a"
    short = [s.replace("_", " ").replace("-", " ") for s in emoji.get("short_names") or ()]
    return list(dict.fromkeys([name, f"an emoji of {article} {name}", f"{name} emoji", *short]))


def caption_of(emoji: dict[str, Any]) -> str:
    """The query text of an emoji: its name, lower-cased, whitespace collapsed."""
    return " ".join(emoji["name"].split()).lower()


def _write_jsonl(path: Path, records: Sequence[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def build_datasets(workdir: Path) -> dict[str, Any]:
    """Fetch, extract and write the ``train/`` and ``apple/`` datasets (see the module docstring); a summary."""
    data = workdir / f"data-v{DATA_VERSION}"
    train_dir, apple_dir = data / "train", data / "apple"
    folders = {style: apple_dir if style == EVAL_STYLE else train_dir for style in STYLES}
    for style in STYLES:
        extract_package(fetch_package(workdir, style), style, folders[style])
    emoji = json.loads((apple_dir / f"emoji-{EVAL_STYLE}.json").read_text(encoding="utf-8"))
    plain: list[dict[str, str]] = []
    varied: list[dict[str, str]] = []
    per_style: dict[str, list[dict[str, str]]] = {style: [] for style in STYLES}
    for style in STYLES:
        for e in emoji:
            path = f"{style}/{e['image']}"
            if not e.get(f"has_img_{style}") or not (folders[style] / path).is_file():
                continue
            per_style[style].append({"path": path, "caption": caption_of(e), "label": e["category"]})
            if style in TRAIN_STYLES:
                plain.append(per_style[style][-1])
                varied += [{"path": path, "caption": c, "label": e["category"]} for c in phrasings(e)]
    _write_jsonl(train_dir / "captions.jsonl", plain)
    _write_jsonl(train_dir / "captions-phrasings.jsonl", varied)
    for style in TRAIN_STYLES:
        _write_jsonl(train_dir / f"eval-{style}.jsonl", per_style[style])
    _write_jsonl(apple_dir / "captions.jsonl", per_style[EVAL_STYLE])
    names = Counter(caption_of(e) for e in emoji)
    return {
        "root": data,
        "version": EMOJI_VERSION,
        "emoji": len(emoji),
        "images": {style: len(records) for style, records in per_style.items()},
        "train_pairs": {"plain": len(plain), "phrasings": len(varied)},
        "shared_names": sorted(name for name, count in names.items() if count > 1),
        "categories": dict(Counter(r["label"] for r in per_style[EVAL_STYLE]).most_common()),
    }


def augment_image(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random variant of an emoji, on white like the evaluation images: scaled to 70-100% at a random place,
    rotated up to 10 degrees, contrast and saturation jittered by up to 25%, sometimes blurred or posterized (the
    vendors differ in outline, shading and palette). No flips: arrows and hands have a direction."""
    rgb = to_rgb(image)  # alpha composited over white, as the model's preprocessing does
    side = rgb.width
    small = rgb.resize((round(side * rng.uniform(0.7, 1.0)),) * 2, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(small, (rng.randint(0, side - small.width), rng.randint(0, side - small.height)))
    canvas = canvas.rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC, fillcolor=WHITE)
    canvas = ImageEnhance.Contrast(canvas).enhance(rng.uniform(0.75, 1.25))
    canvas = ImageEnhance.Color(canvas).enhance(rng.uniform(0.75, 1.25))
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    if rng.random() < 0.3:
        canvas = ImageOps.posterize(canvas, rng.choice((3, 4)))
    return canvas


def training_captions(data: Path, captions: str, copies: int) -> Path:
    """The training captions file of a variant; with ``copies``, its records plus ``copies`` augmented images of
    each training image (written once under ``train/aug-v<AUGMENT_VERSION>-<copies>/``, seeded by path)."""
    train_dir = data / "train"
    base = train_dir / ("captions.jsonl" if captions == "plain" else "captions-phrasings.jsonl")
    if copies == 0:
        return base
    path = train_dir / f"{base.stem}-aug{copies}.jsonl"
    folder = f"aug-v{AUGMENT_VERSION}-{copies}"
    records = [json.loads(line) for line in base.read_text(encoding="utf-8").splitlines()]
    out = list(records)
    for k in range(copies):
        out += [r | {"path": f"{folder}/{Path(r['path']).stem}-{Path(r['path']).parent}-{k}.png"} for r in records]
    done = train_dir / folder / ".done"
    if not done.is_file():
        print(f"  writing {copies} augmented copies of each training image", flush=True)
        (train_dir / folder).mkdir(exist_ok=True)
        for source in dict.fromkeys(r["path"] for r in records):
            with Image.open(train_dir / source) as image:
                image.load()
                for k in range(copies):
                    copy = augment_image(image, random.Random(f"{source}-{k}"))
                    copy.save(train_dir / folder / f"{Path(source).stem}-{Path(source).parent}-{k}.png")
        done.touch()
    _write_jsonl(path, out)
    return path


# ------------------------------------------------------------------------------------------------- train, evaluate


def train(variant: Variant, data: Path, runs: Path) -> tuple[Path, float]:
    """Train ``variant`` (or reuse its finished run); the model file and the training seconds.

    fit runs ``CHUNK_STEPS`` steps per call and resumes from its checkpoint for the next chunk (the result is the
    uninterrupted run's), so a run killed part-way continues from its last finished chunk. Each finished chunk's
    wall and CPU seconds are appended to ``chunks.jsonl``; the training time is their sum.
    """
    from clip_model.train.fit import fit
    from clip_model.train.state import latest_state

    out = runs / variant.key()
    model_path, report, chunks = out / "model.safetensors", out / "bench.json", out / "chunks.jsonl"
    if model_path.is_file() and report.is_file():
        print(f"  reusing {out}", flush=True)
        return model_path, float(json.loads(report.read_text(encoding="utf-8"))["train_seconds"])
    out.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in chunks.read_text(encoding="utf-8").splitlines()] if chunks.is_file() else []
    step, final = (done[-1]["step"] if done else 0), {}
    while step < variant.steps:
        resume = latest_state(out / "run" / "checkpoints") is not None
        options = _fit_options(variant, data, out, min(step + CHUNK_STEPS, variant.steps), resume)
        started, cpu = time.perf_counter(), _cpu_seconds()
        result = fit(options)
        chunk = {"step": result.step, "seconds": time.perf_counter() - started}
        chunk |= {f"cpu_{k}": v - cpu[k] for k, v in _cpu_seconds().items()}
        with chunks.open("a", encoding="utf-8") as file:
            file.write(json.dumps(chunk) + "\n")
        done.append(chunk)
        step, final = result.step, result.metrics
        print(f"  step {step}/{variant.steps}: loss {final.get('loss', float('nan')):.4f}", flush=True)
    (out / "run" / "model.safetensors").replace(model_path)
    seconds = sum(c["seconds"] for c in done)
    cpu = {k: round(sum(c[f"cpu_{k}"] for c in done), 1) for k in ("trainer", "loader")}
    record = {"train_seconds": seconds, "train_cpu_seconds": cpu, "chunks": len(done), "final": final}
    report.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return model_path, seconds


def _fit_options(variant: Variant, data: Path, out: Path, stop_after: int, resume: bool) -> Any:
    """The FitOptions of one chunk of ``variant``'s run in ``out`` (architecture written there)."""
    from clip_model.train.fit import FitOptions

    arch_path = out / "architecture.json"
    arch_path.write_text(json.dumps(variant.arch, indent=2) + "\n", encoding="utf-8")
    captions = training_captions(data, variant.captions, variant.augment)
    return FitOptions(
        data=data / "train", captions=captions, model=str(arch_path), out_dir=out / "run", steps=variant.steps,
        batch_size=variant.batch_size, lr=variant.lr, warmup_steps=variant.warmup_steps,
        weight_decay=variant.weight_decay, val_fraction=0.0, eval_every=0, save_every=0, log_every=50,
        seed=variant.seed, num_workers=LOADER_WORKERS, device="cpu", stop_after=stop_after, resume=resume,
    )  # fmt: skip


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of this process and of its finished children (the loader processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"trainer": own.ru_utime + own.ru_stime, "loader": children.ru_utime + children.ru_stime}


def evaluate_split(model: Any, preprocess: Any, root: Path, captions: Path) -> dict[str, Any]:
    """Recall@k both ways, zero-shot accuracy per template and class-name set, and per-category breakdowns."""
    from clip_model.train.data import read_pairs
    from clip_model.train.evaluate import encode_dataset, retrieval_metrics, zero_shot_accuracy

    pairs = read_pairs(root, captions)
    encoded = encode_dataset(model, preprocess, pairs, EVAL_BATCH_SIZE)
    image_captions = [p.caption for p in pairs]
    metrics: dict[str, Any] = retrieval_metrics(
        encoded.image_features, encoded.text_features, image_captions, encoded.texts, RECALL_KS
    )
    class_names = {"category": _category_phrase, "word": CATEGORY_WORDS.__getitem__}
    for template_name, template in ZERO_SHOT_TEMPLATES.items():
        for names_name, rename in class_names.items():
            renamed = [replace(p, label=rename(str(p.label))) for p in pairs]
            metrics[f"zero_shot_{template_name}_{names_name}"] = zero_shot_accuracy(
                model, preprocess, renamed, (template,), image_features=encoded.image_features
            )
    metrics["text_to_image_recall@1_by_category"] = recall_at_1_by_category(pairs, encoded)
    metrics["zero_shot_emoji_word_by_category"] = zero_shot_by_category(
        model, pairs, encoded.image_features, ZERO_SHOT_TEMPLATES["emoji"]
    )
    return metrics


def recall_at_1_by_category(pairs: Sequence[Any], encoded: Any) -> dict[str, float]:
    """Text->image recall@1 of the queries of each category (ranked over all images, caption-equality rule)."""
    import torch

    from clip_model.train.evaluate import normalize_caption

    normalized = [normalize_caption(p.caption) for p in pairs]
    best = (encoded.text_features @ encoded.image_features.T).argmax(dim=1)  # [M] top image of each text
    hit = torch.tensor([normalized[int(i)] == text for i, text in zip(best, encoded.texts, strict=True)])
    category_of = {caption: str(p.label) for caption, p in zip(normalized, pairs, strict=True)}
    return {
        category: round(float(hit[[category_of[t] == category for t in encoded.texts]].float().mean()), 4)
        for category in sorted(set(category_of.values()))
    }


def zero_shot_by_category(model: Any, pairs: Sequence[Any], image_features: Any, template: str) -> dict[str, Any]:
    """Zero-shot accuracy per true category (one-word class names) and the share of images predicted as each."""
    from functools import partial

    from clip_model.tokenizer import tokenize
    from clip_model.zeroshot import build_zero_shot_classifier

    categories = sorted(CATEGORY_WORDS)
    tokenizer = partial(tokenize, context_length=model.context_length, truncate=True)
    words = [CATEGORY_WORDS[c] for c in categories]
    classifier = build_zero_shot_classifier(model, words, (template,), tokenize=tokenizer).float().cpu()
    predicted = [categories[int(i)] for i in (image_features.float() @ classifier).argmax(dim=1)]
    truth = [str(p.label) for p in pairs]
    accuracy = {
        c: round(sum(p == t for p, t in zip(predicted, truth, strict=True) if t == c) / truth.count(c), 4)
        for c in categories
        if c in truth
    }
    shares = {c: round(n / len(predicted), 4) for c, n in Counter(predicted).most_common()}
    return {"accuracy": accuracy, "predicted_share": shares}


def _category_phrase(category: str) -> str:
    return category.lower().replace("&", "and")


def chance_levels(root: Path, captions: Path) -> dict[str, float]:
    """Expected metrics of a random ranking (recall@k) and of always answering the majority class (zero-shot)."""
    from math import comb

    records = [json.loads(line) for line in captions.read_text(encoding="utf-8").splitlines() if line.strip()]
    n, relevant = len(records), Counter(r["caption"] for r in records)
    chance = {
        f"text_to_image_recall@{k}": sum(1 - comb(n - r, k) / comb(n, k) for r in relevant.values()) / len(relevant)
        for k in RECALL_KS
    }
    chance |= {f"image_to_text_recall@{k}": k / len(relevant) for k in RECALL_KS}
    chance["zero_shot_majority"] = max(Counter(r["label"] for r in records).values()) / n
    return chance


def run_variant(variant: Variant, data: Path, runs: Path) -> dict[str, Any]:
    """Train (or reuse) and evaluate one variant; its settings, training seconds and metrics."""
    import torch

    import clip_model

    model_path, seconds = train(variant, data, runs)
    model, preprocess = clip_model.load(model_path)
    model.eval()
    splits = {
        EVAL_STYLE: (data / "apple", data / "apple" / "captions.jsonl"),
        **{style: (data / "train", data / "train" / f"eval-{style}.jsonl") for style in TRAIN_STYLES},
    }
    started = time.perf_counter()
    with torch.inference_mode():
        metrics = {split: evaluate_split(model, preprocess, *paths) for split, paths in splits.items()}
    eval_seconds = time.perf_counter() - started
    from clip_model.train.evaluate import read_eval_pairs

    int8 = compare(model_path, read_eval_pairs(*splits[EVAL_STYLE]), f"{EVAL_STYLE} style, names")
    report = json.loads((model_path.parent / "bench.json").read_text(encoding="utf-8"))
    final = report["final"]
    return dataclasses.asdict(variant) | {
        "run": str(model_path.parent),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": report.get("train_cpu_seconds"),
        "eval_seconds": round(eval_seconds, 1),
        "final_loss": final.get("loss"),
        "samples_per_s": final.get("samples_per_s"),
        "final_logit_scale": final.get("logit_scale"),
        "metrics": metrics,
        "int8_vs_fp32": int8,
    }


# ----------------------------------------------------------------------------------------------------------- report


def print_table(results: dict[str, Any]) -> None:
    columns = [
        ("t>i R@1", "text_to_image_recall@1"), ("R@5", "text_to_image_recall@5"), ("R@10", "text_to_image_recall@10"),
        ("i>t R@1", "image_to_text_recall@1"), ("R@5", "image_to_text_recall@5"), ("R@10", "image_to_text_recall@10"),
        ("zs ph/w", "zero_shot_photo_word"), ("zs em/w", "zero_shot_emoji_word"),
        ("zs ph/c", "zero_shot_photo_category"), ("zs em/c", "zero_shot_emoji_category"),
    ]  # fmt: skip
    header = f"{'variant':16s} {'split':8s} {'wall s':>7s} {'cpu s':>7s} " + " ".join(f"{c:>7s}" for c, _ in columns)
    print("\n" + header)
    for v in results["variants"]:
        cpu = (v.get("train_cpu_seconds") or {}).get("trainer", float("nan"))
        for split, m in v["metrics"].items():
            cells = " ".join(f"{m[key]:7.3f}" for _, key in columns)
            print(f"{v['name']:16s} {split:8s} {v['train_seconds']:7.0f} {cpu:7.0f} {cells}")
    chance = results["chance"][EVAL_STYLE]
    cells = [chance.get(key, chance["zero_shot_majority"]) for _, key in columns]
    print(f"{'chance':16s} {EVAL_STYLE:8s} {'':7s} {'':7s} " + " ".join(f"{c:7.4f}" for c in cells))
    print(
        'zs: zero-shot category accuracy, template ph "a photo of a {}." / em "an emoji of {}.", class names '
        "w one word (face, person, flag, ...) / c the category (smileys and emotion, ...); chance zs: majority class"
    )
    for v in results["variants"]:
        by_category = v["metrics"][EVAL_STYLE]["text_to_image_recall@1_by_category"]
        print(f"{v['name']} apple t>i R@1 by category: " + ", ".join(f"{k} {x:.2f}" for k, x in by_category.items()))
    for v in results["variants"]:
        q = v["int8_vs_fp32"]
        points = ", ".join(f"{k.replace('_recall', '')} {d:+.2f}" for k, d in q["int8_minus_fp32_points"].items())
        overlap = ", ".join(f"{k} {x:.3f}" for k, x in q["top10_overlap"].items())
        print(f"{v['name']} int8 - fp32 recall points on {EVAL_STYLE}: {points}; top-10 overlap {overlap}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="cache folder (default: a temporary directory)")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANT,
        help=f"comma-separated variants to run, or 'all' ({', '.join(VARIANTS)}; default {DEFAULT_VARIANT})",
    )
    parser.add_argument("--steps", type=int, default=None, help="override every variant's optimizer steps")
    parser.add_argument("--lr", type=float, default=None, help="override every variant's peak learning rate")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} steps of the default variant (~1 min)"
    )
    parser.add_argument("--tag", default="", help="appended to the results file name")
    return parser.parse_args(argv)


def selected_variants(args: argparse.Namespace) -> list[Variant]:
    names = list(VARIANTS) if args.variants == "all" else [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    steps = QUICK_STEPS if args.quick and args.steps is None else args.steps
    variants = [VARIANTS[n] for n in names]
    if steps is not None:
        variants = [
            dataclasses.replace(v, steps=steps, warmup_steps=min(v.warmup_steps, steps // 10)) for v in variants
        ]
    if args.lr is not None:
        variants = [replace(v, lr=args.lr) for v in variants]
    return variants


def run(args: argparse.Namespace, workdir: Path) -> None:
    from clip_model.process_tuning import set_thread_count

    set_thread_count(THREADS)
    variants = selected_variants(args)
    print("data:", flush=True)
    summary = build_datasets(workdir)
    data = summary.pop("root")
    results = new_results() | {
        "data": summary,
        "chance": {EVAL_STYLE: chance_levels(data / "apple", data / "apple" / "captions.jsonl")},
        "variants": [],
    }
    for variant in variants:
        print(f"{variant.name} ({variant.steps} steps):", flush=True)
        results["variants"].append(run_variant(variant, data, workdir / "runs"))
    print_table(results)
    path = results_file("emoji", "quick" if args.quick else "", args.tag)
    write_json(path, results)
    print(f"\nwrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with workdir_or_temporary(args.workdir, "bench_emoji_") as workdir:
        run(args, workdir)


if __name__ == "__main__":
    main()
