"""rsLoRA (``rslora=True``): the update is scaled by alpha / sqrt(r), as peft's ``use_rslora``;
outputs and gradients match peft's, and the flag survives both on-disk formats."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from torch import nn

import lora_inject as li


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def peft_model(base: nn.Module, **config) -> peft.PeftModel:
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["up", "down"], **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model


def ours_like(base: nn.Module, theirs: peft.PeftModel, ranks: dict[str, int], alpha: float) -> nn.Module:
    """Our model with peft's factors, injected with ``rslora=True`` and per-layer ranks."""
    model = copy.deepcopy(base)
    for name, r in ranks.items():
        li.inject(model, f"^{name}$", r=r, alpha=alpha, rslora=True)
        lora = getattr(model, name).parametrizations.weight[0]
        layer = getattr(theirs.base_model.model, name)
        with torch.no_grad():
            lora.lora_A["default"].copy_(layer.lora_A["default"].weight)
            lora.lora_B["default"].copy_(layer.lora_B["default"].weight)
    return model


@pytest.mark.parametrize("r, alpha", [pytest.param(1, 1.0, id="r1"), pytest.param(4, 6.0, id="r4"),
                                      pytest.param(9, 2.0, id="r9")])
def test_scaling_is_alpha_over_root_r(r, alpha):
    layer = li.inject(nn.Linear(12, 10), "", r=r, alpha=alpha, rslora=True)
    lora = layer.parametrizations.weight[0]
    assert lora.scaling["default"] == alpha / math.sqrt(r)
    with torch.no_grad():
        lora.lora_B["default"].normal_()
    W0 = layer.parametrizations.weight.original
    want = W0 + alpha / math.sqrt(r) * lora.lora_B["default"] @ lora.lora_A["default"]
    torch.testing.assert_close(layer.weight, want)


def test_set_scaling_sets_the_record_and_the_compiled_copy_together():
    layer = li.inject(nn.Linear(12, 10), "", r=4, alpha=4.0)
    lora = layer.parametrizations.weight[0]
    with torch.no_grad():
        lora.lora_B["default"].normal_()
    lora.set_scaling("default", alpha=6.0, rslora=True)
    a = lora.adapter("default")
    assert (a.alpha, a.rslora, a.scaling) == (6.0, True, 3.0)
    assert float(lora.scale_default) == 3.0
    W0 = layer.parametrizations.weight.original
    torch.testing.assert_close(layer.weight, W0 + 3.0 * lora.lora_B["default"] @ lora.lora_A["default"])
    a.alpha = 8.0  # a plain field: only set_scaling touches the tensor copy
    assert float(lora.scale_default) == 3.0
    lora.set_scaling("default")
    assert float(lora.scale_default) == a.scaling == 4.0


def test_outputs_and_gradients_match_peft_use_rslora():
    base = MLP().double()
    theirs = peft_model(base, r=4, lora_alpha=6, use_rslora=True, rank_pattern={"down": 2})
    ours = ours_like(base, theirs, {"up": 4, "down": 2}, alpha=6.0)
    x = torch.randn(5, 6, dtype=torch.float64)
    out_t, out_o = theirs(x), ours(x)
    torch.testing.assert_close(out_o, out_t)
    out_t.square().sum().backward()
    out_o.square().sum().backward()
    for name in ("up", "down"):
        layer = getattr(theirs.base_model.model, name)
        lora = getattr(ours, name).parametrizations.weight[0]
        torch.testing.assert_close(lora.lora_A["default"].grad, layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(lora.lora_B["default"].grad, layer.lora_B["default"].weight.grad)


def test_round_trips_through_peft_use_rslora(tmp_path):
    base = MLP()
    x = torch.randn(5, 6)
    # peft -> ours
    theirs = peft_model(base, r=4, lora_alpha=6, use_rslora=True, rank_pattern={"down": 2}).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = li.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(ours(x), theirs(x))
    for _, lora in li.named_loras(ours):
        assert lora.config["default"]["rslora"]
        assert lora.scaling["default"] == 6 / math.sqrt(lora.config["default"]["r"])
    # ours -> peft: the flag is written as use_rslora, and peft reproduces our outputs
    li.save_adapter(ours, tmp_path / "back", format="peft")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["use_rslora"] is True
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    torch.testing.assert_close(again(x), ours(x))
    # ours -> ours keeps the flag
    li.save_adapter(ours, tmp_path / "ours")
    back = li.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    assert [lora.config["default"]["rslora"] for _, lora in li.named_loras(back)] == [True, True]
    assert torch.equal(back(x), ours(x))
