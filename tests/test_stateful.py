"""A stateful property test: hypothesis drives sequences of calls, and after every step the model
must still be what its adapters say.

The invariants, checked after every step:

* the outputs equal a model merged by hand: a reference built from ``W0`` and the active
  factors (float64);
* ``W0`` is bit-identical while LoRA is attached: only ``remove(merge=True)`` changes it;
* the state-dict keys are what the adapters imply;
* nothing raises except the documented errors, and a refused call changes nothing: the model is
  exactly as it was, every tensor the same object with the same bits (``per_sample`` with a
  number of names other than the batch's is one such call: it must be refused).

Besides them, the rules check on the spot: ``functional_call`` with the model's own state dict
gives the model's outputs and leaves every tensor bit-identical; with a modified state dict it
gives the hand-merged outputs of those tensors and then puts ``W0`` back; a model built on the
meta device and loaded with ``assign=True`` gives the model's outputs, and moves.
"""

from __future__ import annotations

import copy
import tempfile
from collections import OrderedDict

import torch
from _helpers import assert_unchanged, snapshot
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn
from torch.func import functional_call

import lora_inject as li

NAMES = ["a", "b", "c"]
TARGETS = ["fc1", "fc2", "fc"]
DOCUMENTED = (ValueError, TypeError, RuntimeError)


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 5), act=nn.Tanh(), fc2=nn.Linear(5, 3))).double()


def hand_weight(lora, w0: torch.Tensor, active) -> torch.Tensor:
    """The weight the active adapters give, by hand: a plain adapter adds ``s (B A - B0 A0)``; a
    DoRA adapter turns the weight so far ``W`` into ``m / ||W0 + s B A|| * (W + s B A)``."""
    W = w0
    for name in active:
        rec = lora.adapter(name)
        A, B = lora.lora_A[name], lora.lora_B[name]
        update = rec.scaling * (B @ A)
        if rec.init == "pissa":
            update = update - rec.scaling * (lora.lora_B0[name] @ lora.lora_A0[name])
        if rec.dora:
            norm = torch.linalg.vector_norm(w0 + update, dim=1).detach()
            W = (lora.lora_magnitude[name] / norm).unsqueeze(1) * (W + update)
        else:
            W = W + update
    return W


