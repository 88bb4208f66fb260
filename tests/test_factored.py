"""The factored weight as a value: no op reads W0 alone, the table ops stay factored, and the paths
that leave Python (dispatch, TorchScript) either give the merged value or say what to do."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from test_grid import LAYERS, adapted, params_of, reference
from torch import nn

import lora_inject as li
from lora_inject._factored import FactoredWeight


def _linear():
    layer = nn.Linear(5, 7).double()
    li.inject(layer, "", r=2, alpha=4)
    with torch.no_grad():
        for p in li.lora_parameters(layer):
            p.normal_()
    lora = layer.parametrizations.weight[0]
    w0 = layer.parametrizations.weight.original
    expected = w0 + 2 * lora.lora_B["default"] @ lora.lora_A["default"]
    return layer, expected


# Where the op's output carries the rule's output units, so DoRA stays factored too.
FITS = {"linear", "conv1d-hf-addmm", "matmul-transposed", "embedding", "embedding-bag", "conv1d", "conv2d", "conv3d"}


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("variant", ["plain", "dora", "two"])
def test_table_ops_never_build_the_merged_weight(layer_name, variant):
    layer, x, transpose = adapted(layer_name, variant, torch.float32)
    merges = mock.patch.object(FactoredWeight, "_merged", autospec=True, side_effect=FactoredWeight._merged)
    with merges as merged:
        out = layer(x)
        out.square().sum().backward()
    dora = variant != "plain"
    assert merged.call_count == (0 if layer_name in FITS or not dora else 1)
    torch.testing.assert_close(out, reference(layer, transpose)(params_of(layer), x), rtol=1e-5, atol=1e-5)


def test_detach_keeps_the_value_so_a_parameter_can_be_made_of_the_weight():
    layer, expected = _linear()
    w = layer.weight
    assert type(w) is FactoredWeight and type(w.detach()) is torch.Tensor
    p = nn.Parameter(w)
    assert isinstance(p, FactoredWeight) and p.requires_grad and p.is_leaf and p.shape == (7, 5)
    torch.testing.assert_close(p + 0, expected.detach())
    torch.testing.assert_close(w.detach() * 1, expected.detach())
    assert not (w.detach() * 1).requires_grad


def test_a_parameter_made_of_the_weight_trains_as_a_dense_leaf_of_the_merged_value():
    layer, expected = _linear()
    x = torch.randn(3, 5, dtype=torch.float64)
    new, dense = nn.Linear(5, 7).double(), nn.Linear(5, 7).double()
    new.weight = nn.Parameter(layer.weight)
    dense.weight = nn.Parameter(expected.detach().clone())
    dense.bias = new.bias
    for m in (new, dense):
        m(x).sin().sum().backward()
    assert new.weight.grad is not None  # was: never a gradient
    torch.testing.assert_close(new.weight.grad, dense.weight.grad)
    opt = torch.optim.SGD([new.weight, dense.weight], lr=0.1)
    opt.step()
    torch.testing.assert_close(new.weight + 0, dense.weight + 0)  # the step moves the leaf's own value
    assert layer.parametrizations.weight.original.grad is None


@pytest.mark.parametrize("kind", ["detached", "parameter"])
def test_a_leaf_made_of_the_weight_is_a_dense_tensor_to_numpy_pickle_copy_and_safetensors(kind, tmp_path):
    import numpy as np
    from safetensors.torch import load_file, save_file

    layer, expected = _linear()
    want = expected.detach()
    leaf = layer.weight.detach() if kind == "detached" else nn.Parameter(layer.weight)
    value = leaf.detach()
    np.testing.assert_array_equal(value.numpy(), want.numpy())  # was: "not supported for tensor subclasses"
    np.testing.assert_array_equal(np.asarray(value.cpu()), want.numpy())
    assert leaf.tolist() == want.tolist()
    assert value.data_ptr() != 0
    save_file({"w": value}, tmp_path / "w.safetensors")  # was: "invalid python storage"
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], want)
    torch.save(leaf, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt")  # weights_only: was "Unsupported global FactoredWeight"
    assert torch.equal(loaded, want) and loaded.requires_grad == leaf.requires_grad
    assert isinstance(loaded, nn.Parameter) == (kind == "parameter")
    new = nn.Linear(5, 7).double()
    if kind == "parameter":
        new.weight = leaf
        copied = copy.deepcopy(new)  # was: "__deepcopy__() for wrapper subclasses only works ..."
        assert type(copied.weight) is nn.Parameter and torch.equal(copied.weight, want)
        assert copied.weight.requires_grad
    else:
        assert torch.equal(copy.deepcopy(leaf), want)
    if kind == "parameter":
        with pytest.raises(RuntimeError, match="Can't call numpy\\(\\) on Tensor that requires grad"):
            leaf.numpy()  # as a dense Parameter


def test_a_deepcopy_of_the_weight_is_a_dense_copy_of_its_value():
    layer, expected = _linear()
    copied = copy.deepcopy(layer.weight)  # was: "Only Tensors created explicitly by the user ..."
    assert type(copied) is torch.Tensor and copied.is_leaf and copied.requires_grad
    assert torch.equal(copied, expected.detach())
    copied.data.zero_()
    torch.testing.assert_close(layer.weight + 0, expected.detach())  # a copy: W0 and factors untouched


def test_autograd_grad_reaches_a_detached_weight_made_a_leaf():
    layer, expected = _linear()
    x = torch.randn(3, 5, dtype=torch.float64)
    w = layer.weight.detach().requires_grad_()
    d = expected.detach().clone().requires_grad_()
    (got,) = torch.autograd.grad((x @ w.t()).sin().sum(), w)  # was: "does not require grad"
    (want,) = torch.autograd.grad((x @ d.t()).sin().sum(), d)
    torch.testing.assert_close(got, want)
    assert not any(p.grad is not None for p in li.lora_parameters(layer))


def test_an_op_below_autograd_gets_the_merged_value_or_an_error_that_names_lora_inject():
    layer, expected = _linear()
    x = torch.randn(3, 5, dtype=torch.float64)
    w = layer.weight
    with torch.no_grad(), torch._C.DisableTorchFunctionSubclass():  # straight to __torch_dispatch__
        out = torch.mm(x, w.t())
    torch.testing.assert_close(out, x @ expected.detach().t())
    assert not torch.allclose(out, x @ layer.parametrizations.weight.original.detach().t())
    with pytest.raises(RuntimeError, match=r"lora_inject: the op .* reached an adapted weight below autograd"):
        with torch._C.DisableTorchFunctionSubclass():
            torch.mm(x, w.t())


def test_torch_jit_script_refuses_and_says_to_merge_first():
    model = li.inject(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "0", r=2)
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile the adapted Linear.*lora_inject.remove"):
        torch.jit.script(model)
    li.remove(model)
    torch.jit.script(model)  # a plain model again


def test_export_of_an_adapted_model_equals_eager():
    model = li.inject(nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2)), "", r=2, alpha=4, dora=True)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.add_(torch.randn_like(p))
    x = torch.randn(3, 4)
    exported = torch.export.export(model, (x,)).module()
    torch.testing.assert_close(exported(x), model(x))
    torch.testing.assert_close(exported(2 * x), model(2 * x))


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_sparse_lookups_train_the_factors_as_the_dense_ones_do(cls):
    sparse = cls(10, 4, sparse=True).double()
    li.inject(sparse, "", r=2)
    with torch.no_grad():
        for p in li.lora_parameters(sparse):
            p.normal_()
    dense = copy.deepcopy(sparse)
    dense.sparse = False
    x = torch.randint(0, 10, (3, 4))
    grads = [torch.autograd.grad(m(x).sin().sum(), list(li.lora_parameters(m))) for m in (sparse, dense)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_sparse_lookups_with_no_factored_form_are_refused_at_inject(cls):
    layer = cls(10, 4, sparse=True, max_norm=1.0)
    with pytest.raises(ValueError, match=r"has sparse=True, but its lookup has no factored form.*sparse=False"):
        li.inject(layer, "", r=2)
    assert not hasattr(layer, "parametrizations")


# What a Tensor subclass must define itself: construction, its repr and the two dispatch hooks
# (and __slotnames__, the cache copyreg sets on a class it has pickled).
SUBCLASS_OWN = {"__annotations__", "__doc__", "__init__", "__module__", "__new__", "__repr__",
                "__torch_dispatch__", "__torch_function__", "__dict__", "__weakref__", "__slotnames__"}


@pytest.mark.parametrize("dora", [False, True])
def test_no_attribute_of_the_weight_shadows_a_name_of_tensor(dora):
    layer = li.inject(nn.Linear(5, 7), "", r=2, dora=dora)
    w = layer.weight
    w.__tensor_flatten__()  # sets the inner tensors' attributes, as compile reads them
    own = {n for cls in type(w).__mro__[:type(w).__mro__.index(torch.Tensor)] for n in vars(cls)} | set(vars(w))
    assert own & set(dir(torch.Tensor)) <= SUBCLASS_OWN
    merged = w + 0
    assert torch.equal(w.view(35), merged.view(35))  # was: 'View' object is not callable
    assert torch.equal(w.select(0, 3), merged.select(0, 3))  # was: None
    assert torch.equal(w.masked_fill(merged > 0, 0), merged.masked_fill(merged > 0, 0))
