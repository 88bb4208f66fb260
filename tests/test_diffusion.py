"""The files the diffusion world trades: kohya-ss, LyCORIS and diffusers LoRA files into tiny
diffusers models, text encoders and pipelines, checked against diffusers' and LyCORIS' own loads."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from _helpers import assert_unchanged, snapshot
from torch import nn

import lora_inject as li

diffusers = pytest.importorskip("diffusers")
st = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

from lora_inject.io._aliases import _flux_blocks, _unet_blocks  # noqa: E402


# -- tiny models, built from configs ------------------------------------------------------------
def unet(sdxl: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if sdxl:  # SDXL's structure: two resnets a level, text-time embedding, linear projections
        return diffusers.UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=4, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=32,
            cross_attention_dim=12, norm_num_groups=4)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4)


def text_encoder(hidden: int = 12) -> nn.Module:
    torch.manual_seed(1)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1))


def flux() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=8, pooled_projection_dim=6, axes_dims_rope=[0, 2, 2])


def pipeline(u=None, te=None):
    return diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8),
        text_encoder=te or text_encoder(), tokenizer=None, unet=u or unet(),
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


X = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
CTX = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(4))
IDS = torch.tensor([[0, 5, 7, 1]])
ADDED = {"text_embeds": torch.randn(1, 8, generator=torch.Generator().manual_seed(5)),
         "time_ids": torch.randn(1, 6, generator=torch.Generator().manual_seed(6))}


@torch.no_grad()
def run_unet(u) -> torch.Tensor:
    added = ADDED if u.config.addition_embed_type == "text_time" else None
    return u(X, torch.tensor([3]), CTX, added_cond_kwargs=added).sample


@torch.no_grad()
def run_te(te) -> torch.Tensor:
    return te(IDS).last_hidden_state


@torch.no_grad()
def run_flux(t) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return t(hidden_states=torch.randn(1, 4, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 8, generator=g),
             pooled_projections=torch.randn(1, 6, generator=g), timestep=torch.tensor([0.5]),
             img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3)).sample


# -- files, by hand ---------------------------------------------------------------------------
def kohya_lora(model: nn.Module, prefix: str, *, names=None, r: int = 2, alpha: float | None = 1.0,
               seed: int = 1, conv: bool = True, wrapper: str = "") -> dict[str, torch.Tensor]:
    """A kohya-ss LoRA on every Linear (and Conv2d: LoCon, k x k down, 1 x 1 up) of ``model``, each
    named by ``names`` (default: its path) flattened behind ``prefix``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or (isinstance(m, nn.Conv2d) and not conv):
            continue
        k = f"{prefix}_{wrapper}" + (names or {}).get(n, n).replace(".", "_")
        if isinstance(m, nn.Linear):
            sd[f"{k}.lora_down.weight"] = torch.randn(r, m.in_features, generator=g) * 0.3
            sd[f"{k}.lora_up.weight"] = torch.randn(m.out_features, r, generator=g) * 0.3
        else:
            sd[f"{k}.lora_down.weight"] = torch.randn(r, m.in_channels, *m.kernel_size, generator=g) * 0.3
            sd[f"{k}.lora_up.weight"] = torch.randn(m.out_channels, r, 1, 1, generator=g) * 0.3
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


def save(tmp_path, sd, name="lora.safetensors") -> str:
    path = str(tmp_path / name)
    st.save_file(sd, path)
    return path


def by_diffusers(pipe_class, sd, **models):
    """The models with ``sd`` loaded by diffusers' own conversion and peft injection."""
    converted, alphas = pipe_class.lora_state_dict(dict(sd), **(
        {"unet_config": models["unet"].config} if "unet" in models and pipe_class is
        diffusers.StableDiffusionXLPipeline else {}))
    if "unet" in models:
        pipe_class.load_lora_into_unet(converted, alphas, models["unet"], adapter_name="ref")
    if "text_encoder" in models:
        pipe_class.load_lora_into_text_encoder(converted, alphas, models["text_encoder"], adapter_name="ref")
    return models


