"""peft's format both ways for the kinds peft has besides LoRA (LoHa, LoKr, OFT, IA³, VeRA), with
peft itself as the oracle.

(a) peft makes an adapter with every trainable tensor random and saves it; we load it onto the
plain base and must give peft's outputs. (b) We inject the same kind with random tensors and save
it in peft's format; peft must load it and give our outputs. (c) ``remove(merge=False)`` gives the
base back exactly. What peft's format cannot hold is refused, and the model is left as it was.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import peft
import pytest
import torch
from _helpers import assert_unchanged, noise, randomize_kind, snapshot
from _models import gpt2, llama
from safetensors.torch import load_file, save_file
from torch import nn

import lora_inject as li

TOL = dict(rtol=1e-5, atol=1e-5)


class Net(nn.Module):
    """Linear and Conv layers: conv3 (3x3), conv1 (1x1), c1d (Conv1d), then two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.c1d = nn.Conv1d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8 * 16, 16)
        self.out = nn.Linear(16, 12)

    def forward(self, x):
        h = torch.relu(self.conv1(torch.relu(self.conv3(x))))
        h = torch.relu(self.c1d(h.flatten(2))).flatten(1)
        return self.out(torch.relu(self.lin(h)))


X = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))


def run(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def randomize_peft(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(noise(p, gen, "oft_R" if ".oft_R." in name else name.rsplit(".", 2)[-2]))


# kind, peft config, our inject arguments (targets, kw): the same adapter both ways
T = ["conv3", "conv1", "c1d", "lin", "out"]
TK = ["conv3", "conv1", "lin", "out"]  # LoKr: peft's full lokr_w2 on a Conv1d is refused (a test below)
CASES = {
    "loha": (lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=T), dict(r=2, alpha=4.0)),
    "loha-effective": (lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=T, use_effective_conv2d=True,
                                               rank_pattern={"lin": 3}, alpha_pattern={"out": 5}),
                       None),
    "lokr": (lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=TK), dict(r=2, alpha=4.0)),
    "lokr-full": (lambda: peft.LoKrConfig(r=16, alpha=4, target_modules=TK), dict(r=16, alpha=4.0)),
    "lokr-both": (lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=TK, decompose_both=True, decompose_factor=4,
                                          use_effective_conv2d=True), dict(r=1, alpha=2.0, decompose_both=True,
                                                                           decompose_factor=4,
                                                                           use_effective_conv2d=True)),
    "oft": (lambda: peft.OFTConfig(oft_block_size=4, target_modules=["conv1", "lin", "out"]),
            dict(oft_block_size=4)),
    "oft-r": (lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=["conv1", "lin", "out"]),
              dict(r=4, oft_block_size=0)),
    "oft-exact-coft": (lambda: peft.OFTConfig(oft_block_size=2, target_modules=["conv1", "lin"], coft=True,
                                              eps=1e-2, use_cayley_neumann=False),
                       dict(oft_block_size=2, coft=True, eps=1e-2, use_cayley_neumann=False)),
    "oft-share": (lambda: peft.OFTConfig(oft_block_size=8, target_modules=["conv1", "lin"], block_share=True,
                                         num_cayley_neumann_terms=7),
                  dict(oft_block_size=8, block_share=True, num_cayley_neumann_terms=7)),
    "ia3": (lambda: peft.IA3Config(target_modules=["conv3", "conv1", "lin", "out"],
                                   feedforward_modules=["conv1", "out"]), dict(feedforward=["conv1", "out"])),
    "vera": (lambda: peft.VeraConfig(r=4, target_modules=["lin", "out"]), dict(r=4)),
    "vera-noproj": (lambda: peft.VeraConfig(r=3, target_modules=["lin", "out"], save_projection=False,
                                            projection_prng_key=7, d_initial=0.5),
                    dict(r=3, save_projection=False, projection_prng_key=7, d_initial=0.5)),
}
GPT2 = {  # peft's IA³ and VeRA take GPT-2's Conv1D
    "ia3": (lambda: peft.IA3Config(target_modules=["c_attn", "c_fc", "attn.c_proj", "mlp.c_proj"],
                                   feedforward_modules=["mlp.c_proj"]),
            dict(feedforward="mlp.c_proj")),
    "vera": (lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"]), dict(r=4)),
}


def quiet(make):
    """peft's config, without its note that save_projection=False rebuilds VeRA's projections."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def kind_of(case: str) -> str:
    return case.split("-")[0]


def peft_model(base, cfg, seed=3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out and adjusted block sizes
        model = peft.get_peft_model(base, cfg)
    randomize_peft(model, seed)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_ours(case, tmp_path):
    make, _ = CASES[case]
    theirs = peft_model(net(), quiet(make))
    theirs.save_pretrained(tmp_path)
    want = run(theirs, X)
    ours = net()
    base = run(ours, X)
    li.load_adapter(ours, tmp_path)
    assert {lora.adapter("default").kind for _, lora in li.named_loras(ours)} == {kind_of(case)}
    torch.testing.assert_close(run(ours, X), want, **TOL)
    assert not torch.allclose(want, base, **TOL)  # the update is not trivial
    li.remove(ours, merge=False)
    assert torch.equal(run(ours, X), base)


@pytest.mark.parametrize("case", [c for c, (_, kw) in CASES.items() if kw is not None])
def test_ours_to_peft(case, tmp_path):
    make, kw = CASES[case]
    targets = quiet(make).target_modules
    ours = li.inject(net(), sorted(targets), kind=kind_of(case), **kw)
    randomize_kind(ours, "default", 5)
    want = run(ours, X)
    li.save_adapter(ours, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == kind_of(case).upper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(net(), tmp_path).eval()
    torch.testing.assert_close(run(theirs, X), want, **TOL)
    again = li.load_adapter(net(), tmp_path)  # and back: the same tensors
    torch.testing.assert_close(run(again, X), want, **TOL)
    base = run(net(), X)
    assert not torch.allclose(want, base, **TOL)
    li.remove(ours, merge=False)
    assert torch.equal(run(ours, X), base)


@pytest.mark.parametrize("case", list(GPT2))
def test_gpt2_conv1d_both_ways(case, tmp_path):
    make, kw = GPT2[case]
    theirs = peft_model(gpt2(seed=0), quiet(make))
    theirs.save_pretrained(tmp_path / "peft")
    ours = li.load_adapter(gpt2(seed=0), tmp_path / "peft")
    torch.testing.assert_close(run(ours, IDS), run(theirs, IDS), **TOL)

    mine = li.inject(gpt2(seed=0), sorted(quiet(make).target_modules), kind=case, **kw)
    randomize_kind(mine, "default", 6)
    li.save_adapter(mine, tmp_path / "ours", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(gpt2(seed=0), tmp_path / "ours").eval()
    torch.testing.assert_close(run(back, IDS), run(mine, IDS), **TOL)
    base = run(gpt2(seed=0), IDS)
    li.remove(mine, merge=False)
    assert torch.equal(run(mine, IDS), base)


def test_oft_on_a_larger_kernel_is_peft_merge(tmp_path):
    """peft's OFT forward on a 3x3 conv is not its merge; ours is its merge, both ways."""
    theirs = peft_model(net(), peft.OFTConfig(oft_block_size=4, target_modules=["conv3", "lin"]))
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"OFT on `conv3`, convs with a kernel larger than 1: peft's unmerged"):
        ours = li.load_adapter(net(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(theirs).merge_and_unload()
    torch.testing.assert_close(run(ours, X), run(merged, X), **TOL)
    assert not torch.allclose(run(theirs, X), run(merged, X), **TOL)  # peft's forward is not its merge

    mine = li.inject(net(), ["conv3", "lin"], kind="oft", oft_block_size=4)
    randomize_kind(mine, "default", 8)
    with pytest.warns(UserWarning, match=r"OFT on `conv3`, convs with a kernel larger than 1"):
        li.save_adapter(mine, tmp_path / "ours", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(net(), tmp_path / "ours").merge_and_unload()
    torch.testing.assert_close(run(back, X), run(mine, X), **TOL)


# -- refusals ------------------------------------------------------------------------------------
class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8)
        self.mha = nn.MultiheadAttention(8, 2)
        self.bil = nn.Bilinear(8, 8, 8)
        self.emb = nn.Embedding(10, 8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("kind, target, kw, match", [
    ("loha", "lstm", {}, r"`lstm` is of type LSTM, and lora_inject carries peft's LOHA on Linear, Conv1d, Conv2d"),
    ("lokr", "mha", {}, r"`mha` is of type MultiheadAttention, and lora_inject carries peft's LOKR on"),
    ("oft", "bil", {"oft_block_size": 4}, r"`bil` is of type Bilinear, and lora_inject carries peft's OFT on "
                                           r"Linear, Conv2d"),
    ("vera", "emb", {"r": 2}, r"`emb` is of type Embedding, and lora_inject carries peft's VERA on Linear, Conv1D"),
    ("oft", "grouped", {"oft_block_size": 4}, r"groups=2 \(peft's OFT sizes its blocks for groups=1 only\)"),
    ("loha", "mha.out_proj", {}, r"out_proj targeted on its own"),
])
def test_export_refuses_what_peft_cannot_hold(kind, target, kw, match, tmp_path):
    torch.manual_seed(0)
    model = li.inject(Odd(), [target], kind=kind, **kw)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        li.save_adapter(model, tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()
    assert_unchanged(model, snap)


class Convs(nn.Module):
    """Convs whose groups or padding mode IA³ (a scale per channel) and OFT on a 1x1 kernel (a
    rotation of channels) commute with; LoHa's and LoKr's separate conv takes the groups."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.reflect = nn.Conv2d(8, 8, 1, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.reflect(torch.relu(self.grouped(x)))


def test_ia3_scaling_the_input_of_a_grouped_conv_is_refused_both_ways(tmp_path):
    """peft's vector has one value per input channel there, ours one per column of the weight."""
    torch.manual_seed(0)
    base = Convs().eval()
    cfg = peft.IA3Config(target_modules=["grouped"], feedforward_modules=["grouped"])
    theirs = peft_model(copy.deepcopy(base), cfg)
    theirs.save_pretrained(tmp_path / "peft")
    match = r"`grouped` is a conv with groups=2 whose input IA³ scales"
    with pytest.raises(ValueError, match=match):
        li.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ours = li.inject(copy.deepcopy(base), "grouped", kind="ia3", feedforward=True)
    with pytest.raises(ValueError, match=match):
        li.save_adapter(ours, tmp_path / "ours", format="peft")


@pytest.mark.parametrize("kind, targets, kw, cfg", [
    ("ia3", ["grouped", "reflect"], dict(feedforward="reflect"),
     lambda: peft.IA3Config(target_modules=["grouped", "reflect"], feedforward_modules=["reflect"])),
    ("oft", ["reflect"], dict(oft_block_size=4), lambda: peft.OFTConfig(oft_block_size=4, target_modules=["reflect"])),
    ("loha", ["grouped"], dict(r=2, alpha=3.0), lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["grouped"])),
    ("lokr", ["grouped"], dict(r=2, alpha=3.0), lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["grouped"])),
])
def test_kinds_on_convs_with_groups_or_a_padding_mode_both_ways(kind, targets, kw, cfg, tmp_path):
    x = torch.randn(2, 8, 5, 5)
    torch.manual_seed(0)
    base = Convs().eval()
    theirs = peft_model(copy.deepcopy(base), cfg())
    theirs.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(run(li.load_adapter(copy.deepcopy(base), tmp_path / "peft"), x), run(theirs, x), **TOL)
    ours = li.inject(copy.deepcopy(base), targets, kind=kind, **kw)
    randomize_kind(ours, "default", 5)
    li.save_adapter(ours, tmp_path / "ours", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(run(again, x), run(ours, x), **TOL)


@pytest.mark.parametrize("kind, kw", [("loha", {}), ("lokr", {}), ("oft", {"oft_block_size": 4})])
def test_export_refuses_gpt2_conv1d_for_lycoris_and_oft(kind, kw, tmp_path):
    model = li.inject(gpt2(seed=0), ["c_fc"], kind=kind, **kw)
    with pytest.raises(ValueError, match=rf"is of type Conv1D, and lora_inject carries peft's {kind.upper()} on"):
        li.save_adapter(model, tmp_path, format="peft")


def test_export_refuses_mixed_kinds_and_settings(tmp_path):
    model = li.inject(net(), ["lin"], kind="loha", adapter="default")
    li.inject(model, ["out"], kind="lokr", adapter="default")
    with pytest.raises(ValueError, match=r"mixes the kinds \['loha', 'lokr'\]"):
        li.save_adapter(model, tmp_path, format="peft")
    model = li.inject(net(), ["lin"], kind="oft", oft_block_size=4)
    li.inject(model, ["out"], kind="oft", oft_block_size=2)
    with pytest.raises(ValueError, match=r"one setting per adapter"):
        li.save_adapter(model, tmp_path, format="peft")


def _peft_dir(tmp_path, cfg, model=None):
    theirs = peft_model(model or net(), cfg)
    theirs.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(path, **fields):
    f = path / "adapter_config.json"
    config = json.loads(f.read_text())
    config.update(fields)
    f.write_text(json.dumps(config))


def test_load_refuses_and_leaves_the_model_unchanged(tmp_path):
    d = _peft_dir(tmp_path / "a", peft.LoHaConfig(r=2, target_modules=["lin"]))
    model = Odd()
    snap = snapshot(model)
    _edit_config(d, target_modules=["lin", "lstm"])
    with pytest.raises(ValueError, match=r"`lstm` is of type LSTM.*targets it, so nothing was loaded"):
        li.load_adapter(model, d)
    assert_unchanged(model, snap)

    d = _peft_dir(tmp_path / "b", peft.VeraConfig(r=2, target_modules=["lin"], vera_dropout=0.1))
    model = net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"vera_dropout.*0.1"):
        li.load_adapter(model, d)
    _edit_config(d, vera_dropout=0.0, r=3)  # the tensors are of r=2
    with pytest.raises(ValueError, match=r"VeRA with r=3|makes"):
        li.load_adapter(model, d)
    assert_unchanged(model, snap)

    d = _peft_dir(tmp_path / "c", peft.LoKrConfig(r=2, target_modules=["lin"]))
    _edit_config(d, decompose_both=True)  # the file has a full lokr_w1
    with pytest.raises(ValueError, match=r"holds .*lokr_w1.* makes .*lokr_w1_a"):
        li.load_adapter(model, d)
    assert_unchanged(model, snap)

    d = _peft_dir(tmp_path / "e", peft.LoHaConfig(r=2, target_modules=["lin", "out"]))
    _edit_config(d, target_modules=["lin"])  # the file holds out's factors too
    with pytest.raises(ValueError, match=r"holds `base_model\.model\.out\.hada_w1_a` \(12, 2\), which no module that "
                                         r"`target_modules` in .* selects takes"):
        li.load_adapter(model, d)
    assert_unchanged(model, snap)

    d = _peft_dir(tmp_path / "d", peft.OFTConfig(oft_block_size=4, target_modules=["lin"]))
    _edit_config(d, target_modules=["lin", "out"])  # the file holds no oft_R for `out`
    with pytest.raises(ValueError, match=r"targets `out`, but .* lacks `base_model\.model\.out\.oft_R\.weight`"):
        li.load_adapter(model, d)
    _edit_config(d, target_modules=["lin"])
    weights = d / "adapter_model.safetensors"
    save_file({"base_model.model.lin.oft_R.weight": torch.zeros(32, 5)}, weights)  # 5: no block's triangle
    with pytest.raises(ValueError, match=r"oft_R\.weight` has shape \(32, 5\), which is no OFT block"):
        li.load_adapter(model, d)
    assert_unchanged(model, snap)


HEAD_CASES = {
    "ia3": lambda: peft.IA3Config(target_modules=["q_proj", "lm_head"], feedforward_modules=[]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "lm_head"]),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "lm_head"]),
}


