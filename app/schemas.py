"""Request and response bodies of the REST API (pydantic models; they are the OpenAPI schema at /docs).

Scores are cosine similarities in [-1, 1] between unit vectors, best first. Image URLs are relative to the server.

Numbers are strict: an integer field takes a JSON integer only (``true``, ``1.0`` and ``"1"`` are 422s), a number
field a finite JSON number (not a boolean or a string); path and query integers are plain decimal digits.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from clip_model import InferencePrecision, LongText
from clip_model.zeroshot import MAX_TEMPLATE_CHARS, TEMPLATE_PATTERN, check_template

from .relevance import DEFAULT_MIN_RELEVANCE, SIGMOID_MIN_RELEVANCE, RelevanceKind

MAX_K = 1000
MAX_ID = 2**53 - 1  # image ids are SQLite rowids; capped where JSON numbers stay exact (JavaScript's safe integers)
MAX_LABELS = 100  # zero-shot labels, or candidate texts, per request
MAX_TEMPLATES = 80  # prompt templates per request: the size of the default set
MAX_PARTS = 16  # parts of one combined query
MAX_TEXTS_PER_REQUEST = 256  # texts embedded by one /api/embed/text call
TEXT_FIELD_MAX = 1000  # characters; the settings may lower it (max_text_chars)
K_FIELD = Field(20, ge=1, le=MAX_K, strict=True, description="how many results, 1..1000")
MIN_SCORE_FIELD = Field(
    None,
    ge=-1.0,
    le=1.0,
    strict=True,
    allow_inf_nan=False,
    description="drop results scoring below this cosine similarity",
)
MIN_RELEVANCE_FIELD = Field(
    None,
    ge=0.0,
    le=1.0,
    strict=True,
    allow_inf_nan=False,
    description="text queries only: drop results below this relevance (0..1, see a result's `relevance`); the web "
    f"page uses the served model's `default_min_relevance` (GET /api/stats): {DEFAULT_MIN_RELEVANCE} for a calibrated "
    f"relevance (CLIP), {SIGMOID_MIN_RELEVANCE} for a sigmoid one (SigLIP)",
)
RELEVANCE_KIND_DESCRIPTION = (
    "what `relevance` means for the served model: `calibrated` (CLIP: 0.5 is where the best match of a query "
    "unrelated to the collection lands, 0.99 what one such query in a hundred reaches) or `sigmoid` (SigLIP: the "
    "model's own probability that the text matches the image)"
)
LONG_TEXT_DESCRIPTION = (
    "text longer than the model's context: `truncate` it, or `chunk` it into overlapping windows whose embeddings are "
    "averaged; default: the server's setting (CLIPSEARCH_LONG_TEXT)"
)
LongTextOption = Annotated[LongText | None, Field(description=LONG_TEXT_DESCRIPTION)]
DECIMAL_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also take "1_000", " 7" and "٧"


def _decimal_integer(value: object) -> object:
    """Path and query integers arrive as text: only plain decimal digits are one ("1.0", "1e3", "true" are not)."""
    if isinstance(value, str) and not DECIMAL_INTEGER.fullmatch(value):
        raise ValueError("must be a plain decimal integer, such as 7")
    return value


# Metadata for path and query integers, after the parameter (so the schema keeps its bounds):
# Annotated[int, Query(ge=1), DecimalInteger]
DecimalInteger = BeforeValidator(_decimal_integer)


ISO_MOMENT = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?")


def _iso_text(value: object) -> object:
    """Dates and datetimes arrive as ISO 8601 text only (pydantic would also read numbers, even as text, as Unix
    times)."""
    if not isinstance(value, str) or not ISO_MOMENT.fullmatch(value):
        raise ValueError(
            "must be an ISO 8601 date or datetime, such as 2024-06-01 or 2024-06-01T14:00:00, of a year from 0001 to "
            "9999 (for an open end, leave the parameter out or give 0001-01-01 or 9999-12-31)"
        )
    return value


IsoMoment = Annotated[datetime | date, BeforeValidator(_iso_text)]
CLOCK_FORMAT = "%Y-%m-%dT%H:%M:%S"  # how the API writes capture times: a clock time, no offset


def clock_seconds(moment: datetime | date) -> int:
    """Clock seconds (since 1970-01-01T00:00 of the same clock) of a datetime, its offset dropped, or of a date's
    midnight: capture times are camera clocks (:mod:`indexer.store.filters`)."""
    if not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day)
    return calendar.timegm(moment.replace(tzinfo=None).timetuple())


def clock_text(seconds: int) -> str:
    """The API's text of clock seconds: YYYY-MM-DDTHH:MM:SS."""
    return datetime.fromtimestamp(seconds, UTC).strftime(CLOCK_FORMAT)