# -- kohya-ss, against diffusers --------------------------------------------------------------
def test_kohya_file_into_a_unet_and_a_text_encoder_matches_diffusers(tmp_path):
    u, te = unet(), text_encoder()
    sd = {**kohya_lora(u, "lora_unet", alpha=1.0),
          **kohya_lora(te, "lora_te", alpha=3.0, seed=2, wrapper="text_model_")}
    path = save(tmp_path, sd)
    ref = by_diffusers(diffusers.StableDiffusionPipeline, sd, unet=unet(), text_encoder=text_encoder())
    ours_u, ours_te = unet(), text_encoder()
    with pytest.warns(UserWarning, match=r"also holds the component\(s\) \['text_encoder'\]"):
        li.load_adapter(ours_u, path)
    with pytest.warns(UserWarning, match=r"also holds the component\(s\) \['unet'\]"):
        li.load_adapter(ours_te, path)
    assert not torch.allclose(run_unet(ours_u), run_unet(u))
    torch.testing.assert_close(run_unet(ours_u), run_unet(ref["unet"]))
    torch.testing.assert_close(run_te(ours_te), run_te(ref["text_encoder"]))
    # unmerged: taking it out gives the base back exactly
    li.remove(ours_u, merge=False)
    assert torch.equal(run_unet(ours_u), run_unet(u))


@pytest.mark.slow
def test_kohya_file_into_a_pipeline_loads_each_component(tmp_path):
    u, te = unet(), text_encoder()
    sd = {**kohya_lora(u, "lora_unet"), **kohya_lora(te, "lora_te", seed=2, wrapper="text_model_")}
    path = save(tmp_path, sd)
    ref = by_diffusers(diffusers.StableDiffusionPipeline, sd, unet=unet(), text_encoder=text_encoder())
    pipe = pipeline()
    li.load_adapter(pipe, path, adapter="style")
    torch.testing.assert_close(run_unet(pipe.unet), run_unet(ref["unet"]))
    torch.testing.assert_close(run_te(pipe.text_encoder), run_te(ref["text_encoder"]))
    assert {n for n, _ in li.named_loras(pipe.unet)} and all(
        lora.adapters == ["style"] for _, lora in li.named_loras(pipe.text_encoder))
    # and diffusers' own pipeline load of the same file, on a pipeline of the same models
    theirs = pipeline()
    theirs.load_lora_weights(path)
    torch.testing.assert_close(run_unet(pipe.unet), run_unet(theirs.unet))


@pytest.mark.slow
def test_sdxl_original_block_names_match_diffusers(tmp_path):
    u = unet(sdxl=True)
    original = {path: name for name, path in _unet_blocks(u).items()}
    assert {"input_blocks.4.1.transformer_blocks.1.attn2.to_k", "middle_block.2.out_layers.3",
            "output_blocks.2.2.conv", "input_blocks.3.0.op", "label_emb.0.2"} <= set(original.values())
    sd = kohya_lora(u, "lora_unet", names=original, alpha=1.5)
    assert all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                             "lora_unet_time_embed", "lora_unet_label_emb", "lora_unet_out_")) for k in sd)
    ref = by_diffusers(diffusers.StableDiffusionXLPipeline, sd, unet=unet(sdxl=True))["unet"]
    ours = li.load_adapter(unet(sdxl=True), save(tmp_path, sd))
    torch.testing.assert_close(run_unet(ours), run_unet(ref))