@pytest.mark.parametrize("kind", list(HEAD_CASES))
def test_a_kind_on_a_head_loads_beside_the_head_peft_saves_whole(kind, tmp_path):
    """peft's save_pretrained also writes the base weight of a targeted head (save_embedding_layers
    "auto"): a copy equal to the base, which loads as nothing."""
    base = llama(head=True, seed=0, tie_word_embeddings=False).eval()
    theirs = peft_model(copy.deepcopy(base), HEAD_CASES[kind]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note that it saves the head whole
        theirs.save_pretrained(tmp_path)
    assert any(k.endswith("lm_head.base_layer.weight") for k in load_file(tmp_path / "adapter_model.safetensors"))
    ids = torch.randint(0, 40, (2, 5))
    ours = li.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **TOL)


def test_a_kind_on_a_tied_head_is_refused_both_ways(tmp_path):
    """lora_inject adapts a tied tensor for all its users; peft's IA³ scales the head alone."""
    tied = gpt2(head=True, seed=0).eval()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    theirs = peft_model(copy.deepcopy(tied), peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[]))
    theirs.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    model = copy.deepcopy(tied)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"adapts `lm_head.weight` with IA3, but in this model it is one tensor "
                                         r"tied to `transformer.wte`"):
        li.load_adapter(model, tmp_path / "a")
    assert_unchanged(model, snap)
    li.inject(model, "lm_head", kind="ia3")
    with pytest.raises(ValueError, match=r"`lm_head.weight` is one tensor tied to `transformer.wte.weight`"):
        li.save_adapter(model, tmp_path / "b", format="peft")


