"""Embedding shards: the one interface between encoding (the local pipeline, a Ray job, ``clip-index export``) and
indexing (``clip-index ingest``).

Layout, format version 2 (:data:`FORMAT_VERSION`; version 1, without the ``photo`` column, is read too)::

    SHARDS_DIR/
      manifest.json                     {"format_version": 2,
                                         "model": {"name", "weights_sha256", "embed_dim",
                                                   "preprocess": {"image_size", "mean", "std",
                                                                  "resize_mode", "family", "tokenizer"}},
                                         "image_root": the image folder as the encoder was given it,
                                         "created_by": e.g. "clip-search 0.1.0"}
      shard-<partition>.parquet         one row per image file; <partition> is [A-Za-z0-9_-]+
      .tmp-shard-<partition>-*.parquet  being written, or left by a crash: never read

Parquet schema of a shard, these columns in this order (Arrow types, saved with the Arrow schema as pyarrow does):

    path       string     not null: relative to the image root, in the stored form of :mod:`indexer.paths`
    sha256     string     64 lowercase hex digits of the file's bytes; null only for a skipped file never read
    size       int64      not null, >= 0: bytes
    mtime_ns   int64      not null
    width      int32      upright pixels, >= 1; null only for a skipped file
    height     int32      likewise
    embedding  fixed_size_list<float32>[embed_dim]   finite, L2 norm within NORM_TOLERANCE of 1
                                                     (:mod:`indexer.store.format`); null iff skipped
    error      string     null, or why the file was skipped, as the local indexer records it (a reason of
                          :mod:`indexer.decode` or :mod:`indexer.scan`)
    photo      string     null, or the photo's metadata as read from the file (capture time, camera...): the
                          JSON object of :meth:`indexer.photo_metadata.PhotoMetadata.to_json`

The schema's key-value metadata holds ``clip_search.model`` (the model as in the manifest, JSON) and
``clip_search.format_version``, so a shard moved to another directory still says which weights made it.

Invariants:

* A shard is written once, under a temp name, fsynced, then linked to its final name (never replacing one) and the
  directory fsynced: a reader sees a whole shard or none.
* A shard is accepted whole or refused whole: :func:`read_shard` validates every row before it returns, and a bad
  row raises :class:`ShardError` naming the file and the row (numbered from 0). The same rules refuse the row in
  :class:`ShardWriter`, so a valid shard is all it writes. Paths are unique within a shard.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from indexer import paths
from indexer.errors import EmbeddingError, IndexerError
from indexer.errors import ShardError as ShardError  # re-exported: the errors of this module's format
from indexer.photo_metadata import PhotoMetadata
from indexer.store import ModelInfo
from indexer.store.format import (
    LEGACY_INPUTS,
    NORM_TOLERANCE,
    _fsync,  # the store's one fsync of a file or directory
)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 has no photo column
MANIFEST_FILE = "manifest.json"
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".parquet"
TEMP_PREFIX = ".tmp-"
SHARD_RE = re.compile(r"shard-([A-Za-z0-9_-]+)\.parquet")
PARTITION_RE = re.compile(r"[A-Za-z0-9_-]+")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MODEL_KEY = b"clip_search.model"
FORMAT_KEY = b"clip_search.format_version"
READ_BATCH_ROWS = 8192  # rows per record batch read from a shard
INSTALL_HINT = "install it with pip install 'clip-search[parquet]'"

Vectors = npt.NDArray[np.float32]
Int64s = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class ShardRows:
    """Rows of a shard, column by column. Row ``i`` is an embedded file iff ``errors[i]`` is None.

    ``embeddings`` is C-contiguous float32 ``[M, D]``: the embedded rows' vectors in row order (see
    :attr:`embedded_rows`); ``size`` and ``mtime_ns`` are int64 ``[N]``.
    """

    paths: list[str]
    sha256: list[str | None]
    size: Int64s
    mtime_ns: Int64s
    width: list[int | None]
    height: list[int | None]
    errors: list[str | None]
    embeddings: Vectors
    photo: list[str | None] | None = None  # PhotoMetadata JSON per row (None: no row has any)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", np.asarray(self.size, dtype=np.int64))
        object.__setattr__(self, "mtime_ns", np.asarray(self.mtime_ns, dtype=np.int64))
        columns = (self.sha256, self.size, self.mtime_ns, self.width, self.height, self.errors, self.photos)
        if any(len(column) != len(self.paths) for column in columns):
            raise ValueError(f"shard columns differ in length: {[len(self.paths), *(len(c) for c in columns)]}")
        if self.embeddings.dtype != np.float32 or self.embeddings.ndim != 2:
            raise EmbeddingError(
                f"embeddings must be float32 [M, D], got {self.embeddings.dtype} {self.embeddings.shape}"
            )
        if len(self.embeddings) != len(self.embedded_rows):
            raise ValueError(f"{len(self.embeddings)} embeddings for {len(self.embedded_rows)} rows without an error")
        object.__setattr__(self, "embeddings", np.ascontiguousarray(self.embeddings))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def photos(self) -> list[str | None]:
        """The photo metadata JSON of each row (None where there is none)."""
        return self.photo if self.photo is not None else [None] * len(self.paths)

    @property
    def embedded_rows(self) -> Int64s:
        """Row numbers of the embedded files: ``embeddings[j]`` belongs to row ``embedded_rows[j]``."""
        return np.asarray([i for i, error in enumerate(self.errors) if error is None], dtype=np.int64)


@dataclass(frozen=True)
class ShardsManifest:
    """``manifest.json`` of a shards directory."""

    model: ModelInfo
    image_root: str
    created_by: str
    format_version: int = FORMAT_VERSION


def write_manifest(
    shards_dir: Path, model: ModelInfo, image_root: str | Path, created_by: str | None = None
) -> ShardsManifest:
    """Create ``shards_dir`` if needed and write its manifest atomically. A manifest already there is kept if it names
    the same model and image root (a rerun resumes); one that does not raises ShardError."""
    shards_dir = Path(shards_dir)
    manifest = ShardsManifest(model, str(image_root), created_by or _this_tool())
    if (shards_dir / MANIFEST_FILE).exists():
        existing = read_manifest(shards_dir)
        if existing.model.same_embeddings(model) and existing.image_root == manifest.image_root:
            return existing
        raise ShardError(
            f"{shards_dir / MANIFEST_FILE} describes shards of model {existing.model.name!r} from "
            f"{existing.image_root!r}, not {model.name!r} from {manifest.image_root!r}: use another directory"
        )
    shards_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True) + "\n"
    tmp = _new_temp(shards_dir, f"{TEMP_PREFIX}manifest-", ".json")
    try:
        tmp.write_text(text, encoding="utf-8")
        _install(tmp, shards_dir / MANIFEST_FILE, replace=True)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def read_manifest(shards_dir: Path, expected: ModelInfo | None = None) -> ShardsManifest:
    """Read and check ``shards_dir``'s manifest; with ``expected``, refuse shards of another model's embeddings."""
    source = Path(shards_dir) / MANIFEST_FILE
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{source} does not exist: {shards_dir} is not a shards directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{source} cannot be read ({exc}): write the shards again") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise ShardError(f"{source} has no integer format_version: write the shards again")
    if version not in READABLE_VERSIONS:
        remedy = "upgrade clip-search" if version > FORMAT_VERSION else "write the shards again"
        raise ShardError(f"{source} has format version {version}; this clip-search reads {READABLE_VERSIONS}: {remedy}")
    try:
        manifest = ShardsManifest(
            _model_of(data["model"]), _text(data["image_root"]), _text(data["created_by"]), version
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardError(
            f"{source} is missing a field or has a malformed one ({exc!r}): write the shards again"
        ) from exc
    if expected is not None:
        _check_model(source, manifest.model, expected)
    return manifest


def list_shards(shards_dir: Path) -> list[Path]:
    """The shard files of ``shards_dir`` sorted by name; temp files and anything else are left out."""
    try:
        names = os.listdir(shards_dir)
    except OSError as exc:
        raise ShardError(f"cannot list the shards directory {shards_dir}: {exc}") from exc
    return [Path(shards_dir) / name for name in sorted(names) if SHARD_RE.fullmatch(name)]


class ShardWriter:
    """Writes ``shard-<partition>.parquet`` of one partition: :meth:`add` validates and appends rows to a temp file,
    :meth:`close` installs it. As a context manager it closes on success and removes the temp file on an error."""

    def __init__(self, shards_dir: Path, partition: str, model: ModelInfo) -> None:
        _, pq = import_pyarrow()
        if not PARTITION_RE.fullmatch(partition):
            raise ShardError(f"partition name {partition!r} is not of the form {PARTITION_RE.pattern}")
        self.path = Path(shards_dir) / f"{SHARD_PREFIX}{partition}{SHARD_SUFFIX}"
        if self.path.exists():
            raise ShardError(f"{self.path} already exists: a partition is written once (delete it to redo it)")
        self._model, self._rows, self._seen = model, 0, set[str]()
        self._schema = shard_schema(model)
        self._tmp = _new_temp(Path(shards_dir), f"{TEMP_PREFIX}{self.path.stem}-", SHARD_SUFFIX)
        try:
            self._writer = pq.ParquetWriter(str(self._tmp), self._schema)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def add(self, rows: ShardRows) -> None:
        """Append ``rows`` after checking them (ShardError names the row within the shard)."""
        check_rows(rows, self._model.embed_dim, str(self.path), self._rows, self._seen)
        self._writer.write_batch(_record_batch(rows, self._schema))
        self._rows += len(rows)

    def close(self) -> Path:
        """Finish the file and install it under its final name; returns that path."""
        self._writer.close()
        try:
            _install(self._tmp, self.path, replace=False)
        finally:
            self._tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Drop what was written; the partition stays unwritten."""
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_shard(path: Path, model: ModelInfo) -> ShardRows:
    """Read and validate a whole shard of ``model``'s embeddings (the manifest's, or the one the caller expects).

    Raises ShardError naming the file, and the row where a row is at fault, before returning anything. Reads record
    batches of READ_BATCH_ROWS into one preallocated ``[N, D]`` array, so the vectors are held once.
    """
    pa, pq = import_pyarrow()
    source = Path(path)
    stored: list[str] = []
    sha256: list[str | None] = []
    size, mtime_ns = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    width: list[int | None] = []
    height: list[int | None] = []
    errors: list[str | None] = []
    photo: list[str | None] = []
    seen: set[str] = set()
    try:
        with pq.ParquetFile(source) as file:
            _check_metadata(source, file.schema_arrow, model)
            embeddings = np.empty((file.metadata.num_rows, model.embed_dim), dtype=np.float32)
            count = 0
            for batch in file.iter_batches(batch_size=READ_BATCH_ROWS):
                rows = _rows_of(batch, source, len(stored))
                check_rows(rows, model.embed_dim, str(source), len(stored), seen)
                embeddings[count : count + len(rows.embeddings)] = rows.embeddings
                count += len(rows.embeddings)
                stored += rows.paths
                sha256 += rows.sha256
                size.append(rows.size)
                mtime_ns.append(rows.mtime_ns)
                width += rows.width
                height += rows.height
                errors += rows.errors
                photo += rows.photos
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"{source} is not a readable Parquet file ({exc}): write it again") from exc
    return ShardRows(
        stored, sha256, np.concatenate(size), np.concatenate(mtime_ns), width, height, errors, embeddings[:count], photo
    )


