"""Read the weights out of a TorchScript archive (OpenAI's ``ViT-B-32.pt`` and friends) without running anything.

A TorchScript archive is a zip with one top-level folder ``<prefix>``: ``data.pkl`` pickles the module tree,
``data/<key>`` holds the raw bytes of each storage, ``code/`` the compiled modules' TorchScript source and
``constants.pkl`` the constants that source uses. ``torch.jit.load`` compiles that source, and a plain unpickler
calls whatever ``data.pkl`` names. Here ``data.pkl`` goes through an unpickler that resolves a fixed table of names,
each to a builder in this module that makes a tensor out of storage bytes, and stands an inert :class:`ScriptObject`
in for every scripted class (``__torch__.*``). Every other name is refused before anything is called.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import CheckpointError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

DATA_PICKLE = "data.pkl"
CONSTANTS_PICKLE = "constants.pkl"
CODE_FOLDER = "code"
STORAGE_FOLDER = "data"
BYTEORDER_FILE = "byteorder"
SCRIPT_CLASS_ROOT = "__torch__"  # TorchScript names the archive's own classes __torch__.<python module>.<class>
STORAGE_RECORD_TAG = "storage"
# Scalars OpenAI kept on its traced models for clip.load(jit=True); they are not weights of the architecture.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

# The storage classes a TorchScript (or torch.save) pickle names, by the element type their bytes hold.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# dtypes a pickle may name directly (``_rebuild_tensor_v3`` reinterprets untyped bytes as one of these).
_DTYPE_NAMES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
# In TorchScript source every module class opens with its parameter and buffer names, e.g.
#   class Linear(Module):
#     __parameters__ = ["weight", "bias", ]
#     __buffers__ = []
_MODULE_MEMBERS = re.compile(
    r"^class (?P<name>\w+)\(Module\):\n"
    r"\s+__parameters__ = \[(?P<parameters>[^\]]*)\]\n"
    r"\s+__buffers__ = \[(?P<buffers>[^\]]*)\]",
    re.MULTILINE,
)
_QUOTED_NAME = re.compile(r"\"([^\"]*)\"|'([^']*)'")


class ScriptObject:
    """Inert stand-in for one pickled TorchScript object: its class name and its pickled state, nothing more.

    Subclasses are made per class name by :class:`_RestrictedUnpickler`; none of them runs code from the archive.
    """

    __slots__ = ("state",)
    qualified_name: ClassVar[str] = SCRIPT_CLASS_ROOT

    def __setstate__(self, state: object) -> None:
        self.state = state

    def attributes(self) -> dict[str, object]:
        """The pickled attributes by name; empty when the state was not a dict (or never set)."""
        state = getattr(self, "state", None)
        return state if isinstance(state, dict) else {}


@dataclass(frozen=True)
class _StorageKind:
    """What a storage class name (``torch.HalfStorage``...) resolves to: only the element type of its bytes."""

    name: str
    dtype: torch.dtype


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"tensor record has a malformed {what}: {value!r}")
    return tuple(value)


def _as_strided(storage: object, offset: object, size: object, stride: object) -> torch.Tensor:
    """A view of a 1-D storage tensor, the way a tensor record (offset, size, stride) describes it."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise CheckpointError(f"tensor record does not point at a storage: {type(storage).__name__}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CheckpointError(f"tensor record has a malformed storage offset: {offset!r}")
    sizes = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(sizes) != len(strides) or any(s < 0 for s in sizes + strides):
        raise CheckpointError(f"tensor record has inconsistent size {sizes} and stride {strides}")
    if all(sizes):  # an empty tensor reads nothing, so only non-empty ones must fit
        last = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
        if last >= storage.numel():
            raise CheckpointError(f"tensor record reads element {last} of a storage with {storage.numel()} elements")
    return storage.as_strided(sizes, strides, offset)