class Machine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = base_model()
        self.plain = copy.deepcopy(self.model)  # the architecture, run with weights given by hand
        self.w0 = {k: v.clone() for k, v in self.model.state_dict().items()}  # "0.weight" -> W0
        self.x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self):
        self.tmp.cleanup()

    # -- helpers ------------------------------------------------------------------------------
    def loras(self) -> dict[str, li.LoRA]:
        return dict(li.named_loras(self.model))

    def adapters(self) -> set[str]:
        return {n for lora in self.loras().values() for n in lora.adapters}

    def stored_w0(self, key: str) -> torch.Tensor:
        module, tensor = key.rsplit(".", 1)
        m = self.model.get_submodule(module)
        plist = getattr(m, "parametrizations", {})
        return plist[tensor].original if tensor in plist else getattr(m, tensor)

    def reference(self, active_of=None) -> torch.Tensor:
        weights = {}
        for key, lora in self.loras().items():
            active = lora.active if active_of is None else active_of(lora)
            weights[key] = hand_weight(lora, self.stored_w0(key).detach(), active)
        return functional_call(self.plain, {**self.unadapted(), **weights}, (self.x,))

    def unadapted(self) -> dict[str, torch.Tensor]:
        adapted = set(self.loras())
        return {k: v for k, v in self.model.state_dict().items() if "parametrizations" not in k and k not in adapted}

    def attempt(self, call):
        """Run ``call``; where it raises, it must be a documented error that changed nothing."""
        before = snapshot(self.model)
        try:
            call()
        except DOCUMENTED:
            assert_unchanged(self.model, before)
            return False
        return True

    def randomize_new(self, name: str):
        with torch.no_grad():
            for lora in self.loras().values():
                if name in lora.adapters:
                    B = lora.lora_B[name]
                    B.add_(torch.randn_like(B) * 0.3)
                    if lora.adapter(name).dora:
                        lora.lora_magnitude[name].mul_(1.1)

    # -- rules -------------------------------------------------------------------------------
    @initialize(dora=st.booleans(), where=st.sampled_from(TARGETS))
    def start_with_an_adapter(self, dora, where):  # so that sequences reach several adapters a tensor
        self.inject(name="a", where=where, dora=dora, init="default", r=2)

    @rule(name=st.sampled_from(NAMES), where=st.sampled_from(TARGETS), dora=st.booleans(),
          init=st.sampled_from(["default", "pissa"]), r=st.integers(1, 3))
    def inject(self, name, where, dora, init, r):
        if dora and init == "pissa":
            init = "default"
        if self.attempt(lambda: li.inject(self.model, where, adapter=name, r=r, alpha=2.0, dora=dora,
                                          init=init)):
            self.randomize_new(name)

    @precondition(lambda self: self.adapters())
    @rule(merge=st.booleans(), data=st.data())
    def remove(self, merge, data):
        names = sorted(self.adapters())
        which = data.draw(st.one_of(st.sampled_from(names).map(lambda n: [n]), st.none(),
                                    st.lists(st.sampled_from(names), min_size=1, unique=True)))
        before = {k: self.stored_w0(k).detach().clone() for k in self.loras()}
        merged = {k for k, lora in self.loras().items()
                  if merge and any(n in lora.active and (which is None or n in which) for n in lora.adapters)}
        out = self.model(self.x).detach()
        if self.attempt(lambda: li.remove(self.model, merge=merge, adapter=which)):
            if merge:  # merging keeps the outputs: the active adapters removed are in W0 now
                torch.testing.assert_close(self.model(self.x), out)
            for k in merged:  # merging writes W0: from now on the merged weight is W0
                self.w0[k] = self.model.state_dict()[k if k in self.model.state_dict() else
                                                      k.rsplit(".", 1)[0] + ".parametrizations."
                                                      + k.rsplit(".", 1)[1] + ".original"].clone()
            for k, w in before.items():
                if k not in merged:
                    assert torch.equal(self.current_w0(k), w)

    def current_w0(self, key):
        sd = self.model.state_dict()
        module, tensor = key.rsplit(".", 1)
        return sd.get(key, sd.get(f"{module}.parametrizations.{tensor}.original"))

    @precondition(lambda self: self.adapters())
    @rule(data=st.data())
    def activate(self, data):
        names = data.draw(st.lists(st.sampled_from(sorted(self.adapters())), unique=True))
        assert self.attempt(lambda: li.activate(self.model, names))

    @rule(name=st.sampled_from(NAMES))
    def disabled(self, name):
        expected = self.reference(lambda lora: [])
        with li.disabled(self.model):
            torch.testing.assert_close(self.model(self.x), expected)
            with li.disabled(self.model):
                torch.testing.assert_close(self.model(self.x), expected)
            if name in self.adapters():  # a call inside the block is kept on exit
                self.attempt(lambda: li.remove(self.model, adapter=name, merge=False))

    @rule()
    def cached(self):
        expected = self.reference()
        with torch.no_grad(), li.cached(self.model):
            torch.testing.assert_close(self.model(self.x), expected)
            torch.testing.assert_close(self.model(self.x), expected)

    @precondition(lambda self: self.adapters())
    @rule(data=st.data())
    def per_sample(self, data):
        rows = data.draw(st.lists(st.sampled_from([None, *sorted(self.adapters())]), min_size=2, max_size=2))
        self.model.eval()
        with torch.no_grad(), li.per_sample(self.model, rows):
            out = self.model(self.x)
        self.model.train()
        for i, name in enumerate(rows):
            want = self.reference(lambda lora, name=name: [name] if name in lora.adapters else [])[i]
            torch.testing.assert_close(out[i], want)

    @precondition(lambda self: self.adapters())
    @rule(data=st.data(), size=st.sampled_from([1, 3, 4]))
    def per_sample_with_a_wrong_number_of_names(self, data, size):
        """One name per sample: any other count is refused, and changes nothing."""
        assert size != self.x.shape[0]
        rows = data.draw(st.lists(st.sampled_from(sorted(self.adapters())), min_size=size, max_size=size))

        def call():
            with torch.no_grad(), li.per_sample(self.model, rows):
                self.model(self.x)

        self.model.eval()
        try:
            assert not self.attempt(call), f"per_sample() took {size} names for a batch of {self.x.shape[0]}"
        finally:
            self.model.train()

    @precondition(lambda self: self.adapters())
    @rule(name=st.sampled_from(NAMES))
    def save_then_load(self, name):
        if name not in self.adapters():
            return
        path = f"{self.tmp.name}/{name}"
        li.save_adapter(self.model, path, adapter=name)
        expected = self.reference()
        factors = {k: v.clone() for k, v in li.lora_state_dict(self.model, adapter=name).items()}
        with torch.no_grad():
            for p in li.lora_parameters(self.model, adapter=name):
                p.add_(1.0)
        li.load_adapter(self.model, path, adapter=name)  # in place: the saved values come back
        for k, v in li.lora_state_dict(self.model, adapter=name).items():
            assert torch.equal(v, factors[k]), k
        torch.testing.assert_close(self.model(self.x), expected)

    @rule()
    def state_dict_round_trip(self):
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            for p in li.lora_parameters(self.model):
                p.mul_(-1.0)
        self.model.load_state_dict(saved, strict=True)
        for k, v in self.model.state_dict().items():
            assert torch.equal(v, saved[k]), k

    @rule()
    def deepcopy(self):
        original = self.model
        replica = copy.deepcopy(original)
        torch.testing.assert_close(replica(self.x), original(self.x))
        li.remove(replica, merge=False)  # the original keeps its adapters
        self.model = copy.deepcopy(original)

    @precondition(lambda self: self.adapters())
    @rule()
    def train_step(self):
        opt = torch.optim.SGD(li.lora_parameters(self.model), lr=0.05)
        self.model(self.x).square().sum().backward()
        opt.step()
        self.model.zero_grad(set_to_none=True)

    @rule()
    def functional_call_with_its_own_state_dict(self):
        before, want = snapshot(self.model), self.model(self.x)
        got = functional_call(self.model, self.model.state_dict(), (self.x,))
        assert torch.equal(got, want)
        assert_unchanged(self.model, before)

    @rule(shift=st.sampled_from([0.25, -1.0]))
    def functional_call_with_a_modified_state_dict(self, shift):
        before = snapshot(self.model)
        sd = {k: v + shift if k in self.w0 else v for k, v in self.model.state_dict().items()}
        weights = {}
        for key, lora in self.loras().items():
            weights[key] = hand_weight(lora, sd[key], lora.active)
        plain = {k: sd[k] for k in self.unadapted()}
        expected = functional_call(self.plain, {**plain, **weights}, (self.x,))
        torch.testing.assert_close(functional_call(self.model, sd, (self.x,)), expected)
        assert_unchanged(self.model, before)

    @rule()
    def meta_build_then_assign_load(self):
        built = copy.deepcopy(self.model).to("meta")  # the same modules and adapters, on meta
        built.load_state_dict(self.model.state_dict(), assign=True)
        assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()])
        torch.testing.assert_close(built(self.x), self.model(self.x), rtol=0, atol=0)
        built.to(torch.float64)
        self.model = built

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def outputs_equal_the_hand_built_reference(self):
        torch.testing.assert_close(self.model(self.x), self.reference())

    @invariant()
    def w0_is_bit_identical_unless_merged(self):
        for key, w in self.w0.items():
            assert torch.equal(self.current_w0(key), w), key

    @invariant()
    def state_dict_keys_are_what_the_adapters_imply(self):
        expected = set()
        adapted = self.loras()
        for key in self.w0:
            if key in adapted:
                module, tensor = key.rsplit(".", 1)
                prefix = f"{module}.parametrizations.{tensor}"
                expected.add(key)  # W0, under the key the model had before injection
                lora = adapted[key]
                expected |= {f"{prefix}.0.{kind}.{n}" for n in lora.adapters for kind in lora.adapter(n).tensor_names}
            else:
                expected.add(key)
        assert set(self.model.state_dict()) == expected


