"""Named constants shared across clip_model (normalization statistics, context length, vocabulary)."""

from __future__ import annotations

# Per-channel RGB mean/std of OpenAI's CLIP training data, applied after scaling pixels to [0, 1].
OPENAI_DATASET_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# Some OpenCLIP checkpoints (e.g. ViT-L-14 laion2b_s32b_b82k) were trained with Inception-style statistics.
INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

DEFAULT_CONTEXT_LENGTH = 77  # tokens, start and end token included
VOCAB_SIZE = 49408  # 256 byte tokens x 2 (plain and end-of-word) + 48,894 merges + start + end