def _rebuild_tensor(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> torch.Tensor:
    """Stands in for ``torch._utils._rebuild_tensor_v2``; gradients, hooks and metadata are ignored."""
    return _as_strided(storage, storage_offset, size, stride)


def _rebuild_tensor_from_bytes(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> torch.Tensor:
    """Stands in for ``torch._utils._rebuild_tensor_v3``: untyped storage bytes read as ``dtype``."""
    if not isinstance(dtype, torch.dtype) or not isinstance(storage, torch.Tensor):
        raise CheckpointError(f"tensor record has a malformed dtype {dtype!r} or storage")
    if storage.dtype != dtype:
        if storage.dtype != torch.uint8 or storage.numel() % dtype.itemsize:
            raise CheckpointError(f"a {storage.dtype} storage cannot be read as {dtype}")
        storage = storage.view(dtype)
    return _as_strided(storage, storage_offset, size, stride)


def _rebuild_parameter(data: object, requires_grad: object = False, backward_hooks: object = None) -> object:
    """Stands in for ``torch._utils._rebuild_parameter``: a parameter is read as its plain tensor."""
    return data


def _rebuild_parameter_with_state(data: object, requires_grad: object, backward_hooks: object, state: object) -> object:
    """Stands in for ``torch._utils._rebuild_parameter_with_state``; the extra Python state is dropped."""
    return data


def _build_list(data: object) -> list[object]:
    """Stands in for ``torch.jit._pickle.build_*list`` (typed list attributes of scripted modules)."""
    if not isinstance(data, list):
        raise CheckpointError(f"typed list record holds a {type(data).__name__}, not a list")
    return list(data)


def _restore_type_tag(value: object, type_str: object) -> object:
    """Stands in for ``torch.jit._pickle.restore_type_tag``: the TorchScript type tag is not needed here."""
    return value


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Every name ``data.pkl`` may use, mapped to this module's builders or to inert values."""
    table: dict[tuple[str, str], object] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_from_bytes,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("collections", "OrderedDict"): collections.OrderedDict,  # the (always empty) backward-hooks record
        ("torch.jit._pickle", "build_intlist"): _build_list,
        ("torch.jit._pickle", "build_doublelist"): _build_list,
        ("torch.jit._pickle", "build_boollist"): _build_list,
        ("torch.jit._pickle", "build_tensorlist"): _build_list,
        ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
        ("torch", "UntypedStorage"): _StorageKind("UntypedStorage", torch.uint8),
        ("torch.storage", "UntypedStorage"): _StorageKind("UntypedStorage", torch.uint8),
    }
    for name, dtype in _STORAGE_DTYPES.items():
        table["torch", name] = _StorageKind(name, dtype)
    for name in _DTYPE_NAMES:
        table["torch", name] = getattr(torch, name)
    return table


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with only the names in ``_ALLOWED_GLOBALS`` and inert ``__torch__`` records."""

    def __init__(self, archive: _Archive, member: str) -> None:
        super().__init__(io.BytesIO(archive.read(member)), fix_imports=False)
        self._archive = archive
        self._member = member
        self._classes: dict[str, type[ScriptObject]] = {}
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == SCRIPT_CLASS_ROOT or module.startswith(f"{SCRIPT_CLASS_ROOT}."):
            return self._script_class(f"{module}.{name}")
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name} from {self._member} in {self._archive.path}: "
                "a TorchScript archive's data.pkl may only name tensor builders and its own module classes"
            )
        return allowed

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == STORAGE_RECORD_TAG):
            raise CheckpointError(f"{self._archive.path}: unknown persistent record {str(pid)[:80]!r} in data.pkl")
        _, kind, key, _location, numel = pid  # the device it was saved on does not matter: weights load on CPU
        if not isinstance(kind, _StorageKind) or not isinstance(key, str) or not isinstance(numel, int):
            raise CheckpointError(f"{self._archive.path}: malformed storage record {str(pid)[:80]!r} in data.pkl")
        if key not in self._storages:
            self._storages[key] = self._archive.storage(key, kind.dtype, numel)
        return self._storages[key]

    def _script_class(self, qualified_name: str) -> type[ScriptObject]:
        if qualified_name not in self._classes:
            short = qualified_name.rpartition(".")[2]
            self._classes[qualified_name] = type(
                short if short.isidentifier() else "ScriptObject",
                (ScriptObject,),
                {"__slots__": (), "qualified_name": qualified_name},
            )
        return self._classes[qualified_name]


class _Archive:
    """An open TorchScript zip: member names under its one prefix folder, storage bytes, declared module members."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str) -> None:
        self.path = path
        self.zf = zf
        self.prefix = prefix
        self.names = frozenset(zf.namelist())
        self._declarations: dict[str, dict[str, frozenset[str]]] = {}
        byteorder = self.read(BYTEORDER_FILE).decode("ascii", "replace").strip() if self.has(BYTEORDER_FILE) else ""
        self.big_endian = byteorder == "big"  # archives before the byteorder file were written little-endian

    def has(self, member: str) -> bool:
        return f"{self.prefix}/{member}" in self.names

    def read(self, member: str) -> bytes:
        return self.zf.read(f"{self.prefix}/{member}")

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The 1-D tensor of ``numel`` elements stored as ``data/<key>``."""
        member = f"{STORAGE_FOLDER}/{key}"
        if "/" in key or not self.has(member):
            raise CheckpointError(f"{self.path}: data.pkl refers to storage {key!r}, which the archive lacks")
        nbytes = numel * dtype.itemsize
        raw = bytearray(self.read(member))
        if numel < 0 or len(raw) < nbytes:
            raise CheckpointError(f"{self.path}: storage {key!r} has {len(raw)} bytes, {nbytes} expected")
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        flat = torch.frombuffer(raw, dtype=torch.uint8, count=nbytes)
        if self.big_endian and dtype.itemsize > 1:
            flat = flat.view(-1, dtype.itemsize).flip(1).reshape(-1)
        return flat.view(dtype)

    def declared_members(self, qualified_name: str) -> frozenset[str] | None:
        """Parameter and buffer names the archive's source declares for a module class; None if not found."""
        module, _, class_name = qualified_name.rpartition(".")
        source = f"{CODE_FOLDER}/{module.replace('.', '/')}.py"
        if source not in self._declarations:
            self._declarations[source] = self._parse_declarations(source)
        return self._declarations[source].get(class_name)

    def _parse_declarations(self, source: str) -> dict[str, frozenset[str]]:
        if not self.has(source):
            return {}
        text = self.read(source).decode("utf-8", "replace")
        declared: dict[str, frozenset[str]] = {}
        for match in _MODULE_MEMBERS.finditer(text):
            names = _QUOTED_NAME.findall(match["parameters"] + "," + match["buffers"])
            declared[match["name"]] = frozenset(a or b for a, b in names)
        return declared


def _find_prefix(names: list[str]) -> str | None:
    """The top-level folder holding ``data.pkl`` and TorchScript's ``code/`` or ``constants.pkl``; None if absent."""
    for name in names:
        prefix, _, rest = name.partition("/")
        if rest != DATA_PICKLE:
            continue
        if f"{prefix}/{CONSTANTS_PICKLE}" in names or any(n.startswith(f"{prefix}/{CODE_FOLDER}/") for n in names):
            return prefix
    return None


def is_torchscript_archive(path: Path) -> bool:
    """True for a zip laid out as ``torch.jit.save`` writes it; False for ``torch.save`` zips and anything else."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _find_prefix(zf.namelist()) is not None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def _collect(
    obj: ScriptObject, archive: _Archive, key_prefix: str, ancestors: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Tensors reachable from a module record, keyed by dotted attribute path (what ``state_dict`` would give)."""
    found: dict[str, torch.Tensor] = {}
    declared = archive.declared_members(obj.qualified_name)
    for name, value in obj.attributes().items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            if declared is None or name in declared:  # a scripted module may also hold plain tensor attributes
                found[f"{key_prefix}{name}"] = value.detach()  # a fresh tensor object: no state the pickle set
        elif isinstance(value, ScriptObject) and id(value) not in ancestors:
            found.update(_collect(value, archive, f"{key_prefix}{name}.", (*ancestors, id(value))))
    return found


def read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the module a TorchScript archive holds, as ``state_dict()`` would key them.

    Tensors keep the dtype they were stored in (fp16 for most of OpenAI's weights); OpenAI's extra
    ``input_resolution``/``context_length``/``vocab_size`` entries are dropped. Raises :class:`UnsafeCheckpointError`
    if the pickle names anything beyond tensor builders and the archive's own classes, :class:`CheckpointError` if
    the file is not a readable TorchScript archive.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _find_prefix(zf.namelist())
            if prefix is None:
                raise CheckpointError(f"{path}: not a TorchScript archive (no <prefix>/data.pkl beside code/)")
            archive = _Archive(path, zf, prefix)
            root = _RestrictedUnpickler(archive, DATA_PICKLE).load()
            if not isinstance(root, ScriptObject):
                raise CheckpointError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
            state_dict = _collect(root, archive, "", (id(root),))
    except CheckpointError:
        raise
    except (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        struct.error,
        pickle.UnpicklingError,
        AttributeError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        RuntimeError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise CheckpointError(f"{path}: cannot read TorchScript archive: {type(exc).__name__}: {exc}") from exc
    for key in OPENAI_EXTRA_KEYS:
        state_dict.pop(key, None)
    if not state_dict:
        raise CheckpointError(f"{path}: the TorchScript archive holds no tensors")
    logger.debug("read %d tensors from TorchScript archive %s", len(state_dict), path)
    return state_dict
