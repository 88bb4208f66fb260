"""Bad input: every documented error has its type, names the argument and the value, and changes nothing.

The merge refusals of ``remove`` (non-finite result, ill-defined merge through a foreign
parametrization) and a duplicate adapter name are tested in test_api.py, with the same checks.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict

import pytest
import torch
from _helpers import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import lora_inject as li


def mlp_a() -> nn.Sequential:
    """fc1 already carries adapter "a": a failed call must leave it as it is too."""
    model = nn.Sequential(OrderedDict(
        fc1=nn.Linear(6, 5), act=nn.ReLU(), norm=nn.LayerNorm(5), fc2=nn.Linear(5, 4),
    ))
    li.inject(model, "fc1", adapter="a", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_()
    return model


class Half(nn.Module):
    def forward(self, W):
        return W / 2


def tied_elsewhere() -> nn.Sequential:
    """A tied embedding whose head has a parametrization of its own on the shared tensor."""
    model = nn.Sequential(OrderedDict(emb=nn.Embedding(10, 4), head=nn.Linear(4, 10, bias=False)))
    model.head.weight = model.emb.weight
    parametrize.register_parametrization(model.head, "weight", Half())
    return model


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.zeros(3, 3, dtype=torch.long))
        self.scale = nn.Parameter(torch.ones(3))


def counter() -> nn.Sequential:
    return nn.Sequential(Counter(), nn.Linear(3, 3))


def attention() -> nn.Sequential:
    return nn.Sequential(OrderedDict(fc=nn.Linear(8, 8), attn=nn.MultiheadAttention(8, 2)))


def rules_with(key, rule):
    rules = li.default_rules()
    rules[key] = rule
    return rules


INJECT = [
    # r
    pytest.param(mlp_a, dict(targets="fc", r=0), ValueError, r"`r` must be a positive int, got 0\.",
                 id="r=0"),
    pytest.param(mlp_a, dict(targets="fc", r=-1), ValueError, r"`r` must be a positive int, got -1\.",
                 id="r=-1"),
    pytest.param(mlp_a, dict(targets="fc", r=2.5), TypeError, r"`r` must be a positive int, got 2\.5\.",
                 id="r=2.5"),
    pytest.param(mlp_a, dict(targets="fc", r=True), TypeError, r"`r` must be a positive int, got True\.",
                 id="r=True"),
    pytest.param(mlp_a, dict(targets="fc", r="8"), TypeError, r"`r` must be a positive int, got '8'\.",
                 id="r='8'"),
    # alpha
    pytest.param(mlp_a, dict(targets="fc", alpha=math.nan), ValueError,
                 r"`alpha` must be a finite number, got nan\.", id="alpha=nan"),
    pytest.param(mlp_a, dict(targets="fc", alpha=-math.inf), ValueError,
                 r"`alpha` must be a finite number, got -inf\.", id="alpha=-inf"),
    pytest.param(mlp_a, dict(targets="fc", alpha="x"), TypeError,
                 r"`alpha` must be a finite number, got 'x'\.", id="alpha='x'"),
    # regexes and kinds of targets / exclude
    pytest.param(mlp_a, dict(targets="fc(1"), ValueError,
                 r"`targets` is not a valid regex: 'fc\(1'", id="targets-regex"),
    pytest.param(mlp_a, dict(targets="fc", exclude="[2"), ValueError,
                 r"`exclude` is not a valid regex: '\[2'", id="exclude-regex"),
    pytest.param(mlp_a, dict(targets=3), TypeError,
                 r"`targets` must be a regex str, a compiled re\.Pattern or a callable .*got int\.",
                 id="targets=3"),
    pytest.param(mlp_a, dict(targets="fc", exclude={"fc2"}), TypeError,
                 r"`exclude` must be a regex str, .*got set\.", id="exclude-set"),
    # init, adapter, dtype, dropout, rslora
    pytest.param(mlp_a, dict(targets="fc", init="xavier"), ValueError,
                 r"`init` must be one of \('default', 'gaussian', 'pissa', 'olora', 'loftq'\), got 'xavier'\.",
                 id="init"),
    pytest.param(mlp_a, dict(targets="fc", adapter="a.b"), ValueError,
                 r"`adapter` must be a Python identifier .*got 'a\.b'\.", id="adapter='a.b'"),
    pytest.param(mlp_a, dict(targets="fc", adapter=""), ValueError,
                 r"`adapter` must be a Python identifier .*got ''\.", id="adapter=''"),
    pytest.param(mlp_a, dict(targets="fc", adapter=1), TypeError,
                 r"`adapter` must be a str, got int\.", id="adapter=1"),
    pytest.param(mlp_a, dict(targets="fc", dtype=torch.int64), TypeError,
                 r"`dtype` must be a floating torch\.dtype or None, got torch\.int64\.", id="dtype=int64"),
    pytest.param(mlp_a, dict(targets="fc", dtype="float32"), TypeError,
                 r"`dtype` must be a floating torch\.dtype or None, got 'float32'\.", id="dtype-str"),
    pytest.param(mlp_a, dict(targets="fc", dropout=1.0), ValueError,
                 r"`dropout` must be a number in \[0, 1\), got 1\.0\.", id="dropout=1"),
    pytest.param(mlp_a, dict(targets="fc", dropout=-0.1), ValueError,
                 r"`dropout` must be a number in \[0, 1\), got -0\.1\.", id="dropout<0"),
    pytest.param(mlp_a, dict(targets="fc", rslora="yes"), TypeError,
                 r"`rslora` must be a bool, got str\.", id="rslora"),
    pytest.param(attention, dict(targets="attn|fc", dropout=0.1), ValueError,
                 r"`dropout`=0\.1 needs a layer with a factored form, and MultiheadAttention `attn` has none",
                 id="dropout-on-MHA"),
    # what the model holds
    pytest.param(tied_elsewhere, dict(targets="emb", r=2), ValueError,
                 r"`emb\.weight` is one tensor shared with `head\.weight`, which has a parametrization of its own "
                 r"\(Half\).*Remove that parametrization, untie the weights", id="tied-weight"),
    pytest.param(counter, dict(targets="", rules=rules_with(Counter, li.Rule(("weight",)))), TypeError,
                 r"`0\.weight` has dtype torch\.int64; LoRA needs a floating-point tensor\. "
                 r"Leave Counter `0` out with `exclude=`", id="integer-tensor"),
    pytest.param(mlp_a, dict(targets="fc", rules=rules_with(nn.Linear, li.Rule(("kernel",)))),
                 ValueError, r"the rule for Linear names the tensor 'kernel', which Linear lacks; it has "
                             r"\['bias', 'weight'\]\. Fix the rule's `tensors`", id="rule-lacks-tensor"),
    # nothing injected
    pytest.param(mlp_a, dict(targets="zzz"), ValueError,
                 r"`targets`='zzz' matched no module name \(after `exclude`\)\. .*such as fc1 \(Linear\), "
                 r"act \(ReLU\), norm \(LayerNorm\), fc2 \(Linear\)", id="no-name"),
    pytest.param(mlp_a, dict(targets="fc", exclude="fc"), ValueError,
                 r"`targets`='fc' matched no module name \(after `exclude`\)", id="all-excluded"),
    pytest.param(mlp_a, dict(targets="act|norm"), ValueError,
                 r"`targets`='act\|norm' matched only modules whose types have no rule: act \(ReLU\), "
                 r"norm \(LayerNorm\)\. Register a rule with lora_inject\.register_rule\(", id="no-rule"),
]


@pytest.mark.parametrize("build, kwargs, error, match", INJECT)
def test_inject_refuses_bad_input_and_changes_nothing(build, kwargs, error, match):
    model = build()
    before = snapshot(model)
    with pytest.raises(error, match=r"^inject\(\): .*" + match):
        li.inject(model, **kwargs)
    assert_unchanged(model, before)


def test_inject_refuses_a_non_module():
    with pytest.raises(TypeError, match=r"inject\(\): `model` must be an nn\.Module, got dict\."):
        li.inject({"fc": nn.Linear(2, 2)}, "fc")


@given(r=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=3),
                   st.booleans()))  # None is each kind's default rank (8 for LoRA)
def test_inject_refuses_any_bad_rank(r):
    model = mlp_a()
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError), match=r"inject\(\): `r` must be a positive int, got "
                       + re.escape(repr(r))):
        li.inject(model, "fc", r=r)
    assert_unchanged(model, before)


@given(alpha=st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.text(max_size=3), st.booleans()))
def test_inject_refuses_any_bad_alpha(alpha):
    model = mlp_a()
    before = snapshot(model)
    kind = ValueError if isinstance(alpha, float) else TypeError  # not finite, or not a number
    with pytest.raises(kind, match=r"`alpha` must be a finite number, got "
                       + re.escape(repr(alpha))):
        li.inject(model, "fc", alpha=alpha)
    assert_unchanged(model, before)


# -- the functions that take adapter names --------------------------------------------------------

def remove(model, adapter):
    li.remove(model, adapter=adapter, merge=True)


def activate(model, adapter):
    li.activate(model, adapter)


def parameters(model, adapter):
    list(li.lora_parameters(model, adapter=adapter))


def state_dict(model, adapter):
    li.lora_state_dict(model, adapter=adapter)


NAMES = [
    pytest.param(fn, adapter, error, match, id=f"{fn.__name__}-{adapter!r}")
    for fn, arg in [(remove, "adapter"), (activate, "adapters"), (parameters, "adapter"),
                    (state_dict, "adapter")]
    for adapter, error, match in [
        (3, TypeError, rf"`{arg}` must be a str(,| or) a sequence of str.* got 3\."),
        (["a", 1], TypeError, rf"`{arg}` must be a str(,| or) a sequence of str.* got \['a', 1\]\."),
        ("nope", ValueError, r"no adapter named 'nope' in the model; it has \['a'\]\."),
        (["a", "nope"], ValueError, r"no adapter named 'nope' in the model; it has \['a'\]\."),
    ]
]
FN_NAMES = {remove: "remove", activate: "activate", parameters: "lora_parameters",
            state_dict: "lora_state_dict"}


@pytest.mark.parametrize("fn, adapter, error, match", NAMES)
def test_adapter_names_are_checked_and_nothing_changes(fn, adapter, error, match):
    model = mlp_a()
    before = snapshot(model)
    with pytest.raises(error, match=rf"^{FN_NAMES[fn]}\(\): " + match):
        fn(model, adapter)
    assert_unchanged(model, before)


def test_activate_refuses_none():
    model = mlp_a()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"activate\(\): `adapters` must be a str or a sequence of str, "
                                        r"got None\. Pass \[\] to turn every adapter off\."):
        li.activate(model, None)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bias", ["some", "lora", True, None])
def test_mark_only_lora_as_trainable_refuses_unknown_bias(bias):
    model = mlp_a()
    model.fc2.bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"mark_only_lora_as_trainable\(\): `bias` must be one of "
                                         r"\('none', 'all', 'lora_only'\), got " + re.escape(repr(bias))):
        li.mark_only_lora_as_trainable(model, bias=bias)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert_unchanged(model, before)


# -- rules -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module_type, rule, match", [
    pytest.param(3, li.Rule(("weight",)),
                 r"`module_type` must be an nn\.Module subclass or a 'module\.QualName' str, got 3\.",
                 id="type=3"),
    pytest.param(int, li.Rule(("weight",)), r"`module_type` must be .*, got <class 'int'>\.", id="type=int"),
    pytest.param(nn.Linear(2, 2), li.Rule(("weight",)), r"`module_type` must be .*, got Linear\(",
                 id="instance"),
    pytest.param(nn.Linear, {"tensors": ("weight",)}, r"`rule` must be a lora_inject\.Rule, got dict\.",
                 id="rule=dict"),
    pytest.param(nn.Linear, None, r"`rule` must be a lora_inject\.Rule, got NoneType\.", id="rule=None"),
])
def test_register_rule_refuses_wrong_kinds_and_keeps_the_registry(module_type, rule, match):
    rules = li.default_rules()
    with pytest.raises(TypeError, match=r"^register_rule\(\): " + match):
        li.register_rule(module_type, rule)
    assert li.default_rules() == rules


@pytest.mark.parametrize("tensors, error, match", [
    pytest.param("weight", TypeError, r"`tensors` must be a tuple of str, got 'weight'\. "
                                      r"Write Rule\(\(\"weight\",\)\)", id="str"),
    pytest.param(("weight", 1), TypeError, r"`tensors` must be a tuple of str, got \('weight', 1\)\.",
                 id="int"),
    pytest.param((), ValueError, r"`tensors` must name at least one tensor, got \(\)\.", id="empty"),
    pytest.param(("weight", "(x"), ValueError, r"`tensors` holds an invalid regex, '\(x': ", id="regex"),
])
def test_rule_refuses_bad_tensors(tensors, error, match):
    with pytest.raises(error, match=r"^Rule\(\): " + match):
        li.Rule(tensors)


def _adapted_linear():
    return li.inject(nn.Sequential(nn.Linear(4, 4)), "0", r=2)


def test_save_adapter_names_the_path_that_cannot_be_a_directory(tmp_path):
    model = _adapted_linear()
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"save_adapter\(\): `path` '.*file' exists and is not a directory"):
        li.save_adapter(model, tmp_path / "file")
    with pytest.raises(ValueError, match=r"save_adapter\(\): `path` '.*dangling' exists and is a symlink to nothing"):
        li.save_adapter(model, tmp_path / "dangling")
    with pytest.raises(TypeError, match=r"save_adapter\(\): `path` must be a str or os.PathLike.*got NoneType"):
        li.save_adapter(model, None)
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "nowhere").exists()


def test_save_adapter_of_a_meta_model_says_to_materialise_and_writes_nothing(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    li.inject(model, "0", r=2)
    with pytest.raises(RuntimeError, match=r"save_adapter\(\): the factors of `0.weight` are on the meta device"):
        li.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_inject_into_an_uninitialised_lazy_module_says_to_run_a_forward_first():
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"inject\(\): `0.weight` of LazyLinear `0` is an uninitialised lazy"):
        li.inject(model, "0", r=2)
    model(torch.randn(2, 3))
    li.inject(model, "0", r=2)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_refuse_a_weight_that_is_not_finite(init):
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=rf"inject\(\): init='{init}' decomposes the weight, which holds NaN"):
        li.inject(model, "0", r=2, init=init)
    assert not hasattr(model[0], "parametrizations")


def test_a_weights_file_whose_header_has_wrong_json_types_names_the_file(tmp_path):
    model = _adapted_linear()
    li.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter.safetensors"
    blob = file.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = ["2", 4]
    head = json.dumps(header).encode()
    file.write_bytes(len(head).to_bytes(8, "little") + head + blob[8 + n:])
    with pytest.raises(ValueError, match=r"load_adapter\(\): .*adapter.safetensors is truncated or corrupt"):
        li.load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path / "a")