def test_flux_original_names_and_fused_qkv_match_diffusers(tmp_path):
    t = flux()
    modules = dict(t.named_modules())
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, targets in _flux_blocks(t).items():
        out = sum(modules[p].weight.shape[0] for p, _ in targets)
        k = "lora_unet_" + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = torch.randn(2, modules[targets[0][0]].weight.shape[1], generator=g) * 0.3
        sd[f"{k}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.3
        sd[f"{k}.alpha"] = torch.tensor(1.5)
    # diffusers splits single_blocks' linear1 at Flux's full size only, so it checks the rest
    theirs = {k: v for k, v in sd.items() if "linear1" not in k}
    converted, alphas = diffusers.FluxPipeline.lora_state_dict(dict(theirs), return_alphas=True)
    ref = flux()
    diffusers.FluxPipeline.load_lora_into_transformer(converted, alphas, ref, adapter_name="ref")
    ours = li.load_adapter(flux(), save(tmp_path, theirs))
    torch.testing.assert_close(run_flux(ours), run_flux(ref))
    # linear1 split onto to_q, to_k, to_v and proj_mlp by rows, against the merged plain layers
    whole = li.load_adapter(flux(), save(tmp_path, sd, "all.safetensors"))
    # the parts' factors share one saved down and one saved up, but no storage: each trains on its own
    factors = [t for _, lora in li.named_loras(whole) for t in (lora.lora_A["default"], lora.lora_B["default"])]
    assert len({t.untyped_storage().data_ptr() for t in factors}) == len(factors)
    k = "lora_unet_single_blocks_0_linear1"
    delta = sd[f"{k}.lora_up.weight"] @ sd[f"{k}.lora_down.weight"] * (1.5 / 2)
    start = 0
    for part in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        W0 = modules[f"single_transformer_blocks.0.{part}"].weight
        n = W0.shape[0]
        W = dict(whole.named_modules())[f"single_transformer_blocks.0.{part}"].weight
        torch.testing.assert_close(torch.as_tensor(W), W0 + delta[start:start + n])
        start += n


def test_locon_tucker_and_dora_in_kohya_files(tmp_path):
    """lora_mid (Tucker) and dora_scale (on the output axis), against the merged plain layer."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    lin = nn.Linear(5, 7)
    model = nn.ModuleDict({"conv": conv, "lin": lin})
    g = torch.Generator().manual_seed(0)
    down, mid, up = (torch.randn(2, 4, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g),
                     torch.randn(6, 2, 1, 1, generator=g))
    ld, lu = torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    m = lin.weight.norm(dim=1) * 1.2
    sd = {"lycoris_conv.lora_down.weight": down, "lycoris_conv.lora_mid.weight": mid,
          "lycoris_conv.lora_up.weight": up, "lycoris_conv.alpha": torch.tensor(1.0),
          "lycoris_lin.lora_down.weight": ld, "lycoris_lin.lora_up.weight": lu, "lycoris_lin.alpha": torch.tensor(6.0),
          "lycoris_lin.dora_scale": m[:, None]}
    ours = li.load_adapter(copy.deepcopy(model), save(tmp_path, sd))
    dW = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * 0.5
    torch.testing.assert_close(torch.as_tensor(ours["conv"].weight), conv.weight + dW)
    merged = lin.weight + lu @ ld * 2.0
    torch.testing.assert_close(torch.as_tensor(ours["lin"].weight), merged * (m / merged.norm(dim=1))[:, None])


def test_dora_along_the_input_axis_against_the_formula_and_read_back(tmp_path):
    """LyCORIS' dora_scale (1, in, ..) (wd_on_out=False): W = m * V / ||V|| with the norm over the output
    units (and a Conv's kernel) for each input unit; it saves back as it came, and peft refuses it."""
    conv, lin = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(5, 5)  # square: (1, 5) is the input axis
    model = nn.ModuleDict({"conv": conv, "lin": lin})
    g = torch.Generator().manual_seed(0)
    cd, cu, ld, lu = (torch.randn(2, 4, 3, 3, generator=g), torch.randn(6, 2, 1, 1, generator=g),
                      torch.randn(2, 5, generator=g), torch.randn(5, 2, generator=g))
    cm, lm = torch.rand(1, 4, 1, 1, generator=g) + 1, torch.rand(1, 5, generator=g) + 1
    sd = {"lycoris_conv.lora_down.weight": cd, "lycoris_conv.lora_up.weight": cu,
          "lycoris_conv.alpha": torch.tensor(1.0), "lycoris_conv.dora_scale": cm,
          "lycoris_lin.lora_down.weight": ld, "lycoris_lin.lora_up.weight": lu,
          "lycoris_lin.alpha": torch.tensor(1.0), "lycoris_lin.dora_scale": lm}
    ours = li.load_adapter(copy.deepcopy(model), save(tmp_path, sd))
    V = conv.weight + torch.einsum("oa,aihw->oihw", cu[:, :, 0, 0], cd) * 0.5
    norm = torch.linalg.vector_norm(V, dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(torch.as_tensor(ours["conv"].weight), V * cm / norm)
    V = lin.weight + lu @ ld * 0.5
    torch.testing.assert_close(torch.as_tensor(ours["lin"].weight), V * lm / V.norm(dim=0, keepdim=True))
    x = torch.randn(2, 5)
    torch.testing.assert_close(ours["lin"](x), x @ (V * lm / V.norm(dim=0, keepdim=True)).T + lin.bias)
    li.save_adapter(ours, tmp_path / "ours")
    back = li.load_adapter(copy.deepcopy(model), tmp_path / "ours")
    assert torch.equal(torch.as_tensor(back["conv"].weight), torch.as_tensor(ours["conv"].weight))
    li.save_adapter(ours, tmp_path / "kohya.safetensors", format="kohya")
    written = st.load_file(tmp_path / "kohya.safetensors")
    assert torch.equal(written["lora_unet_conv.dora_scale"], cm)
    assert torch.equal(written["lora_unet_lin.dora_scale"], lm)
    with pytest.raises(ValueError, match="per input unit"):
        li.save_adapter(ours, tmp_path / "peft", format="peft")
    li.remove(ours, merge=False)
    assert torch.equal(ours["conv"].weight, conv.weight) and torch.equal(ours["lin"].weight, lin.weight)


@pytest.mark.slow
def test_sdxl_pipeline_file_with_two_text_encoders_matches_diffusers(tmp_path):
    def te2():
        torch.manual_seed(2)
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, projection_dim=8))

    def sdxl():
        return diffusers.StableDiffusionXLPipeline(
            vae=diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, sample_size=8),
            text_encoder=text_encoder(), text_encoder_2=te2(), tokenizer=None, tokenizer_2=None, unet=unet(sdxl=True),
            scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False))

    u = unet(sdxl=True)
    original = {path: name for name, path in _unet_blocks(u).items()}
    sd = {**kohya_lora(u, "lora_unet", names=original), **kohya_lora(text_encoder(), "lora_te1", seed=2,
                                                                       wrapper="text_model_"),
          **kohya_lora(te2(), "lora_te2", seed=3, alpha=4.0)}  # its paths hold text_model already
    path = save(tmp_path, sd)
    theirs, ours = sdxl(), sdxl()
    theirs.load_lora_weights(path)
    li.load_adapter(ours, path)
    torch.testing.assert_close(run_unet(ours.unet), run_unet(theirs.unet))
    torch.testing.assert_close(run_te(ours.text_encoder), run_te(theirs.text_encoder))
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder_2(IDS).text_embeds, theirs.text_encoder_2(IDS).text_embeds)
    # given alone, the second text encoder takes lora_te2_ (the shapes say which), and names the rest
    alone = te2()
    with pytest.warns(UserWarning, match=r"also holds the component\(s\) \['text_encoder', 'unet'\]"):
        li.load_adapter(alone, path)
    with torch.no_grad():
        torch.testing.assert_close(alone(IDS).text_embeds, theirs.text_encoder_2(IDS).text_embeds)


