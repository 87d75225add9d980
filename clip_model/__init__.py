"""In-repo CLIP: architectures, tokenizer, preprocessing, safe checkpoint loading, pretrained registry.

Typical use::

    import clip_model
    model, preprocess = clip_model.load("ViT-B-32")               # registry name, or a checkpoint path
    ready = clip_model.load_for_inference("ViT-B-32", precision="int8")  # + fingerprint, CPU inference copy
    ready = clip_model.load_for_inference("ViT-B-32", device="auto")  # fp16 on CUDA where there is one, else fp32
    # clip_model.load(..., precision="int8"): int8 linear layers for CPU inference
    # clip_model.pack_for_cpu(model): float32 CPU inference with oneDNN-packed linear layers (faster, same results)
    image_features = model.encode_image(preprocess(img)[None], normalize=True)
    text_features = model.encode_text(clip_model.tokenize(["a photo of a cat"]), normalize=True)

SigLIP and SigLIP 2 (``clip_model.load("ViT-B-16-SigLIP/webli")``) and OpenCLIP's multilingual models (an XLM-RoBERTa
text tower) load through the same calls and have the same encoders; their text goes through their own SentencePiece
tokenizer (needs the ``siglip`` extra)::

    tokenizer = clip_model.tokenizer_for(model)  # CLIP's BPE for a CLIP
    text_features = model.encode_text(tokenizer(["a photo of a cat"], context_length=model.context_length))
"""

from .checkpoint import read_checkpoint, save_checkpoint, weights_sha256
from .config import (
    CLIPConfig,
    ModelConfig,
    SigLIPConfig,
    XLMRobertaCLIPConfig,
    get_config,
    infer_config,
    list_configs,
)
from .device import (
    INFERENCE_PRECISIONS,
    InferencePrecision,
    Placement,
    choose_precision,
    parse_device,
    resolve_device,
    resolve_placement,
)
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    ChecksumMismatchError,
    ClipModelError,
    DownloadError,
    ImageDecodeError,
    MissingDependencyError,
    TokenizerError,
    UnknownModelError,
    UnsafeCheckpointError,
)
from .factory import (
    PRECISIONS,
    Precision,
    TextTokenizer,
    available_models,
    create_model,
    load,
    preprocess_for,
    tokenizer_for,
    trim_for,
)
from .inference import InferenceModel, load_for_inference
from .model import CLIP, ImageTextModel
from .packed import is_packed, pack_for_cpu
from .preprocess import Preprocess, to_rgb
from .provenance import input_provenance
from .quantize import is_quantized, quantize_int8
from .siglip import SigLIP
from .text_input import DEFAULT_LONG_TEXT, LONG_TEXT_MODES, LongText, TextInput, TextRows, chunk_windows, encode_texts
from .tokenizer import Tokenizer, get_tokenizer, tokenize, trim_tokens
from .tokenizer_sentencepiece import SentencePieceTokenizer
from .xlm_roberta import XLMRobertaCLIP
from .zeroshot import (
    build_zero_shot_classifier,
    classify,
    ensemble_prompts,
    pair_logit_bias,
    prompt_templates,
    zero_shot_probabilities,
    zero_shot_prompts,
)

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CheckpointError",
    "CheckpointMismatchError",
    "ChecksumMismatchError",
    "ClipModelError",
    "DownloadError",
    "ImageDecodeError",
    "INFERENCE_PRECISIONS",
    "ImageTextModel",
    "InferenceModel",
    "InferencePrecision",
    "LONG_TEXT_MODES",
    "DEFAULT_LONG_TEXT",
    "LongText",
    "MissingDependencyError",
    "ModelConfig",
    "PRECISIONS",
    "Placement",
    "Precision",
    "Preprocess",
    "SentencePieceTokenizer",
    "SigLIP",
    "SigLIPConfig",
    "TextInput",
    "TextRows",
    "TextTokenizer",
    "TokenizerError",
    "Tokenizer",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "XLMRobertaCLIP",
    "XLMRobertaCLIPConfig",
    "available_models",
    "build_zero_shot_classifier",
    "choose_precision",
    "chunk_windows",
    "classify",
    "create_model",
    "encode_texts",
    "ensemble_prompts",
    "get_config",
    "get_tokenizer",
    "infer_config",
    "input_provenance",
    "is_packed",
    "is_quantized",
    "list_configs",
    "load",
    "load_for_inference",
    "pack_for_cpu",
    "parse_device",
    "preprocess_for",
    "prompt_templates",
    "quantize_int8",
    "read_checkpoint",
    "resolve_device",
    "resolve_placement",
    "save_checkpoint",
    "to_rgb",
    "tokenize",
    "tokenizer_for",
    "trim_for",
    "trim_tokens",
    "weights_sha256",
    "zero_shot_prompts",
    "zero_shot_probabilities",
    "pair_logit_bias",
]