def check_rows(rows: ShardRows, embed_dim: int, source: str, first_row: int = 0, seen: set[str] | None = None) -> None:
    """Raise ShardError naming ``source`` and the row (``first_row`` + index) of the first rule ``rows`` break.

    ``seen`` collects the paths of the shard's earlier rows, so duplicates across batches are caught too.
    """
    seen = set() if seen is None else seen
    for i, (path, sha256, error) in enumerate(zip(rows.paths, rows.sha256, rows.errors, strict=True)):
        row = first_row + i
        try:
            paths.check_stored(path)
        except (ValueError, TypeError) as exc:
            raise refuse_row(source, row, str(exc), "the path must be relative to the image root, inside it") from None
        if path in seen:
            raise refuse_row(source, row, f"path {path!r} appears twice in the shard", "keep one row per file")
        seen.add(path)
        if sha256 is None:
            if error is None:
                raise refuse_row(source, row, "sha256 is missing", "an embedded file needs the sha256 of its bytes")
        elif not (isinstance(sha256, str) and SHA256_RE.fullmatch(sha256)):
            raise refuse_row(source, row, f"sha256 {sha256!r} is not 64 lowercase hex digits", "hash the file")
        if error is not None and (not isinstance(error, str) or not error):
            raise refuse_row(source, row, f"error {error!r} is not a reason", "say why the file was skipped")
        for name, value in (("width", rows.width[i]), ("height", rows.height[i])):
            if (value is None and error is None) or (value is not None and value < 1):
                raise refuse_row(source, row, f"{name} {value!r} is not a pixel count", "record the image's size")
        photo = rows.photos[i]
        if photo is not None:
            try:
                PhotoMetadata.from_json(photo)
            except ValueError as exc:
                problem = f"photo metadata {photo[:80]!r}: {exc}"
                raise refuse_row(source, row, problem, "write it as the format says") from None
    negative = np.flatnonzero(rows.size < 0)
    if negative.size:
        raise refuse_row(source, first_row + int(negative[0]), "size is negative", "record the file's size in bytes")
    check_embeddings(rows.embeddings, first_row + rows.embedded_rows, embed_dim, source)


