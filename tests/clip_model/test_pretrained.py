"""The pretrained-weights registry: names, aliases, data integrity (digest format, configs that exist)."""

from __future__ import annotations

import ast
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from clip_model import pretrained
from clip_model.config import CLIPConfig, SigLIPConfig, get_config
from clip_model.constants import INCEPTION_MEAN, INCEPTION_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from clip_model.errors import UnknownModelError
from clip_model.pretrained import PretrainedWeights, get_pretrained, list_aliases, list_pretrained, resolve_pretrained
from tests.reference import reference_dir

CONFIG_DIR = Path(str(resources.files("clip_model").joinpath("configs")))
SHA256_RE = re.compile(r"[0-9a-f]{64}")

# OpenAI's release names -> (canonical name, architecture config)
OPENAI_NAMES = {
    "RN50": ("RN50/openai", "RN50"),
    "RN101": ("RN101/openai", "RN101"),
    "RN50x4": ("RN50x4/openai", "RN50x4"),
    "RN50x16": ("RN50x16/openai", "RN50x16"),
    "RN50x64": ("RN50x64/openai", "RN50x64"),
    "ViT-B/32": ("ViT-B-32/openai", "ViT-B-32-quickgelu"),
    "ViT-B/16": ("ViT-B-16/openai", "ViT-B-16-quickgelu"),
    "ViT-L/14": ("ViT-L-14/openai", "ViT-L-14-quickgelu"),
    "ViT-L/14@336px": ("ViT-L-14-336/openai", "ViT-L-14-336-quickgelu"),
}
REQUIRED_OPENCLIP = {
    "ViT-B-32/laion2b_s34b_b79k": "ViT-B-32",
    "ViT-L-14/laion2b_s32b_b82k": "ViT-L-14",
    "ViT-H-14/laion2b_s32b_b79k": "ViT-H-14",
}


def _all() -> list[PretrainedWeights]:
    return [get_pretrained(name) for name in list_pretrained()]


@pytest.mark.parametrize("openai_name", sorted(OPENAI_NAMES))
def test_openai_release_names_resolve(openai_name: str) -> None:
    canonical, config = OPENAI_NAMES[openai_name]
    weights = get_pretrained(openai_name)
    assert weights.name == canonical
    assert weights.config == config
    assert weights.format == "torchscript"
    assert weights.url.startswith("https://openaipublic.azureedge.net/clip/models/")
    assert weights.filename == weights.url.rsplit("/", 1)[1]
    assert (weights.mean, weights.std) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert get_pretrained(canonical) is weights


def test_openai_entries_match_reference_release_table() -> None:
    """URLs and digests are OpenAI's, as listed in the reference package's ``_MODELS`` (read, not imported)."""
    try:
        source = (reference_dir() / "clip.py").read_text(encoding="utf-8")
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"reference CLIP package unavailable: {exc}")
    table = next(
        ast.literal_eval(node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_MODELS" for t in node.targets)
    )
    assert set(table) == set(OPENAI_NAMES)
    for name, url in table.items():
        weights = get_pretrained(name)
        assert weights.url == url
        assert weights.sha256 == url.split("/")[-2]  # OpenAI put the digest in the path; the registry carries it


def test_bare_architecture_names_prefer_openai_weights() -> None:
    for arch in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
        assert get_pretrained(arch).name == f"{arch}/openai"
    for config in ("ViT-B-32-quickgelu", "ViT-L-14-336-quickgelu"):
        assert get_pretrained(config).name.endswith("/openai")
        assert get_pretrained(f"{config}/openai").config == config


def test_vit_h_14_without_openai_weights_resolves_to_laion() -> None:
    assert get_pretrained("ViT-H-14").name == "ViT-H-14/laion2b_s32b_b79k"


@pytest.mark.parametrize("name", sorted(REQUIRED_OPENCLIP))
def test_required_openclip_entries(name: str) -> None:
    weights = get_pretrained(name)
    assert weights.config == REQUIRED_OPENCLIP[name]
    assert weights.url.startswith("https://huggingface.co/laion/")
    assert "/resolve/" in weights.url
    assert weights.format in {"state_dict", "safetensors"}
    assert weights.format == ("safetensors" if weights.url.endswith(".safetensors") else "state_dict")


def test_inception_statistics_only_where_trained_with_them() -> None:
    """SigLIP models and one LAION CLIP were trained on pixels scaled to [-1, 1]; the other CLIPs on OpenAI's."""
    assert get_pretrained("ViT-L-14/laion2b_s32b_b82k").mean == INCEPTION_MEAN
    assert get_pretrained("ViT-L-14/laion2b_s32b_b82k").std == INCEPTION_STD
    for weights in _all():
        if isinstance(get_config(weights.config), SigLIPConfig):
            assert (weights.mean, weights.std) == (INCEPTION_MEAN, INCEPTION_STD), weights.name
        elif weights.name != "ViT-L-14/laion2b_s32b_b82k":
            assert (weights.mean, weights.std) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), weights.name