def test_a_kind_with_a_tied_embedding_in_modules_to_save_is_refused_both_ways(tmp_path):
    """peft trains a copy of the input embeddings alone; the head tied to them would read it too."""
    tied = llama(head=True, seed=0, tie_word_embeddings=True).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    theirs = peft_model(copy.deepcopy(tied), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[],
                                                            modules_to_save=["embed_tokens"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "a")
    model = copy.deepcopy(tied)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"gives `model.embed_tokens.weight` and `lm_head` different values, but "
                                         r"they are one tied tensor"):
        li.load_adapter(model, tmp_path / "a")
    assert_unchanged(model, snap)
    li.inject(model, "q_proj", kind="ia3", modules_to_save=["embed_tokens"])
    with pytest.raises(ValueError, match=r"`model.embed_tokens.weight` is one tensor tied to `lm_head.weight`.*"
                                         r"modules_to_save copy"):
        li.save_adapter(model, tmp_path / "b", format="peft")


def test_a_kind_with_modules_to_save_loads_the_trained_copy(tmp_path):
    """peft's classifier heads (task_type SEQ_CLS and the like): the module saved whole beside the kind."""
    theirs = peft_model(net(), peft.IA3Config(target_modules=["lin"], feedforward_modules=[],
                                              modules_to_save=["out"]))
    theirs.save_pretrained(tmp_path)
    ours = li.load_adapter(net(), tmp_path)
    torch.testing.assert_close(run(ours, X), run(theirs, X), **TOL)
    assert not torch.allclose(run(ours, X), run(net(), X), **TOL)
    assert {lora.adapter("default").kind for _, lora in li.named_loras(ours)} == {"ia3", "full"}
    li.save_adapter(ours, tmp_path / "again", format="peft")  # and back, the copy under modules_to_save
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["modules_to_save"]) == ("IA3", ["out"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(net(), tmp_path / "again").eval()
    torch.testing.assert_close(run(again, X), run(theirs, X), **TOL)


def test_oft_blocks_of_one_load_as_peft_adjusts_them(tmp_path):
    """Where no block size divides the inputs but 1, peft adjusts to blocks of 1: oft_R (n, 0), the identity."""
    base = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    theirs = peft_model(copy.deepcopy(base), peft.OFTConfig(oft_block_size=2, target_modules=["0", "2"]))
    theirs.save_pretrained(tmp_path)
    x = torch.randn(4, 6)
    assert theirs.base_model.model[2].oft_R["default"].weight.shape == (7, 0)
    ours = li.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(run(ours, x), run(theirs, x), **TOL)


def test_vera_without_saved_projections_rebuilds_them_whatever_the_file_holds(tmp_path):
    """save_projection=False: peft builds the projections from the key and ignores stored ones."""
    d = _peft_dir(tmp_path, quiet(lambda: peft.VeraConfig(r=3, target_modules=["lin", "out"], save_projection=False,
                                                         projection_prng_key=7)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(net(), d).eval()
    weights = d / "adapter_model.safetensors"
    held = load_file(weights)
    held["base_model.vera_A"], held["base_model.vera_B"] = torch.randn(3, 128), torch.randn(16, 3)
    save_file(held, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(net(), d).eval()
    torch.testing.assert_close(run(again, X), run(theirs, X), **TOL)  # peft: the key's, not the file's
    torch.testing.assert_close(run(li.load_adapter(net(), d), X), run(theirs, X), **TOL)


def test_lokr_full_w2_on_conv1d_is_refused_both_ways(tmp_path):
    """peft's make_kron on a Conv1d with a full lokr_w2 is no Kronecker product of its factors."""
    d = _peft_dir(tmp_path / "peft", peft.LoKrConfig(r=2, target_modules=["c1d"]))
    model = net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"`c1d` is a Conv1d with LoKr's full `lokr_w2`"):
        li.load_adapter(model, d)
    assert_unchanged(model, snap)
    ours = li.inject(net(), ["c1d"], kind="lokr", r=2)
    with pytest.raises(ValueError, match=r"`c1d` is a Conv1d with LoKr's full `lokr_w2`"):
        li.save_adapter(ours, tmp_path / "ours", format="peft")
    ours = li.inject(net(), ["c1d"], kind="lokr", r=1, use_effective_conv2d=True)  # peft's forward fails on it
    with pytest.raises(ValueError, match=r"`c1d` is a Conv1d with LoKr's Tucker core `lokr_t2`"):
        li.save_adapter(ours, tmp_path / "tucker", format="peft")


class Tall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Conv2d(8, 8, (3, 1), padding=(1, 0))

    def forward(self, x):
        return self.tall(x)


@pytest.mark.parametrize("kind, kw, cfg, match", [
    ("oft", dict(oft_block_size=4), lambda: peft.OFTConfig(oft_block_size=4, target_modules=["tall"]),
     r"`tall` is a Conv2d with kernel \(3, 1\) \(peft's OFT sizes its blocks by kernel_size\[0\]²"),
    ("lokr", dict(r=1, use_effective_conv2d=True),
     lambda: peft.LoKrConfig(r=1, target_modules=["tall"], use_effective_conv2d=True),
     r"`tall` is a Conv2d with kernel \(3, 1\) with LoKr's Tucker core `lokr_t2`"),
])
def test_what_peft_fails_on_a_kernel_that_is_not_square_is_refused_both_ways(kind, kw, cfg, match, tmp_path):
    """peft saves these adapters, but its own forward fails on them: neither way is carried."""
    theirs = peft_model(Tall(), cfg())
    with pytest.raises(RuntimeError):
        theirs(torch.randn(1, 8, 5, 5))
    theirs.save_pretrained(tmp_path / "peft")
    model = Tall()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        li.load_adapter(model, tmp_path / "peft")
    assert_unchanged(model, snap)
    ours = li.inject(Tall(), ["tall"], kind=kind, **kw)
    with pytest.raises(ValueError, match=match):
        li.save_adapter(ours, tmp_path / "ours", format="peft")
    assert not (tmp_path / "ours").exists()


def test_lokr_explicit_factors_export_as_peft_where_its_factorization_gives_them(tmp_path):
    # out (16 -> 12): decompose_factor=4 gives peft w1 (4, 4), w2 (3, 4); w1 (2, 4) no factor gives
    ours = li.inject(net(), ["out"], kind="lokr", r=1, alpha=2, factors=[4, 3, 4, 4])
    randomize_kind(ours, "default", 5)
    want = run(ours, X)
    li.save_adapter(ours, tmp_path / "a", format="peft")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["decompose_factor"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(net(), tmp_path / "a").eval()
    torch.testing.assert_close(run(theirs, X), want, **TOL)
    other = li.inject(net(), ["out"], kind="lokr", r=1, alpha=2, factors=[2, 6, 4, 4])
    with pytest.raises(ValueError, match=r"`out.weight` is LoKr with factors=\[2, 6, 4, 4\].*format='kohya'"):
        li.save_adapter(other, tmp_path / "b", format="peft")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match=r"`factors` must be \[a, b, c, d\] with a \* b == out \(12\)"):
        li.inject(net(), ["out"], kind="lokr", factors=[2, 2, 4, 4])


DROPOUTS = {
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=T, rank_dropout=0.5, module_dropout=0.3),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=TK, rank_dropout=0.4, module_dropout=0.25),
    "lokr-scaled": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=TK, rank_dropout=0.4,
                                           rank_dropout_scale=True),
    "loha-rank-only": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=T, rank_dropout=0.5),
}