def check_embeddings(embeddings: Vectors, row_numbers: Int64s, embed_dim: int, source: str) -> None:
    """Raise ShardError naming the row (``row_numbers[j]`` for ``embeddings[j]``) of the first vector that is not
    ``embed_dim`` wide, finite and L2-normalized within NORM_TOLERANCE."""
    if len(embeddings) and embeddings.shape[1] != embed_dim:
        problem = f"embedding has {embeddings.shape[1]} dimensions, the model has {embed_dim}"
        raise refuse_row(source, int(row_numbers[0]), problem, "encode with the model the manifest names")
    finite = np.all(np.isfinite(embeddings), axis=1)
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1)
    bad = np.flatnonzero(~finite | ~(np.abs(norms - 1.0) <= NORM_TOLERANCE))
    if bad.size:
        j = int(bad[0])
        problem = "embedding has a non-finite value" if not finite[j] else f"embedding has L2 norm {norms[j]:.6f}"
        raise refuse_row(source, int(row_numbers[j]), problem, "store finite, L2-normalized embeddings")


def shard_schema(model: ModelInfo) -> Any:
    """The Arrow schema of a shard of ``model``'s embeddings, its key-value metadata included."""
    pa, _ = import_pyarrow()
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("embedding", pa.list_(pa.float32(), model.embed_dim)),
        pa.field("error", pa.string()),
        pa.field("photo", pa.string()),
    ]
    model_json = json.dumps(dataclasses.asdict(model), sort_keys=True)
    return pa.schema(fields, metadata={MODEL_KEY: model_json.encode(), FORMAT_KEY: str(FORMAT_VERSION).encode()})