@pytest.mark.slow
def test_diffusers_layout_saved_by_diffusers_matches(tmp_path):
    """diffusers' own save_lora_weights (peft keys, alphas in its metadata), read back."""
    from peft.utils import get_peft_model_state_dict

    u, te = unet(), text_encoder()
    sd = {**kohya_lora(u, "lora_unet", alpha=1.0), **kohya_lora(te, "lora_te", seed=2, wrapper="text_model_")}
    theirs = pipeline()
    theirs.load_lora_weights(save(tmp_path, sd))
    out = tmp_path / "diffusers"
    theirs.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(theirs.unet, adapter_name="default_0"),
        text_encoder_lora_layers=get_peft_model_state_dict(theirs.text_encoder, adapter_name="default_0"),
        unet_lora_adapter_metadata=theirs.unet.peft_config["default_0"].to_dict(),
        text_encoder_lora_adapter_metadata=theirs.text_encoder.peft_config["default_0"].to_dict())
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k
               for k in st.load_file(out / "pytorch_lora_weights.safetensors"))
    ours = li.load_adapter(pipeline(), out)
    torch.testing.assert_close(run_unet(ours.unet), run_unet(theirs.unet))
    torch.testing.assert_close(run_te(ours.text_encoder), run_te(theirs.text_encoder))


