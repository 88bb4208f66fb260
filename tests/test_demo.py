"""`lora-inject demo --fast`: it really trains, merging is exact, and the files are written."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import lora_inject as li
from lora_inject.cli import main
from lora_inject.demo import TARGETS, default_model_dir, load_feedback


def test_the_shipped_data_is_balanced_and_the_held_out_phrasings_are_unseen():
    train, test, labels = load_feedback()
    assert len(labels) == 4 and 300 <= len(train) + len(test) <= 600
    assert set(Counter(r["label"] for r in train).values()) == {len(train) // 4}
    assert set(Counter(r["label"] for r in test).values()) == {len(test) // 4}
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    negated = ("not ", "n't ", "never ", " no ")
    for rows in (train, test):  # negation alone says nothing about the class
        for label in labels:
            texts = [r["text"] for r in rows if r["label"] == label]
            share = sum(any(w in t for w in negated) for t in texts) / len(texts)
            assert 0.3 < share < 0.7, (label, share)


@pytest.mark.slow
def test_demo_fast_trains_merges_exactly_and_writes_its_files(tmp_path, capsys):
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())

    # It really trained: the fresh head starts at ln(4); the loss ends well below.
    losses = m["losses"]
    assert losses[0] == pytest.approx(torch.tensor(4.0).log().item(), abs=1e-4)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]
    assert m["merged_close_to_unmerged"] is True and m["merged_same_predictions"] is True
    assert 0 <= m["merged_vs_unmerged_max_abs_diff"] < 1e-4 and m["merged_vs_factored_max_abs_diff"] < 1e-3
    assert m["loras_left_after_merge"] == 0
    assert 0 < m["trainable_percent"] < 1
    for step in ("1. baseline", "2. inject", "3. training", "4. held-out accuracy", "5. adapter saved",
                 "6. remove(model, merge=True)", "7. curves written"):
        assert step in printed
    # A smoke run's accuracies mean nothing, and it says so, next to them and at the end.
    accuracy_line = next(line for line in printed.splitlines() if line.startswith("4. held-out accuracy"))
    assert "smoke run" in accuracy_line and "mean nothing" in accuracy_line
    assert printed.rstrip().endswith("Run `lora-inject demo` for the real figures.")

    # The files: a PNG, the head, and an adapter that loads into a fresh model and changes it.
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(load_file(str(tmp_path / "head.safetensors"))) == {"weight", "bias"}
    assert m["adapter_bytes"] == sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert m["adapter_bytes"] * 50 < m["model_bytes"]
    model = li.load_adapter(AutoModel.from_pretrained(default_model_dir()), tmp_path / "adapter")
    names = [name for name, _ in li.named_loras(model)]
    assert len(names) == 24 and all(n.endswith(".weight") for n in names)
    assert all(re.search(TARGETS, n.rsplit(".", 1)[0]) for n in names)
    assert all(lora.lora_B["default"].abs().max() > 0 for _, lora in li.named_loras(model))  # B starts at 0


def test_progress_bars_show_only_on_a_terminal_and_need_no_tqdm(monkeypatch, capsys):
    import sys

    from lora_inject.demo import progress

    bar = progress(range(3), desc="x")  # under pytest stderr is not a terminal: no bar is drawn
    assert list(bar) == [0, 1, 2] and bar.disable
    bar.close()
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    quiet = progress(total=4, desc="training")
    quiet.update()
    quiet.set_postfix(loss="0.1")
    quiet.write("epoch 1")
    quiet.close()
    captured = capsys.readouterr()
    assert captured.out == "epoch 1\n" and captured.err == ""