def _record_batch(rows: ShardRows, schema: Any) -> Any:
    pa, _ = import_pyarrow()
    skipped = np.asarray([error is not None for error in rows.errors], dtype=bool)
    vectors = np.zeros((len(rows), schema.field("embedding").type.list_size), dtype=np.float32)
    vectors[~skipped] = rows.embeddings
    embedding_type = schema.field("embedding").type
    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1)), type=embedding_type, mask=pa.array(skipped)
    )
    columns = (rows.paths, rows.sha256, rows.size, rows.mtime_ns, rows.width, rows.height)
    arrays = [pa.array(values, type=schema.field(i).type) for i, values in enumerate(columns)]
    extra = [pa.array(rows.errors, pa.string()), pa.array(rows.photos, pa.string())]
    return pa.RecordBatch.from_arrays([*arrays, embedding, *extra], schema=schema)


def _rows_of(batch: Any, source: Path, first_row: int) -> ShardRows:
    """The rows of a record batch whose schema :func:`_check_metadata` accepted; refuses nulls the format forbids."""
    for name in ("path", "size", "mtime_ns"):
        if batch.column(name).null_count:
            row = first_row + batch.column(name).to_pylist().index(None)
            raise refuse_row(source, row, f"{name} is null", f"every row needs a {name}")
    column = batch.column("embedding")
    embedded = column.is_valid().to_numpy(zero_copy_only=False)
    errors = batch.column("error").to_pylist()
    mismatch = np.flatnonzero(embedded != np.asarray([error is None for error in errors], dtype=bool))
    if mismatch.size:
        problem = "has both an embedding and an error" if embedded[mismatch[0]] else "has neither embedding nor error"
        raise refuse_row(source, first_row + int(mismatch[0]), problem, "a row is either embedded or skipped")
    dim = column.type.list_size
    values = column.values.slice(column.offset * dim, len(column) * dim).to_numpy(zero_copy_only=False)
    vectors = values.reshape(len(column), dim)[embedded]  # [M, D]; a null float inside a vector becomes NaN
    path, sha256, width, height = (batch.column(name).to_pylist() for name in ("path", "sha256", "width", "height"))
    size, mtime_ns = (batch.column(name).to_numpy() for name in ("size", "mtime_ns"))
    photo = batch.column("photo").to_pylist() if "photo" in batch.schema.names else None
    return ShardRows(path, sha256, size, mtime_ns, width, height, errors, vectors, photo)


