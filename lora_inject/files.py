"""Files: JSON configs, safetensors weights and atomic writes, with torch as the only dependency.

The safetensors layout: 8 bytes (little-endian u64) giving the header's length, the header (JSON:
each tensor's ``dtype``, ``shape`` and ``data_offsets`` into the data, and ``__metadata__``), then
the data. Reading checks the header against the data before building any tensor, so that errors
name the tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import tempfile

import torch
from torch import Tensor

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_json(fn: str, file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{fn}(): the adapter's config {file} is missing; save the adapter again.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{fn}(): {file} is not valid JSON ({e}); the file is corrupt.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{fn}(): {file} must hold a JSON object, got {type(config).__name__}.")
    return config


def read_safetensors(fn: str, file: str) -> tuple[dict[str, Tensor], bytes]:
    """Read a safetensors file of floating-point tensors; return them and the file's bytes."""
    try:
        with open(file, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise ValueError(f"{fn}(): the adapter's weights {file} are missing; save it again.") from None
    bad = f"{fn}(): {file} is truncated or corrupt"
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else None
    if n is None or 8 + n > len(blob):
        raise ValueError(f"{bad}: its header says {n} bytes, but {len(blob)} bytes are there. "
                         "Save the adapter again.")
    try:
        header = json.loads(blob[8:8 + n])
        items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                       key=lambda kv: kv[1]["data_offsets"][0])
        for _, info in items:
            start, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            if start < 0 or end < start or any(d < 0 for d in shape):
                raise ValueError(f"offsets {[start, end]}, shape {shape}")
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise ValueError(f"{bad}: its header is not valid ({type(e).__name__}: {e}). "
                         "Save the adapter again.") from None
    body = len(blob) - 8 - n
    data = bytearray(blob[8 + n:])
    tensors = {}
    for key, info in items:
        dtype, shape, (start, end) = info.get("dtype"), info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise TypeError(f"{fn}(): `{key}` in {file} has dtype {dtype} and shape {shape}; LoRA factors "
                            f"must be floating point ({', '.join(_ST_DTYPES)}). Cast them and save again.")
        need = math.prod(shape) * _ST_SIZES[dtype]
        if end - start != need or end > body:
            raise ValueError(f"{bad}: `{key}` ({dtype}, shape {shape}) needs bytes {start}..{start + need} "
                             f"of the data, but the file holds {body}. Save the adapter again.")
        raw = (torch.frombuffer(data, dtype=torch.uint8, count=need, offset=start) if need
               else torch.empty(0, dtype=torch.uint8))
        tensors[key] = raw.view(_ST_DTYPES[dtype]).reshape(shape).clone()
    return tensors, blob


def write_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """Encode ``tensors`` (floating point) as a safetensors file."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        if t.dtype not in _ST_NAMES:
            raise TypeError(f"save_adapter(): `{key}` has dtype {t.dtype}; only floating-point factors are saved.")
        nbytes = t.numel() * t.element_size()
        chunks.append(ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b"")
        header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def write_atomic(file: str, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``file``, then rename it into place."""
    directory, base = os.path.split(file)
    fd, tmp = tempfile.mkstemp(dir=directory or ".", prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
