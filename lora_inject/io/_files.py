"""Files: JSON configs, safetensors weights (through the ``safetensors`` package) and atomic writes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import tempfile

import torch
from torch import Tensor

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def safetensors_torch(fn: str):
    """The ``safetensors.torch`` module.

    Raises:
        ImportError: if the ``safetensors`` package is missing, saying how to install it.
    """
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(f"{fn}(): adapters are written in the safetensors format, which needs the "
                          "`safetensors` package: pip install 'lora_inject[io]' (or pip install safetensors)."
                          ) from None
    return safetensors.torch


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


def read_safetensors(fn: str, file: str, *, integers: bool = False) -> tuple[dict[str, Tensor], bytes]:
    """Read a safetensors file of floating-point tensors (and, with ``integers``, integer ones);
    return them and the file's bytes.

    Raises:
        ValueError: if the file is missing, truncated or corrupt.
        TypeError: if a tensor is not floating point (or integer, with ``integers``).
    """
    st = safetensors_torch(fn)
    blob = _read_bytes(fn, file)
    try:
        tensors = st.load(blob)
    except Exception as e:  # SafetensorError, and what a hostile header makes the parser raise
        raise ValueError(f"{fn}(): {file} is truncated or corrupt{first_cut(blob)} "
                         f"({type(e).__name__}: {e}). Save the adapter again.") from None
    _check_dtypes(fn, file, tensors, integers)
    return tensors, blob


def read_pickled(fn: str, file: str, *, integers: bool = False) -> dict[str, Tensor]:
    """Read a ``torch.save`` file of a dict of tensors (peft's ``adapter_model.bin``) with
    ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only: a file
    that asks for any other object (a ``__reduce__`` that runs code) is refused, unrun.

    Raises:
        ValueError: if the file is missing, corrupt, holds anything but a dict of str to
            tensors, or asks to unpickle an object that is not a tensor.
        TypeError: if a tensor is not floating point (or integer, with ``integers``).
    """
    blob = _read_bytes(fn, file)
    try:
        tensors = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names what it blocked ("Trying to load unsupported GLOBAL posix.mkdir ..."); other
        # unpickling errors are a broken file
        asked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if asked is None:
            raise ValueError(f"{fn}(): {file} is truncated or corrupt ({str(e).strip().splitlines()[-3:][0]}). "
                             "Save the adapter again.") from None
        raise ValueError(f"{fn}(): {file} is a pickle that asks for objects other than tensors, so it is "
                         f"refused and nothing in it was run ({asked}). Save the adapter with safetensors "
                         "(peft's save_pretrained(..., safe_serialization=True)).") from None
    except Exception as e:  # a truncated or garbage file: zipfile's, pickle's or torch's own errors
        raise ValueError(f"{fn}(): {file} is truncated or corrupt ({type(e).__name__}: {e}). Save the "
                         "adapter again.") from None
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(t, Tensor) for k, t in tensors.items()):
        raise ValueError(f"{fn}(): {file} must hold a dict of str to tensors (a state dict), got "
                         f"{type(tensors).__name__}. It is not an adapter's weights.")
    _check_dtypes(fn, file, tensors, integers)
    return tensors


def _read_bytes(fn: str, file: str) -> bytes:
    """The bytes of an adapter's weights file; raises ``ValueError`` if it is missing."""
    try:
        with open(file, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{fn}(): the adapter's weights {file} are missing; save it again.") from None


def _check_dtypes(fn: str, file: str, tensors: dict[str, Tensor], integers: bool) -> None:
    """Raise ``TypeError`` for a tensor of ``file`` that is not floating point (nor integer, with
    ``integers``)."""
    for key, t in tensors.items():
        if t.dtype not in DTYPES.values() and not (integers and is_integer(t.dtype)):
            raise TypeError(f"{fn}(): `{key}` in {file} has dtype {dtype_name(t.dtype)} and shape "
                            f"{list(t.shape)}; LoRA factors must be floating point ({', '.join(DTYPES)}). "
                            "Cast them and save again.")


def write_pickled(tensors: dict[str, Tensor]) -> bytes:
    """Encode ``tensors`` with ``torch.save``, as peft's ``save_pretrained(safe_serialization=False)``
    writes ``adapter_model.bin``: plain contiguous CPU tensors, each with its own storage."""
    buffer = io.BytesIO()
    torch.save({k: tensors[k].detach().to("cpu").contiguous().clone() for k in sorted(tensors)}, buffer)
    return buffer.getvalue()


def is_integer(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is an integer (or bool) dtype: a counter or index, carried exactly."""
    return not dtype.is_floating_point and not dtype.is_complex


def first_cut(blob: bytes) -> str:
    """``": `key` (dtype, shape [..]) needs bytes a..b of the data, but the file holds n"`` for the
    first tensor whose data lies past the end of ``blob``; ``""`` where the header says nothing."""
    try:
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n])
        body = len(blob) - 8 - n
        cut = sorted((info["data_offsets"][0], key, info) for key, info in header.items()
                     if key != "__metadata__" and info["data_offsets"][1] > body)
    except Exception:  # the header itself is broken: safetensors' message says how
        return ""
    if not cut:
        return ""
    start, key, info = cut[0]
    return (f": `{key}` ({info['dtype']}, shape {info['shape']}) needs bytes {start}..{info['data_offsets'][1]} "
            f"of the data, but the file holds {body}")


def write_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], *, integers: bool = False) -> bytes:
    """Encode ``tensors`` (floating point, and with ``integers`` integer ones) as a safetensors file.

    Raises:
        TypeError: if a tensor is not floating point (or integer, with ``integers``).
    """
    st = safetensors_torch("save_adapter")
    plain, held = {}, set()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        if t.dtype not in DTYPES.values() and not (integers and is_integer(t.dtype)):
            raise TypeError(f"save_adapter(): `{key}` has dtype {t.dtype}; only floating-point factors are saved.")
        # a view of more storage, or one tensor under two keys (a tied pair's copies): its own bytes
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        plain[key] = t if whole and t.untyped_storage().data_ptr() not in held else t.clone()
        held.add(plain[key].untyped_storage().data_ptr())
    return st.save(plain, metadata=dict(metadata) or None)


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