# -- LyCORIS, against LyCORIS itself --------------------------------------------------------------
LYCORIS = [("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {}), ("lokr", {"factor": 2}),
           ("lokr", {"decompose_both": True, "use_tucker": True}), ("full", {}), ("lora", {"dora_wd": True}),
           ("lora", {"dora_wd": True, "wd_on_output": False})]


def lycoris_file(tmp_path, algo: str, seed: int, **options) -> tuple[nn.Module, str]:
    """A tiny UNet with LyCORIS's ``algo`` applied, its tensors random (``seed``), and the file LyCORIS
    saved of them: (that UNet, the file's path)."""
    lycoris = pytest.importorskip("lycoris")
    ref = unet()
    net = lycoris.create_lycoris(ref, 1.0, linear_dim=4, linear_alpha=2, conv_dim=2, conv_alpha=1, algo=algo,
                                 **options)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = str(tmp_path / "lycoris.safetensors")
    net.save_weights(path, torch.float32, None)
    return ref, path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("algo", "options"), LYCORIS, ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o in LYCORIS])
def test_lycoris_files_match_lycoris(algo, options, tmp_path):
    ref, path = lycoris_file(tmp_path, algo, 2, **options)
    ours = li.load_adapter(unet(), path)
    kinds = {lora.adapter("default").kind for _, lora in li.named_loras(ours)}
    assert kinds == {{"loha": "loha", "lokr": "lokr"}.get(algo, "lora")}
    torch.testing.assert_close(run_unet(ours), run_unet(ref), rtol=1e-5, atol=1e-5)


# LyCORIS's factorization puts the smaller factor first for a factor above the square root (peft's does
# not), and unbalanced_factorization swaps the output's two: the saved shapes give the split
LOKR_SPLITS = [{"factor": 8}, {"factor": 8, "unbalanced_factorization": True}, {"unbalanced_factorization": True}]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("options", LOKR_SPLITS, ids=["factor8", "factor8-unbalanced", "unbalanced"])
def test_lycoris_lokr_with_splits_peft_does_not_make_matches_lycoris(options, tmp_path):
    ref, path = lycoris_file(tmp_path, "lokr", 3, **options)
    ours = unet()
    before, base = snapshot(ours), run_unet(ours)
    li.load_adapter(ours, path)
    splits = [lora.adapter("default").options["factors"] for _, lora in li.named_loras(ours)]
    assert any(s is not None for s in splits)  # some layers' split is not peft's
    torch.testing.assert_close(run_unet(ours), run_unet(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"factors=.*peft's factorization gives for no decompose_factor"):
        li.save_adapter(ours, tmp_path / "peft", format="peft")
    li.save_adapter(ours, tmp_path / "ours", format="lora_inject")  # the split survives our format
    again = li.load_adapter(unet(), tmp_path / "ours")
    assert torch.equal(run_unet(again), run_unet(ours))
    li.remove(ours, merge=False)
    assert torch.equal(run_unet(ours), base)
    assert_unchanged(ours, before)


# -- bad input ---------------------------------------------------------------------------------
def test_a_unet_file_given_to_a_text_encoder_is_refused_naming_keys(tmp_path):
    te = text_encoder()
    path = save(tmp_path, kohya_lora(unet(), "lora_unet"))
    before = snapshot(te)
    with pytest.raises(ValueError, match=r"no key of .* matches a module of CLIPTextModel.*lora_unet_"):
        li.load_adapter(te, path)
    assert_unchanged(te, before)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_garbage_file_is_refused(damage, tmp_path):
    u = unet()
    path = save(tmp_path, kohya_lora(u, "lora_unet"))
    blob = Path(path).read_bytes()
    Path(path).write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"\x13\x37 not a file" * 20)
    before = snapshot(u)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        li.load_adapter(u, path)
    assert_unchanged(u, before)