@pytest.mark.parametrize("case", list(DROPOUTS))
def test_rank_and_module_dropout_match_peft_draw_for_draw(case, tmp_path):
    """In training mode, LoHa's and LoKr's ``rank_dropout`` and ``module_dropout`` drop what peft's
    drop, from the same draws of torch's generator: outputs and gradients equal peft's, forward
    after forward; in eval mode neither is at work."""
    theirs = peft.get_peft_model(net(), DROPOUTS[case]())
    randomize_peft(theirs, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = li.load_adapter(net(), str(tmp_path))
    li.mark_only_lora_as_trainable(ours)
    theirs.train(), ours.train()
    skipped = []
    for step in range(6):
        outs = []
        for model in (theirs, ours):
            torch.manual_seed(100 + step)
            out = model(X)
            out.square().sum().backward()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], **TOL)
        skipped.append(not torch.allclose(outs[1], run(ours.eval(), X)))
        ours.train()
    theirs_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
                    if p.grad is not None}
    ours_grads = {re.sub(r"\.parametrizations\.weight\.0", "", n): p.grad for n, p in ours.named_parameters()
                  if p.grad is not None}
    assert ours_grads.keys() == theirs_grads.keys()
    for n, g in theirs_grads.items():
        torch.testing.assert_close(ours_grads[n], g, rtol=1e-4, atol=1e-6)
    assert any(skipped)  # the dropouts were at work in training
    theirs.eval(), ours.eval()
    torch.testing.assert_close(run(ours, X), run(theirs, X), **TOL)


def test_a_second_ia3_adapter_saved_on_the_side_peft_ran_it_is_read_as_it_ran(tmp_path):
    """peft fixes a layer's IA³ side from its first adapter: a second whose config says the output
    of down_proj is trained, and saved, scaling its input. It loads alone as it ran in peft."""
    base = llama(seed=0).eval()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    first = peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = peft_model(copy.deepcopy(base), first)
    theirs.add_adapter("other", peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=[]))
    theirs.set_adapter("other")  # its tensors are now the trainable ones
    randomize_peft(theirs, 4)
    theirs.save_pretrained(tmp_path)
    want = run(theirs, ids)
    with pytest.warns(UserWarning, match=r"IA³'s vector on `layers\.0\.mlp\.down_proj` \(input\), "
                                         r"`layers\.1\.mlp\.down_proj` \(input\) scales the side named"):
        ours = li.load_adapter(copy.deepcopy(base), tmp_path / "other")
    torch.testing.assert_close(run(ours, ids), want, **TOL)
    assert not torch.allclose(want, run(base, ids), **TOL)