MAX_FILTER_VALUES = 20  # folders, cameras or formats in one filter
FilterText = Annotated[str, Field(min_length=0, max_length=TEXT_FIELD_MAX)]


class SearchFilters(BaseModel):
    """Conditions on the images a search returns, all of which must hold (none given: every image). As query
    parameters, a list is the parameter repeated (`?folder=2023&folder=2024`); in a JSON body, an object.

    Capture time is the camera's clock from EXIF when the photo has one, else the file's modification time (UTC);
    ranges compare clock times: an offset given with a datetime is dropped, and a date alone means its midnight."""

    model_config = ConfigDict(extra="forbid")

    folder: list[FilterText] = Field(
        default_factory=list,
        max_length=MAX_FILTER_VALUES,
        description='folders relative to the image root ("2023/Holidays"): their images and their subfolders\' match',
    )
    taken_after: IsoMoment | None = Field(None, description="captured at or after this date or datetime (ISO 8601)")
    taken_before: IsoMoment | None = Field(None, description="captured before this date or datetime (ISO 8601)")
    camera: list[FilterText] = Field(
        default_factory=list,
        max_length=MAX_FILTER_VALUES,
        description='camera make or model, any part of it, case-insensitive ("iphone", "Canon EOS")',
    )
    format: list[FilterText] = Field(
        default_factory=list, max_length=MAX_FILTER_VALUES, description='file formats ("jpeg", "png", "heif", ...)'
    )
    min_width: int | None = Field(None, ge=1, le=10**6, description="upright width in pixels, at least")
    min_height: int | None = Field(None, ge=1, le=10**6, description="upright height in pixels, at least")
    orientation: Literal["landscape", "portrait", "square"] | None = Field(None, description="of the upright image")

    @model_validator(mode="after")
    def _range_not_inverted(self) -> Self:
        """taken_before must come after taken_after (on the clock, as the search compares them)."""
        if self.taken_after is not None and self.taken_before is not None:
            if clock_seconds(self.taken_before) <= clock_seconds(self.taken_after):
                raise ValueError(
                    "taken_before must be later than taken_after (taken_before is exclusive: for the single day "
                    "2024-06-01, give taken_after=2024-06-01 and taken_before=2024-06-02)"
                )
        return self


class QueryFilters(SearchFilters):
    """:class:`SearchFilters` as query parameters, beside the route's others (which the model leaves alone)."""

    model_config = ConfigDict(extra="ignore")


SORT_DESCRIPTION = (
    "order of the results: relevance (best first), or by capture time (newest or oldest first) among the best "
    "10,000 results above the cut-off"
)
SortField = Annotated[Literal["relevance", "newest", "oldest"], Field(description=SORT_DESCRIPTION)]
CURSOR_DESCRIPTION = "the next_cursor of the previous page, to get the page after it (same query, same parameters)"
# a duplicates cursor carries its folder (up to TEXT_FIELD_MAX characters, 4 UTF-8 bytes each at most), in base64
MAX_CURSOR_CHARS = 8192
CursorField = Annotated[str | None, Field(min_length=1, max_length=MAX_CURSOR_CHARS, description=CURSOR_DESCRIPTION)]