def _check_metadata(source: Path, schema: Any, model: ModelInfo) -> None:
    """Refuse a shard of another format version or model, or whose columns are not the format's."""
    pa, _ = import_pyarrow()
    metadata = schema.metadata or {}
    if MODEL_KEY not in metadata or FORMAT_KEY not in metadata:
        raise ShardError(f"{source} does not say which model made it ({MODEL_KEY!r}): it is not an embedding shard")
    try:
        version, made_by = int(metadata[FORMAT_KEY]), _model_of(json.loads(metadata[MODEL_KEY]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardError(f"{source} has malformed shard metadata ({exc!r}): write it again") from exc
    if version not in READABLE_VERSIONS:
        raise ShardError(f"{source} has shard format version {version}; this clip-search reads {READABLE_VERSIONS}")
    _check_model(source, made_by, model)
    expected = shard_schema(made_by)
    if version == 1:
        expected = expected.remove(expected.get_field_index("photo"))
    if schema.names != expected.names:
        raise ShardError(f"{source} has columns {schema.names}, the format has {expected.names}: write it again")
    for name in expected.names:
        want, got = expected.field(name).type, schema.field(name).type
        if name == "embedding" and pa.types.is_fixed_size_list(got):
            want = pa.list_(pa.float32(), got.list_size)  # any width here: check_embeddings names the row
        if not got.equals(want):
            raise ShardError(f"{source}: column {name!r} has type {got}, the format says {want}: write it again")


def _check_model(source: Path, found: ModelInfo, expected: ModelInfo) -> None:
    if not found.same_embeddings(expected):
        raise ShardError(
            f"{source} holds embeddings of model {found.name!r} (weights sha256 {found.weights_sha256[:12]}..., "
            f"dim {found.embed_dim}), not of {expected.name!r} (weights sha256 {expected.weights_sha256[:12]}..., "
            f"dim {expected.embed_dim}): shards of another model's weights are refused; encode the images again"
        )


def _model_of(data: Any) -> ModelInfo:
    """ModelInfo from its JSON form; KeyError/TypeError/ValueError when malformed."""
    dim, preprocess = data["embed_dim"], data["preprocess"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"embed_dim {dim!r} is not a positive integer")
    mean, std = list(preprocess["mean"]), list(preprocess["std"])
    inputs = {key: _text(preprocess[key]) for key in LEGACY_INPUTS if key in preprocess}
    name, weights = _text(data["name"]), _text(data["weights_sha256"])
    return ModelInfo.of(name, weights, dim, preprocess["image_size"], mean, std, **inputs)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{value!r} is not a non-empty string")
    return value


def refuse_row(source: Path | str, row: int, problem: str, fix: str) -> ShardError:
    """The error that refuses a shard for one row: names the file, the row, what is wrong and how to fix it."""
    return ShardError(f"{source}, row {row}: {problem}; the whole shard is refused ({fix})")


def import_pyarrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, imported on first use (the default install has no need of them); IndexerError
    saying how to install them when they are missing."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise IndexerError(f"embedding shards are Parquet files, which need pyarrow: {INSTALL_HINT}") from exc
    return pyarrow, pyarrow.parquet


def _this_tool() -> str:
    try:
        return f"clip-search {importlib.metadata.version('clip-search')}"
    except importlib.metadata.PackageNotFoundError:
        return "clip-search"


def _new_temp(directory: Path, prefix: str, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    os.close(fd)
    return Path(name)


def _install(tmp: Path, final: Path, *, replace: bool) -> None:
    """Make ``tmp`` durable and visible as ``final`` in one step; with ``replace`` False an existing ``final`` wins
    (ShardError). ``tmp`` is renamed away (replace) or stays behind for the caller to remove."""
    _fsync(tmp)
    if replace:
        os.replace(tmp, final)
    else:
        try:
            os.link(tmp, final)  # fails if ``final`` exists, where a rename would replace it
        except FileExistsError:
            raise ShardError(f"{final} already exists: a partition is written once (delete it to redo it)") from None
    _fsync(final.parent)