def test_a_partial_match_is_refused_unless_strict_is_false(tmp_path):
    u = unet()
    sd = kohya_lora(u, "lora_unet")
    sd.update({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.randn(8, 2)})
    path = save(tmp_path, sd)
    before = snapshot(u)
    with pytest.raises(ValueError, match=r"1 of its \d+ modules match no module.*down_blocks_7.*nearest.*strict=False"):
        li.load_adapter(u, path)
    assert_unchanged(u, before)
    with pytest.warns(UserWarning, match=r"skipped 1 module.*down_blocks_7"):
        li.load_adapter(u, path, strict=False)
    full = li.load_adapter(unet(), save(tmp_path, kohya_lora(unet(), "lora_unet"), "whole.safetensors"))
    torch.testing.assert_close(run_unet(u), run_unet(full))


def test_a_file_whose_tensors_do_not_fit_is_refused(tmp_path):
    u = unet()
    sd = kohya_lora(unet(), "lora_unet", conv=False)
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    sd[f"{k}.lora_down.weight"] = torch.randn(2, 9)
    before = snapshot(u)
    with pytest.raises(ValueError, match="to_q.*does not fit Linear"):
        li.load_adapter(u, save(tmp_path, sd))
    assert_unchanged(u, before)


# -- strength ----------------------------------------------------------------------------------
def test_strengths_scale_each_adapters_update(tmp_path):
    base = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(5, 4, 1))
    model = copy.deepcopy(base)
    for name in ("style", "detail"):
        li.inject(model, ["0", "1"], r=2, alpha=4, adapter=name)
    torch.manual_seed(3)
    for p in li.lora_parameters(model):
        p.data.normal_()
    x = torch.randn(1, 6)
    lin = model[0]

    def weight(strengths):
        li.activate(model, strengths)
        return torch.as_tensor(lin.weight).detach().clone()

    W0 = base[0].weight
    one = {n: weight({n: 1.0}) - W0 for n in ("style", "detail")}
    torch.testing.assert_close(weight({"style": 0.8, "detail": 1.0}) - W0, 0.8 * one["style"] + one["detail"])
    torch.testing.assert_close(weight({"style": -0.5, "detail": 0.25}) - W0,
                               -0.5 * one["style"] + 0.25 * one["detail"])
    li.activate(model, ["style", "detail"])  # a list keeps the strengths
    torch.testing.assert_close(torch.as_tensor(lin.weight) - W0, -0.5 * one["style"] + 0.25 * one["detail"])
    with pytest.raises(TypeError, match="strength"):
        li.activate(model, {"style": "high"})
    with pytest.raises(ValueError, match="finite"):
        li.activate(model, {"style": math.inf})
    del x


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_changing_a_strength_recompiles_nothing(kind, monkeypatch):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    opts = {} if kind == "lora" else {"kind": "loha"}
    li.inject(model, ["0", "2"], r=2, alpha=4, adapter="style", **opts)
    li.inject(model, ["0", "2"], r=2, alpha=2, adapter="detail", **opts)
    with torch.no_grad():
        for p in li.lora_parameters(model):
            p.normal_(0, 0.3)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 6)
    li.activate(model, {"style": 1.0, "detail": 1.0})
    with torch.no_grad():
        compiled(x)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for s in (0.8, 0.1, -1.0):
        li.activate(model, {"style": s, "detail": 1.0})
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
    torch._dynamo.reset()


