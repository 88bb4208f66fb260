"""AdapterTrainer on a distributed engine through ``accelerate launch``: DDP and FSDP2, 2 processes
on the CPU over gloo, with the configs kept in tests/accelerate/.

Each run (tests/_trainer_worker.py) trains 4 steps with a checkpoint every 2, then resumes a
fresh model from the first checkpoint. The checkpoints hold the adapter alone (under FSDP2 too,
where Trainer would write sharded copies of the whole model), ``load_adapter`` reads them, and the
resumed run ends bit for bit where the uninterrupted one did.

accelerate 1.15 applies FSDP on accelerator backends only, and on the CPU silently falls back to
DDP: the FSDP2 run lifts that one backend check in the worker (``--fsdp-on-cpu``, see
tests/_trainer_worker.py), so accelerate's own FSDP2 path runs. On a GPU machine, run the same
command without the flag.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import _trainer_worker as worker
import pytest
import torch

import lora_inject as li

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, out: pathlib.Path, *flags: str) -> list[dict]:
    """``accelerate launch --config_file tests/accelerate/<config> tests/_trainer_worker.py out``;
    each rank's results."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "tests/accelerate" / config),
           "--main_process_port", str(free_port()), str(ROOT / "tests/_trainer_worker.py"), str(out), *flags]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, launch("ddp.yaml", out)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    return out, launch("fsdp2.yaml", out, "--fsdp-on-cpu")


def check_run(out: pathlib.Path, ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The checks every engine passes; the trained adapter."""
    whole = ranks[0]["whole"]
    initial = li.lora_state_dict(worker.adapted())
    assert whole.keys() == initial.keys()
    assert all(not torch.equal(whole[k], initial[k]) for k in whole)  # every factor trained
    for rank in ranks:  # every rank ends with the same adapter, and the resumed run with it bit for bit
        assert rank["whole"].keys() == rank["resumed"].keys() == whole.keys()
        for k, v in whole.items():
            assert torch.equal(rank["whole"][k], v) and torch.equal(rank["resumed"][k], v), k
    for step in (worker.EVERY, worker.STEPS):  # the checkpoints: the adapter alone, read by load_adapter
        ckpt = out / "whole" / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {"adapter.json", "adapter.safetensors"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0"}, files
        loaded = li.lora_state_dict(li.load_adapter(worker.adapted(), ckpt))
        if step == worker.STEPS:
            assert all(torch.equal(loaded[k], v) for k, v in whole.items())
    return whole


def test_adapter_trainer_under_ddp(ddp):
    out, ranks = ddp
    assert [r["engine"] for r in ranks] == [{"fsdp": False, "ddp": "DistributedDataParallel", "world": 2,
                                             "backend": "gloo", "factor": "Parameter"}] * 2
    check_run(out, ranks)


def test_adapter_trainer_under_fsdp2_writes_adapter_checkpoints(fsdp2, ddp):
    out, ranks = fsdp2
    for r in ranks:  # accelerate's FSDP2 path ran: the model is fully_shard'ed, the factors DTensor shards
        assert r["engine"]["fsdp"] and r["engine"]["ddp"].startswith("FSDP") and r["engine"]["factor"] == "DTensor"
        assert (r["engine"]["world"], r["engine"]["backend"]) == (2, "gloo")
    assert "optimizer_0" in os.listdir(out / "whole" / f"checkpoint-{worker.EVERY}")  # the optimizer's shards
    whole = check_run(out, ranks)
    torch.testing.assert_close(whole, ddp[1][0]["whole"])  # the same training as DDP's
