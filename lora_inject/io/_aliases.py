"""The names a diffusion file may give each module of a live model, built from the model itself.

kohya-ss flattens a module's path with ``_`` (``down_blocks.0.attentions.0.proj_in`` is
``down_blocks_0_attentions_0_proj_in``), so a name is matched by flattening the live model's paths,
never by parsing the file's. Besides its own path, a module of a UNet with diffusers' block
structure is also known by its name in the original (LDM/SGM) UNet, which SDXL's kohya-ss files
use (``input_blocks``, ``middle_block``, ``output_blocks``), derived from the blocks the model has;
and a Flux transformer's projections are known by their names in the original (BFL) model, where
``img_attn.qkv``, ``txt_attn.qkv`` and ``linear1`` are one fused projection whose output rows go to
several modules (``to_q``, ``to_k``, ``to_v``, and ``proj_mlp`` for ``linear1``).
"""

from __future__ import annotations

from torch import nn

Target = tuple[str, "slice | None"]  # a module path, and the rows of the saved update it takes (None: all)

# a resnet's parts in the original UNet
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def flat(path: str) -> str:
    return path.replace(".", "_")


def names(root: nn.Module) -> dict[str, list[Target]]:
    """Each name (flattened) a file may use for the modules of ``root``, and the modules it means."""
    table: dict[str, list[Target]] = {}
    for path, _ in root.named_modules():
        if path:
            table.setdefault(flat(path), [(path, None)])
    for original, path in _unet_blocks(root).items():
        table.setdefault(flat(original), [(path, None)])
    for original, targets in _flux_blocks(root).items():
        table.setdefault(flat(original), targets)
    return table


def _unet_blocks(root: nn.Module) -> dict[str, str]:
    """The original UNet's name of each module of a UNet with diffusers' blocks."""
    downs, mid, ups = (getattr(root, n, None) for n in ("down_blocks", "mid_block", "up_blocks"))
    if not isinstance(downs, nn.ModuleList) or not isinstance(ups, nn.ModuleList) or mid is None:
        return {}
    prefixes: dict[str, str] = dict(_TOP)  # diffusers prefix -> original prefix
    i = 1
    for b, block in enumerate(downs):
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if j < len(attentions):
                prefixes[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if getattr(block, "downsamplers", None):
            prefixes[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    prefixes["mid_block.resnets.0"] = "middle_block.0"
    if getattr(mid, "attentions", None):
        prefixes["mid_block.attentions.0"] = "middle_block.1"
    for j in range(1, len(getattr(mid, "resnets", []))):
        prefixes[f"mid_block.resnets.{j}"] = f"middle_block.{j + 1}"
    i = 0
    for b, block in enumerate(ups):
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            if j < len(attentions):
                prefixes[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                prefixes[f"up_blocks.{b}.upsamplers.0"] = f"output_blocks.{i}.{2 if attentions else 1}"
            i += 1
    out = {}
    for path, _ in root.named_modules():
        for prefix, original in prefixes.items():
            if path == prefix or path.startswith(prefix + "."):
                rest = path[len(prefix):]
                if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
                    head, _, tail = rest.lstrip(".").partition(".")
                    rest = "." + _RESNET.get(head, head) + ("." + tail if tail else "") if rest else ""
                out[original + rest] = path
                break
    return out


def _flux_blocks(root: nn.Module) -> dict[str, list[Target]]:
    """The original (BFL) Flux name of each projection of a diffusers Flux transformer, the fused
    ones split by output rows onto their parts."""
    doubles, singles = getattr(root, "transformer_blocks", None), getattr(root, "single_transformer_blocks", None)
    if not isinstance(doubles, nn.ModuleList) or not isinstance(singles, nn.ModuleList):
        return {}
    out: dict[str, list[Target]] = {}

    def fused(name: str, prefix: str, parts: list[str]) -> None:
        modules = dict(root.named_modules())
        if not all(f"{prefix}.{p}" in modules for p in parts):
            return
        targets, start = [], 0
        for p in parts:
            n = modules[f"{prefix}.{p}"].weight.shape[0]
            targets.append((f"{prefix}.{p}", slice(start, start + n)))
            start += n
        out[name] = targets

    one = {"img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "img_mod.lin": "norm1.linear", "txt_attn.proj": "attn.to_add_out", "txt_mlp.0": "ff_context.net.0.proj",
           "txt_mlp.2": "ff_context.net.2", "txt_mod.lin": "norm1_context.linear"}
    for i in range(len(doubles)):
        for original, path in one.items():
            out[f"double_blocks.{i}.{original}"] = [(f"transformer_blocks.{i}.{path}", None)]
        fused(f"double_blocks.{i}.img_attn.qkv", f"transformer_blocks.{i}.attn", ["to_q", "to_k", "to_v"])
        fused(f"double_blocks.{i}.txt_attn.qkv", f"transformer_blocks.{i}.attn",
              ["add_q_proj", "add_k_proj", "add_v_proj"])
    for i in range(len(singles)):
        prefix = f"single_transformer_blocks.{i}"
        out[f"single_blocks.{i}.linear2"] = [(f"{prefix}.proj_out", None)]
        out[f"single_blocks.{i}.modulation.lin"] = [(f"{prefix}.norm.linear", None)]
        fused(f"single_blocks.{i}.linear1", prefix, ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"])
    return out