# -- writing -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_kohya_export_reads_back_through_diffusers(tmp_path):
    pipe = pipeline()
    u, te = unet(), text_encoder()
    sd = {**kohya_lora(u, "lora_unet", alpha=1.0), **kohya_lora(te, "lora_te", seed=2, wrapper="text_model_")}
    li.load_adapter(pipe, save(tmp_path, sd), adapter="style")
    li.activate(pipe.unet, {"style": 1.0})
    out = str(tmp_path / "export.safetensors")
    li.save_adapter(pipe, out, adapter="style", format="kohya")
    exported = st.load_file(out)
    assert set(exported) == set(sd)
    theirs = pipeline()
    theirs.load_lora_weights(out)
    torch.testing.assert_close(run_unet(theirs.unet), run_unet(pipe.unet))
    torch.testing.assert_close(run_te(theirs.text_encoder), run_te(pipe.text_encoder))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_kohya_export_of_loha_and_lokr_reads_back_through_lycoris(kind, tmp_path, monkeypatch):
    lycoris = pytest.importorskip("lycoris")
    monkeypatch.setattr(lycoris.LycorisNetwork, "LORA_PREFIX", "lora_unet")  # as kohya-ss' networks name a UNet
    ours = li.inject(unet(), r"to_q|to_k|ff\.net\.2|conv1", kind=kind, r=2, alpha=3)
    with torch.no_grad():
        for p in li.lora_parameters(ours):
            p.normal_(0, 0.3)
    path = str(tmp_path / "kind.safetensors")
    li.save_adapter(ours, path, format="kohya")
    theirs = unet()
    net, _ = lycoris.create_lycoris_from_weights(1.0, path, theirs)
    net.apply_to()
    torch.testing.assert_close(run_unet(theirs), run_unet(ours), rtol=1e-5, atol=1e-5)


# -- the command line ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*also holds the component:UserWarning")
def test_cli_inspects_and_converts_a_kohya_file(tmp_path, capsys):
    from lora_inject.cli import main

    u, te = unet(), text_encoder()
    u.save_config(tmp_path / "unet")
    sd = {**kohya_lora(u, "lora_unet", alpha=1.0, r=3),
          **kohya_lora(te, "lora_te", alpha=2.0, seed=2, wrapper="text_model_")}
    path = save(tmp_path, sd)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "kohya layout, 89 modules" in out
    assert sorted(line.split() for line in out.splitlines() if line.strip().startswith(("unet", "text_encoder"))) == [
        ["text_encoder", "6", "lora", "(6)", "2", "(6)", "2", "(6)"], ["unet", "83", "lora", "(83)", "3", "(83)", "1",
                                                                       "(83)"]]
    want = run_unet(li.load_adapter(unet(), path))
    base = ["--base", str(tmp_path / "unet")]
    for to, name in (("peft", "peft"), ("lora_inject", "ours"), ("kohya", "again.safetensors")):
        assert main(["convert", path, str(tmp_path / name), "--to", to, *base]) == 0
        torch.testing.assert_close(run_unet(li.load_adapter(unet(), tmp_path / name)), want, rtol=0, atol=0)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.safetensors"), "--to", "kohya"]) == 0
    torch.testing.assert_close(run_unet(li.load_adapter(unet(), tmp_path / "back.safetensors")), want, rtol=0, atol=0)
    assert main(["convert", path, str(tmp_path / "x"), "--to", "peft"]) == 2  # no --base to name the modules
    assert "needs --base" in capsys.readouterr().err