class ImageHit(BaseModel):
    """One image result."""

    id: int = Field(description="stable image id")
    path: str = Field(description="path relative to the image folder, POSIX form")
    score: float = Field(description="cosine similarity to the query")
    width: int | None = Field(description="upright width in pixels")
    height: int | None = Field(description="upright height in pixels")
    url: str = Field(description="the original file")
    thumbnail_url: str = Field(description="a small JPEG preview")
    taken_at: str | None = Field(
        None,
        description="capture time, YYYY-MM-DDTHH:MM:SS on the camera's clock (EXIF; no offset: a clock time, not an "
        "instant), else the file's modification time in UTC",
        examples=["2024-06-01T14:03:59"],
    )
    taken_from_exif: bool | None = Field(None, description="whether taken_at came from the photo's EXIF")
    relevance: float | None = Field(
        None,
        description="for text queries, 0..1, by the model (the response's `relevance_kind`): for a CLIP, calibrated "
        "per collection and model, 0.5 is what the best match of a query unrelated to the collection scores and "
        "0.99 what one such query in a hundred reaches; for a SigLIP, the model's own probability that the text "
        "matches the image, sigmoid(exp(logit_scale) * score + logit_bias)",
    )


class SearchResponse(BaseModel):
    """Top-k images for a query."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "results": [
                    {
                        "id": 7,
                        "path": "2024/beach/IMG_0042.jpg",
                        "score": 0.312,
                        "width": 4032,
                        "height": 3024,
                        "url": "/api/images/7/file",
                        "thumbnail_url": "/api/images/7/thumbnail",
                    },
                ],
                "generation": "g-000003",
                "took_ms": 14.2,
                "truncated": False,
            }
        }
    )

    results: list[ImageHit]
    generation: str = Field(description="index generation that answered")
    took_ms: float = Field(description="server time spent on the query")
    truncated: bool = Field(False, description="a query text was longer than the model's context and was cut")
    chunks: int | None = Field(
        None,
        description="text queries: context windows the query's text was encoded as (summed over a combined query's "
        "texts); more than one per text only with long_text=chunk",
    )
    relevance_kind: RelevanceKind | None = Field(
        None, description=f"text queries: {RELEVANCE_KIND_DESCRIPTION}; null for image queries"
    )
    next_cursor: str | None = Field(
        None, description="pass as `cursor` (same query) for the next page; null on the last page"
    )


# at least one character other than ASCII whitespace; spelled out, so that every regex engine (JSON Schema clients,
# pydantic's, Python's) agrees on what matches
NOT_BLANK = r"[^ \t\n\r\f\v]"
QueryText = Annotated[str, Field(min_length=1, max_length=TEXT_FIELD_MAX, pattern=NOT_BLANK)]
# A zero-shot prompt template: clip_model.zeroshot's rule, validated by its parser and stated in the schema as a pattern
Template = Annotated[
    str,
    Field(min_length=2, max_length=MAX_TEMPLATE_CHARS, json_schema_extra={"pattern": TEMPLATE_PATTERN}),
    AfterValidator(check_template),
]
WEIGHT_FIELD = Field(
    1.0, ge=-10.0, le=10.0, strict=True, allow_inf_nan=False, description="multiplies the part's unit embedding"
)
IMAGE_ID_FIELD = Field(ge=0, le=MAX_ID, strict=True, description="an indexed image, by id")


class TextPart(BaseModel):
    """A text term of a combined query; a negative weight subtracts it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"text": "sunset", "weight": 1.0}})

    text: QueryText = Field(description="a text to embed")
    weight: float = WEIGHT_FIELD


class ImagePart(BaseModel):
    """An indexed image as a term of a combined query, by id."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"image_id": 7, "weight": 0.5}})

    image_id: int = IMAGE_ID_FIELD
    weight: float = WEIGHT_FIELD


QueryPart = TextPart | ImagePart


class CombinedQuery(BaseModel):
    """A weighted sum of unit embeddings, normalized, e.g. "beach" + "sunset" - "people"."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "parts": [
                    {"text": "beach", "weight": 1.0},
                    {"text": "sunset", "weight": 1.0},
                    {"text": "people", "weight": -0.5},
                ],
                "k": 20,
            }
        }
    )

    parts: list[QueryPart] = Field(min_length=1, max_length=MAX_PARTS)
    k: int = K_FIELD
    min_score: float | None = MIN_SCORE_FIELD
    filters: SearchFilters | None = Field(None, description="conditions on the images returned")
    min_relevance: float | None = MIN_RELEVANCE_FIELD
    sort: SortField = "relevance"
    cursor: CursorField = None
    long_text: LongTextOption = None


