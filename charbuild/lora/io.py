"""Reading and writing LoRA files, validated (the model in memory is :mod:`charbuild.lora.modules`).

:func:`load_lora` reads ``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` with
``torch.load(weights_only=True)`` only: nothing is ever unpickled; it validates through
:func:`~charbuild.lora.modules.build_lora`.

:func:`save_lora` writes atomically and stores ``sshs_model_hash``/``sshs_legacy_hash`` exactly
as sd-scripts' ``train_util.precalculate_safetensors_hashes`` computes them (sha256 of the tensor
data part; first 8 hex digits of the sha256 of bytes ``0x100000 … 0x110000`` of the file as
serialised with only the ``ss_*`` metadata). :func:`stream_lora` writes the same way tensor by
tensor, for producers that make the file module by module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from charbuild.errors import LoraFileError
from charbuild.fsutil import atomic_path

from charbuild.lora.modules import LoraFile, LoraModule, build_lora, build_modules_unchecked, lora_to_tensors

__all__ = ["LoraFile", "LoraModule", "build_lora", "build_modules_unchecked", "header_room", "load_lora",
           "lora_to_tensors", "save_lora", "sd_scripts_hashes", "stream_lora"]

LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000


def load_lora(path: str | Path) -> LoraFile:
    """Read and validate a LoRA file (``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` without unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError("no such LoRA file", path)
    tensors, metadata = _read_tensors(path)
    return build_lora(tensors, metadata, path=str(path))


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but plain tensors, or a corrupt file
            raise LoraFileError(
                f"cannot read as a weights-only torch file (charbuild never unpickles code): {exc}", path
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
            raise LoraFileError("not a LoRA file: the torch file does not hold a dict of tensors", path)
        return dict(obj), {}
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as exc:
        raise LoraFileError(f"not a readable safetensors file: {exc}", path) from None
    return tensors, metadata


# safetensors' dtype names in its own order: a file lists the tensors by this order descending
# (larger dtypes first), then by name (checked against the library in the tests).
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}  # fmt: skip
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(_SAFETENSORS_DTYPES)}


TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]  # key, dtype, shape: one header entry


def _order_key(key: str, dtype: torch.dtype) -> tuple[int, str]:
    if dtype not in _DTYPE_RANK:
        raise TypeError(f"tensor {key!r}: dtype {dtype} cannot be stored in a safetensors LoRA")
    return -_DTYPE_RANK[dtype], key


def _file_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys in the order safetensors lays out their data."""
    return sorted(tensors, key=lambda k: _order_key(k, tensors[k].dtype))


def _specs(tensors: dict[str, torch.Tensor], order: list[str]) -> list[TensorSpec]:
    return [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order]


def _layout(specs: list[TensorSpec]) -> list[tuple[str, dict]]:
    """Each tensor's header entry, in file order, its fields in the library's order."""
    entries, pos = [], 0
    for key, dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize
        entries.append((key, {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + size]}))
        pos += size
    return entries


def _byte_view(tensor: torch.Tensor):
    """A zero-copy little-endian byte view of a contiguous tensor (keeps the tensor alive)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """The safetensors JSON header of ``specs`` (in file order), keys sorted, padded with spaces
    to a multiple of 8 bytes.

    The library writes the same compact JSON in hash-map order, so identical input gave
    different bytes in different processes; md5-based early cut-off and ``doit -n`` builds need
    identical bytes. Compact JSON has the same length in any key order, so offsets and sizes
    equal the library's. ``metadata=None`` leaves ``__metadata__`` out; ``{}`` writes it empty.
    """
    entries: dict[str, object] = dict(_layout(specs))
    if metadata is not None:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


_HASH_PLACEHOLDERS = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


def header_room(specs: list[TensorSpec], metadata: dict[str, str] | None) -> int:
    """Bytes the header of ``specs`` + ``metadata`` takes once the sshs hashes are added."""
    return len(_header(specs, {**(metadata or {}), **_HASH_PLACEHOLDERS}))


def _library_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The header safetensors itself writes for sd-scripts' ss_-only hash copy, byte for byte
    except the order inside ``__metadata__`` (the library's is a hash map's, different in every
    process; sorted here): ``__metadata__`` first, then the tensors in data order, each as
    ``dtype``, ``shape``, ``data_offsets``. It matters only when the header reaches the legacy
    hash's bytes (a header over 1 MB, such as a big ``ss_tag_frequency``); where those bytes
    fall inside ``__metadata__`` sd-scripts' own legacy hash differs from run to run.
    """
    entries = {"__metadata__": dict(sorted(metadata.items())), **dict(_layout(specs))}
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def _legacy_hash(ss_header: bytes, read_data) -> str:
    """sd-scripts' legacy hash: sha256 (first 8 hex digits) of LEGACY_HASH_LENGTH bytes at
    LEGACY_HASH_OFFSET of the file it saves with only the ``ss_*`` metadata (header ``ss_header``
    and the data part, of which ``read_data(offset, length)`` returns bytes; fewer at its end)."""
    prefix = len(ss_header).to_bytes(8, "little") + ss_header
    start, end = LEGACY_HASH_OFFSET, LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH
    part = prefix[start:end]
    if end > len(prefix):
        lo = max(start, len(prefix))
        part += read_data(lo - len(prefix), end - lo)
    return hashlib.sha256(part).hexdigest()[:8]


def _ss_only(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k.startswith("ss_")}


def sd_scripts_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as sd-scripts precalculates them (in memory).

    sd-scripts hashes a copy saved with only the ``ss_*`` metadata: the model hash is the sha256
    of its data part, the legacy hash covers LEGACY_HASH_LENGTH bytes at LEGACY_HASH_OFFSET.
    """
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    order = _file_order(tensors)
    views = [_byte_view(tensors[k]) for k in order]
    sha = hashlib.sha256()
    for view in views:
        sha.update(view)

    def read_data(offset: int, length: int) -> bytes:
        out, pos = bytearray(), 0
        for view in views:
            lo, hi = max(offset - pos, 0), min(offset + length - pos, view.nbytes)
            if lo < hi:
                out += view[lo:hi].tobytes()
            pos += view.nbytes
        return bytes(out)

    return sha.hexdigest(), _legacy_hash(_library_header(_specs(tensors, order), _ss_only(metadata)), read_data)


class LoraStream:
    """A safetensors file being written tensor by tensor: see :func:`stream_lora`."""

    def __init__(self, f, room: int, pool: ThreadPoolExecutor) -> None:
        self._f, self._room, self._pool = f, room, pool
        self._sha = hashlib.sha256()
        self._specs: list[TensorSpec] = []
        self._hashing: list = []
        self._last: tuple[int, str] | None = None
        self.metadata: dict[str, str] | None = None
        f.write(room.to_bytes(8, "little") + b" " * room)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; keys must come in safetensors order (dtype, then name)."""
        tensor = tensor.contiguous()
        order = _order_key(key, tensor.dtype)
        if self._last is not None and order <= self._last:
            raise ValueError(f"tensor {key!r} comes out of safetensors order")
        self._last = order
        view = _byte_view(tensor)
        self._f.write(view)
        self._hashing = [h for h in self._hashing if not h.done()]
        self._hashing.append(self._pool.submit(self._sha.update, view))  # in order: one hashing thread
        self._specs.append((key, tensor.dtype, tuple(tensor.shape)))

    def finish(self, metadata: dict[str, str] | None) -> dict[str, str]:
        """Fill in the header with ``metadata`` and fresh sshs hashes; return the metadata written."""
        for h in self._hashing:
            h.result()
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        data_start = 8 + self._room

        def read_data(offset: int, length: int) -> bytes:
            self._f.seek(data_start + offset)
            return self._f.read(length)

        legacy = _legacy_hash(_library_header(self._specs, _ss_only(meta)), read_data)
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = self._sha.hexdigest(), legacy
        header = _header(self._specs, meta)
        if len(header) > self._room:  # pragma: no cover - callers reserve header_room() or more
            raise RuntimeError(f"the header needs {len(header)} bytes, {self._room} were reserved")
        self._f.seek(8)
        self._f.write(header + b" " * (self._room - len(header)))
        self.metadata = meta
        return meta


@contextlib.contextmanager
def stream_lora(path: str | Path, room: int) -> Iterator[LoraStream]:
    """Write a safetensors LoRA atomically, tensor by tensor, with ``room`` bytes reserved for
    the header (at least :func:`header_room` of what it will hold; the rest is padded with
    spaces, which the format allows). A second thread hashes the data while it is written.
    Call ``finish(metadata)`` at the end; on any error nothing is left at ``path``.
    """
    room += -room % 8  # data 8-byte aligned, as the library writes it
    with atomic_path(path) as tmp, open(tmp, "w+b") as f, ThreadPoolExecutor(1) as pool:
        stream = LoraStream(f, room, pool)
        yield stream
        if stream.metadata is None:
            raise RuntimeError("stream_lora: finish() was not called")


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write ``tensors`` + ``metadata`` atomically as safetensors, with fresh sshs hashes.

    Returns the metadata as written. One pass over the data: it is written from zero-copy views
    while a second thread hashes them; the header (sorted keys, so the same input gives the same
    bytes) is filled in at the end. The data part is byte for byte the library's.
    """
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    order = _file_order(tensors)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with stream_lora(path, header_room(_specs(tensors, order), meta)) as out:
        for key in order:
            out.add(key, tensors[key])
        return out.finish(meta)