def test_sha256_is_lowercase_hex_or_null() -> None:
    for weights in _all():
        assert weights.sha256 is None or SHA256_RE.fullmatch(weights.sha256), weights.name
        assert weights.verified == (weights.sha256 is not None)


def test_sha256_is_never_derived_from_a_huggingface_url() -> None:
    for weights in _all():
        if weights.sha256 is not None and "huggingface.co" in weights.url:
            assert weights.sha256 not in weights.url


def test_every_config_exists() -> None:
    shipped = {p.stem for p in CONFIG_DIR.glob("*.json")}
    assert shipped, f"no configs found in {CONFIG_DIR}"
    for weights in _all():
        assert weights.config in shipped, f"{weights.name}: no {weights.config}.json in {CONFIG_DIR}"


def test_filenames_are_plain_and_unique() -> None:
    names = [w.filename for w in _all()]
    assert len(names) == len(set(names))
    for name in names:
        assert name == Path(name).name and name not in {".", ".."}


def test_formats_are_known() -> None:
    for weights in _all():
        assert weights.format in pretrained.WEIGHTS_FORMATS
        if weights.format == "torchscript":
            assert weights.filename.endswith(".pt")


def test_canonical_names_are_arch_slash_tag() -> None:
    for name in list_pretrained():
        arch, tag = name.split("/")
        assert arch and tag


def test_aliases_all_resolve_to_canonical_entries() -> None:
    canonical = set(list_pretrained())
    for alias, target in list_aliases().items():
        assert target in canonical
        assert resolve_pretrained(alias) == get_pretrained(target)


def test_lookup_ignores_case_and_surrounding_space() -> None:
    assert get_pretrained("  vit-b/32 ").name == "ViT-B-32/openai"
    assert get_pretrained("VIT-B-32/LAION2B_S34B_B79K").name == "ViT-B-32/laion2b_s34b_b79k"


def test_unknown_names() -> None:
    assert resolve_pretrained("ViT-B-33") is None
    assert resolve_pretrained("") is None
    with pytest.raises(UnknownModelError, match="Did you mean") as info:
        get_pretrained("ViT-B-33")
    assert "ViT-B-32" in str(info.value)
    with pytest.raises(UnknownModelError) as info:
        get_pretrained("ViT-B-32/laion2b_s34b_b78k")
    assert "ViT-B-32/laion2b_s34b_b79k" in str(info.value)
    with pytest.raises(ValueError):  # UnknownModelError is also a ValueError
        get_pretrained("no-such-model-at-all")


def test_registry_is_read_lazily_and_once() -> None:
    pretrained._registry.cache_clear()
    assert pretrained._registry.cache_info().currsize == 0
    list_pretrained()
    get_pretrained("RN50")
    info = pretrained._registry.cache_info()
    assert (info.misses, info.currsize) == (1, 1)


def test_weights_are_frozen() -> None:
    weights = get_pretrained("RN50")
    with pytest.raises(AttributeError):
        weights.sha256 = None  # type: ignore[misc]  # assigning a frozen field on purpose


def test_registry_file_has_notice_and_only_known_fields() -> None:
    doc = json.loads(resources.files("clip_model").joinpath("data/pretrained.json").read_text(encoding="utf-8"))
    assert "OpenAI" in doc["notice"] and "open_clip" in doc["notice"]
    fields = {"url", "sha256", "filename", "config", "mean", "std", "format", "source"}
    for name, entry in doc["weights"].items():
        sentencepiece = not isinstance(get_config(entry["config"]), CLIPConfig)  # its vocabulary is not bundled
        assert set(entry) == (fields | {"tokenizer"} if sentencepiece else fields), name
        assert entry["source"].strip(), name


def test_bad_registry_data_is_rejected() -> None:
    good = {
        "url": "https://example.invalid/x.pt",
        "sha256": None,
        "filename": "x.pt",
        "config": "RN50",
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "format": "torchscript",
        "source": "test",
    }
    assert pretrained._parse_entry("x/y", good).sha256 is None
    for bad in (
        {"sha256": "ABC"},
        {"sha256": "F" * 64},
        {"filename": "../escape.pt"},
        {"filename": "a/b.pt"},
        {"format": "pickle"},
        {"mean": [0.5, 0.5]},
    ):
        with pytest.raises(ValueError):
            pretrained._parse_entry("x/y", {**good, **bad})
