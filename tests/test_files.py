"""The weights file: written and read through the safetensors package, with errors that name the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from lora_inject.io._files import read_safetensors, write_atomic, write_safetensors

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _tensors():
    out = {f"m.{i}.lora_A": torch.randn(3, 5).to(d) for i, d in enumerate(DTYPES)}
    out["m.empty.lora_B"] = torch.empty(4, 0)
    out["m.big.lora_B"] = torch.randn(2, 3, 4)[:, 1]  # not contiguous
    return out


def test_written_files_load_in_safetensors():
    tensors = _tensors()
    loaded = load(write_safetensors(tensors, {"format": "pt", "k": "v"}))
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)


def test_safetensors_files_read_back(tmp_path):
    tensors = _tensors()
    file = tmp_path / "w.safetensors"
    write_atomic(str(file), save({k: t.contiguous() for k, t in tensors.items()}, metadata={"format": "pt"}))
    loaded, blob = read_safetensors("load_adapter", str(file))
    assert blob == file.read_bytes()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)


def test_integer_tensors_are_refused_with_their_key(tmp_path):
    file = tmp_path / "w.safetensors"
    file.write_bytes(save({"x.lora_A": torch.ones(2, 2, dtype=torch.int32)}))
    with pytest.raises(TypeError, match=r"`x.lora_A`.*int32.*\[2, 2\]"):
        read_safetensors("load_adapter", str(file))


def test_truncated_file_is_refused_with_its_key(tmp_path):
    file = tmp_path / "w.safetensors"
    file.write_bytes(write_safetensors({"x.lora_A": torch.ones(4, 4)}, {})[:-8])
    with pytest.raises(ValueError, match=r"w.safetensors is truncated or corrupt"):
        read_safetensors("load_adapter", str(file))
