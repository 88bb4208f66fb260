"""AdapterStore: adapters on disk served from a few resident slots, least recently used evicted."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import lora_inject as li

TARGETS = "0|2"


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.fixture
def stored(tmp_path):
    """Twelve adapters of ranks 2 and 4 saved under tmp_path, and each one's output on x."""
    b, x = base(), torch.randn(4, 16)
    want = {}
    gen = torch.Generator().manual_seed(1)
    for k in range(12):
        model = li.inject(copy.deepcopy(b), TARGETS, r=2 if k % 2 else 4, alpha=4)
        with torch.no_grad():
            for p in li.lora_parameters(model):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            want[f"u{k}"] = model(x)
        li.save_adapter(model, tmp_path / f"u{k}")
    with torch.no_grad():
        want[None] = b(x)
    return tmp_path, x, want


def expected(want, names):
    return torch.stack([want[n][i] for i, n in enumerate(names)])


def test_a_stream_of_batches_gets_each_adapters_outputs_and_evicts_the_least_recently_used(stored):
    root, x, want = stored
    store = li.AdapterStore(base(), root, slots=3, targets=TARGETS, r=4)
    stream = [["u0", "u1", "u0", None], ["u2", "u0", "u2", "u2"], ["u3", "u3", None, None],  # u1 goes
              ["u0", "u4", "u3", "u0"], ["u1", "u1", "u1", "u1"], ["u5", "u6", "u7", None]]
    resident = []
    with torch.no_grad():
        for i, names in enumerate(stream):
            if i + 1 < len(stream):
                store.prefetch(stream[i + 1])  # read in the background while this batch runs
            with store.serve(names) as model:
                torch.testing.assert_close(model(x), expected(want, names), rtol=1e-5, atol=1e-5)
            resident.append(list(store.resident))
    assert resident == [  # least recently used first; a hit moves an adapter last
        ["u1", "u0"], ["u1", "u0", "u2"], ["u0", "u2", "u3"],  # u3 evicts u1
        ["u4", "u3", "u0"],  # u4 evicts u2, not u0 or u3, which this batch uses
        ["u3", "u0", "u1"], ["u5", "u6", "u7"]]
    # a request is a hit where its adapter was resident before its batch: batch 2's u0, batch 4's
    # u0, u0 and u3
    assert (store.hits, store.misses) == (4, 16)
    assert store.hit_rate == pytest.approx(4 / 20)
    store.close()


def test_the_store_refuses_what_it_cannot_serve(stored):
    root, x, _ = stored
    store = li.AdapterStore(base(), root, slots=2, targets=TARGETS, r=4)
    with pytest.raises(KeyError, match=r"no adapter named 'zz' in the store of 12"):
        store.slots_for(["zz"])
    with pytest.raises(ValueError, match=r"names 3 distinct adapters, more than the 2 slots"):
        store.slots_for(["u0", "u1", "u2"])
    with store.serve(["u0"]):  # its slot stays resident until the block exits
        store.slots_for(["u1"])
        with pytest.raises(RuntimeError, match=r"no slot can take 'u2'"):
            store.slots_for(["u1", "u2"])  # one slot is this batch's, the other the open block's
    assert store.slots_for(["u2"]) == ["slot_0"]  # u0's slot, free again: the least recently used
    with pytest.raises(ValueError, match=r"`slots` must be a positive int, got 0"):
        li.AdapterStore(base(), root, slots=0, targets=TARGETS, r=4)
    with pytest.raises(ValueError, match=r"is not a directory"):
        li.AdapterStore(base(), root / "nowhere", slots=2, targets=TARGETS, r=4)
    store.close()


def test_an_adapter_that_does_not_fit_is_refused_with_every_slot_as_it_was(stored, tmp_path_factory):
    root, x, want = stored
    big = li.inject(base(), TARGETS, r=8)
    li.save_adapter(big, root / "big")
    store = li.AdapterStore(base(), root, slots=2, targets=TARGETS, r=4)
    with torch.no_grad():
        for _ in range(3):  # each refusal leaves the slots and what they hold as they were
            store.slots_for(["u0", "u1"])
            with pytest.raises(ValueError, match=r"adapter 'big' \(from '.*big'\) does not fit the store's slots.*"
                                                 r"r at most 4. No slot was changed.*r=8"):
                store.slots_for(["big"])
            assert store.resident == {"u0": "slot_0", "u1": "slot_1"}
        with pytest.raises(ValueError, match=r"adapter 'big'.*No slot was changed"):
            store.slots_for(["u2", "big"])  # u2 fits, but the batch is refused before it evicts anything
        assert store.resident == {"u0": "slot_0", "u1": "slot_1"}
        with store.serve(["u0"]), pytest.raises(RuntimeError, match=r"no slot can take 'u3'"):
            store.slots_for(["u2", "u3"])  # one slot is the open block's: u2 would fit, u3 not
        assert store.resident == {"u0": "slot_0", "u1": "slot_1"}
        with store.serve(["u2", "u0", None, "u2"]) as model:  # and every slot serves on
            torch.testing.assert_close(model(x), expected(want, ["u2", "u0", None, "u2"]), rtol=1e-5, atol=1e-5)
    assert (store.hits, store.misses) == (3 * 2 - 2 + 2, 2 + 2)  # the refused batches count nothing
    store.close()


def test_the_store_names_a_misuse(stored):
    root, _, _ = stored
    store = li.AdapterStore(base(), root, slots=2, targets=TARGETS, r=4)
    misuse = r"`names` must be a sequence of adapter names.*got 'u0'. For one sample, pass \[name\]"
    with pytest.raises(TypeError, match=misuse), store.serve("u0"):
        pass
    for call in (store.slots_for, store.prefetch):
        with pytest.raises(TypeError, match=misuse):
            call("u0")
    store.prefetch([f"u{k}" for k in range(12)])
    assert len(store._reads) <= 2  # the reads held are bounded by the slots
    store.close()
    with pytest.raises(RuntimeError, match=r"the store is closed"):
        store.prefetch(["u3"])


def test_threads_serving_from_one_store_each_get_their_own_adapters(stored):
    root, x, want = stored
    store = li.AdapterStore(base(), root, slots=6, targets=TARGETS, r=4)
    wrong = []

    def serve(seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(30):
                names = [f"u{int(k)}" for k in torch.randint(0, 12, (4,), generator=gen)]
                names[int(seed) % 4] = None
                store.prefetch(names)
                try:
                    with store.serve(names) as model:
                        if not torch.allclose(model(x), expected(want, names), rtol=1e-5, atol=1e-5):
                            wrong.append(names)
                except RuntimeError as e:  # every slot held by the other threads' blocks: retry later
                    assert "no slot can take" in str(e)

    threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:3]
    assert store.hits + store.misses > 0
    store.close()


@pytest.mark.slow
def test_loading_into_a_slot_recompiles_nothing(stored, monkeypatch):
    root, x, want = stored
    torch._dynamo.reset()
    store = li.AdapterStore(base(), root, slots=2, targets=TARGETS, r=4)
    compiled = torch.compile(store.model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        with store.serve(["u0", "u1", None, "u0"]):
            compiled(x)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        for names in (["u2", "u3", "u2", None], ["u4", None, "u4", "u5"], ["u3", "u4", "u3", "u4"]):
            with store.serve(names):
                torch.testing.assert_close(compiled(x), expected(want, names), rtol=1e-5, atol=1e-5)
    store.close()
    torch._dynamo.reset()