Machine.TestCase.settings = settings(max_examples=200, stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                                     derandomize=True)
TestMachine = Machine.TestCase


# -- files: both formats into one directory, and the model behind torch.compile ------------------
FILES = {"lora_inject": ["adapter.json", "adapter.safetensors"],
         "peft": ["adapter_config.json", "adapter_model.safetensors"]}
FORMATS = sorted(FILES)


def folder(path: str) -> dict[str, bytes]:
    """The files of a directory and their bytes."""
    from pathlib import Path

    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir())} if Path(path).is_dir() else {}


class FilesMachine(Machine):
    """The machine above, with saves in both formats into one directory and calls through a
    compiled model. Besides the invariants above, each rule checks:

    * a directory holds one adapter after each save: the last save's, in its format, and loading
      it gives the outputs the model had when it was saved (the hand-built reference then);
    * a save that is refused leaves the directory as it was, and a load that is refused leaves
      the model as it was (``attempt``);
    * through ``torch.compile``'s wrapper, the outputs equal the hand-built reference, the saved
      paths are the plain model's, and a load through the wrapper updates the plain model's adapter.
    """

    def perturb(self, name: str, by: float) -> None:
        with torch.no_grad():
            for p in li.lora_parameters(self.model, adapter=name):
                p.add_(by)

    def save(self, model: nn.Module, path: str, name: str, fmt: str) -> bool:
        before = folder(path)
        if not self.attempt(lambda: li.save_adapter(model, path, adapter=name, format=fmt)):
            assert folder(path) == before  # a refused save writes nothing
            return False
        assert sorted(folder(path)) == FILES[fmt]  # one adapter: the other format's files are gone
        return True

    def load_gives(self, model: nn.Module, path: str, name: str, expected: torch.Tensor) -> None:
        self.perturb(name, 1.0)
        if self.attempt(lambda: li.load_adapter(model, path, adapter=name)):  # in place
            torch.testing.assert_close(model(self.x), expected)

    @precondition(lambda self: self.adapters())
    @rule(name=st.sampled_from(NAMES), first=st.sampled_from(FORMATS), second=st.sampled_from(FORMATS))
    def save_in_both_formats_into_one_folder(self, name, first, second):
        if name not in self.adapters():
            return
        path = f"{self.tmp.name}/shared"
        self.save(self.model, path, name, first)
        self.perturb(name, 0.25)  # the second save holds other values than the first
        if not self.save(self.model, path, name, second):
            return
        self.load_gives(self.model, path, name, self.reference().detach())

    @precondition(lambda self: self.adapters())
    @rule(name=st.sampled_from(NAMES), fmt=st.sampled_from(FORMATS))
    def compile_then_save_and_load(self, name, fmt):
        if name not in self.adapters():
            return
        compiled = torch.compile(self.model, backend="eager")
        try:
            expected = self.reference().detach()
            torch.testing.assert_close(compiled(self.x), expected)
            path = f"{self.tmp.name}/compiled"
            if not self.save(compiled, path, name, fmt):
                return
            from safetensors.torch import load_file

            keys = load_file(f"{path}/{FILES[fmt][1]}")
            assert not any("_orig_mod" in k for k in keys), sorted(keys)
            self.load_gives(compiled, path, name, expected)
            torch.testing.assert_close(self.model(self.x), compiled(self.x))
        finally:
            torch._dynamo.reset()


FilesMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=15, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.filter_too_much],
                                          derandomize=True)
TestFilesMachine = FilesMachine.TestCase