class TextHit(BaseModel):
    text: str
    score: float = Field(description="cosine similarity to the image")
    id: int | None = Field(None, description="id of an indexed text; null for a candidate from the request")
    chunks: int | None = Field(None, description="a candidate from the request: context windows it was encoded as")


class TextsResponse(BaseModel):
    """Texts that best describe an image, from the indexed corpus or from the request's candidates."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {"results": [{"text": "a dog on a beach", "score": 0.29, "id": 12}], "source": "index"}
        }
    )

    results: list[TextHit]
    source: Literal["index", "candidates"]


class DescribeRequest(BaseModel):
    """Image -> text for an indexed image."""

    model_config = ConfigDict(json_schema_extra={"example": {"image_id": 7, "candidates": ["a cat", "a dog"], "k": 5}})

    image_id: int = IMAGE_ID_FIELD
    candidates: list[QueryText] | None = Field(
        None, min_length=1, max_length=MAX_LABELS, description="rank these texts; default: the indexed text corpus"
    )
    k: int = Field(10, ge=1, le=MAX_K, strict=True)
    long_text: LongTextOption = None


class LabelScore(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)
    chunks: int | None = Field(None, description="the most context windows one of the label's prompts was encoded as")


LABELS_DESCRIPTION = "class names, all different"
TEMPLATES_DESCRIPTION = (
    "prompt templates: text with exactly one '{}' for the class name ('{{' and '}}' for literal braces, no other "
    "'{...}' field); default: the CLIP paper's 80 ImageNet prompts, ensembled"
)


class ClassifyRequest(BaseModel):
    """Zero-shot classification of an indexed image."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"image_id": 7, "labels": ["cat", "dog", "beach"], "templates": None}}
    )

    image_id: int = IMAGE_ID_FIELD
    labels: list[QueryText] = Field(
        min_length=1, max_length=MAX_LABELS, json_schema_extra={"uniqueItems": True}, description=LABELS_DESCRIPTION
    )
    templates: list[Template] | None = Field(
        None, min_length=1, max_length=MAX_TEMPLATES, description=TEMPLATES_DESCRIPTION
    )
    long_text: LongTextOption = None


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "labels": [{"label": "dog", "probability": 0.91}, {"label": "cat", "probability": 0.09}],
                "templates": 80,
                "independent": False,
            }
        }
    )

    labels: list[LabelScore] = Field(
        description="every label, most probable first; probabilities sum to 1, unless `independent`"
    )
    templates: int = Field(description="prompt templates ensembled per label")
    independent: bool = Field(
        description="true for a model trained with the sigmoid loss (SigLIP): each probability is the model's own "
        "that the image matches that label, whatever the other labels, so several labels or none can be likely; "
        "false for a softmax-trained model (CLIP): the probabilities share 1 between the labels given"
    )


class EmbedTextRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"texts": ["a photo of a cat"]}})

    texts: list[QueryText] = Field(min_length=1, max_length=MAX_TEXTS_PER_REQUEST)
    long_text: LongTextOption = None


class EmbeddingResponse(BaseModel):
    """Unit-norm float32 embeddings, one row per input, from the served model."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"model": "ViT-B-32", "dim": 3, "embeddings": [[0.6, 0.0, 0.8]]}}
    )

    model: str
    dim: int
    embeddings: list[list[float]]
    truncated: list[bool] | None = Field(None, description="per text: cut to fit the model's context")
    chunks: list[int] | None = Field(
        None, description="per text: context windows it was encoded as (more than one only with long_text=chunk)"
    )


class ImageInfo(BaseModel):
    """Catalog record of an indexed image."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": 7,
                "path": "2024/beach/IMG_0042.jpg",
                "width": 4032,
                "height": 3024,
                "bytes": 2811202,
                "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "url": "/api/images/7/file",
                "thumbnail_url": "/api/images/7/thumbnail",
            }
        }
    )

    id: int
    path: str
    width: int | None
    height: int | None
    bytes: int
    sha256: str | None
    url: str
    thumbnail_url: str


class ImageEmbedding(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"example": {"id": 7, "model": "ViT-B-32", "dim": 3, "embedding": [0.6, 0.0, 0.8]}}
    )

    id: int
    model: str
    dim: int
    embedding: list[float]


class ReadyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"ready": True, "reason": None, "generation": "g-000003"}})

    ready: bool
    reason: str | None = Field(None, description="why not, and what to do")
    generation: str | None = None


class Stats(BaseModel):
    """What is being served."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "ready": True,
                "model": "ViT-B-32",
                "weights_sha256": "40d36571...",
                "embed_dim": 512,
                "generation": "g-000003",
                "built_at": 1764614400.0,
                "images": 12873,
                "texts": 1000,
                "factory": "IVF512,SQ8",
                "image_root": "/photos",
                "reason": None,
                "precision": "fp32",
                "device": "cpu",
                "index_reason": "100,000 vectors: IVF with 8-bit scalar quantization",
                "search_params": {"nprobe": 48},
                "recall_at_10": 0.965,
                "text_encoder": "compiled (in 52 s)",
                "relevance_kind": "calibrated",
                "default_min_relevance": 0.99,
            }
        }
    )

    ready: bool
    reason: str | None
    model: str | None
    weights_sha256: str | None
    embed_dim: int | None
    generation: str | None
    built_at: float | None = Field(description="Unix time the served generation was published")
    images: int
    texts: int
    factory: str | None
    image_root: str | None
    precision: InferencePrecision = Field("fp32", description="the encoders' arithmetic (CLIPSEARCH_PRECISION)")
    device: str = Field("cpu", description="where the encoders run, `cpu` or `cuda:N` (CLIPSEARCH_DEVICE)")
    text_encoder: str | None = Field(
        None, description="how text queries are encoded: eager, or compiled (CLIPSEARCH_COMPILE_TEXT), and why"
    )
    index_reason: str | None = Field(None, description="why the indexer chose `factory`")
    search_params: dict[str, int] = Field(
        default_factory=dict, description="search-time parameters of the image index (e.g. nprobe), as calibrated"
    )
    recall_at_10: float | None = Field(
        None, description="measured recall@10 of the image index against exact search (1.0 for a flat index)"
    )
    relevance_kind: RelevanceKind | None = Field(
        None,
        description=f"{RELEVANCE_KIND_DESCRIPTION}; null while nothing is served, or a CLIP's generation has no image",
    )
    default_min_relevance: float | None = Field(
        None,
        description=f"the `min_relevance` the web page applies for the served model: {DEFAULT_MIN_RELEVANCE} when "
        f"calibrated, {SIGMOID_MIN_RELEVANCE} for a sigmoid (the model's probability; app/relevance.py says why not "
        "0.5); null with `relevance_kind`",
    )


class ReindexStatus(BaseModel):
    """The last reindex the server started (a separate `clip-index build` process)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "state": "running",
                "pid": 4242,
                "started_at": 1764614400.0,
                "finished_at": None,
                "exit_code": None,
                "command": ["clip-index", "build", "/photos"],
                "log_tail": [],
            }
        }
    )

    state: Literal["idle", "running", "succeeded", "failed"]
    pid: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    command: list[str] = Field(default_factory=list)
    log_tail: list[str] = Field(default_factory=list, description="last lines the indexer logged")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx: a message saying what went wrong and what to change, or, for requests that do not
    fit the schema (422), FastAPI's list of validation errors, one per offending field."""

    model_config = ConfigDict(json_schema_extra={"example": {"detail": "no indexed image has id 42"}})

    detail: str | list[dict[str, Any]]
