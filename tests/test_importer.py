"""Importing the SVG release (shiml20/SVG): every released tensor lands where it should, the
imported models compute what the reference computes, and anything unmapped is refused by name.

The released files are not available offline, so the tests write files with the released key
layout. That layout is stated here independently of our modules, from reading the reference code:
LDM's Decoder (autoencoder/ldm/modules/diffusionmodules/model.py), torchvision's VisionTransformer
as built by create_small_vit_s (autoencoder/ldm/models/dino_decoder.py), Meta's DINOv3
(facebookresearch/dinov3: models/vision_transformer.py, layers/) and the DiT of
models/models_SVG.py. Weights are random (no pretrained weights exist here).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer

from svg_ray.checkpoint import CheckpointError, load_autoencoder, load_bundle, load_dit
from svg_ray.config import ConfigError
from svg_ray.importer import (
    ImportConfig,
    autoencoder_from_state,
    dino_to_timm,
    dit_from_state,
    import_autoencoder,
    import_dit,
    run_import,
)
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
from svg_ray.models.dit import dit_config
from svg_ray.models.residual import channel_stats

Layout = dict[str, tuple[int, ...]]

# --------------------------------------------------------------------------------------------
# The released layouts, from reading the reference code
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AESizes:
    """The numbers that shape a released DinoDecoder state dict."""

    resolution: int
    dino_dim: int
    dino_mlp: int
    dino_swiglu: bool
    dino_qv_bias: bool  # False: the q/v biases are zero (the S+ release; timm arch without bias)
    res_depth: int
    res_heads: int
    res_width: int
    res_mlp: int
    dec_ch: int
    dec_mult: tuple[int, ...]
    dec_res_blocks: int
    dino_depth: int = 12
    dino_head_dim: int = 64
    res_out: int = 8


# autoencoder/configs/example_svg_autoencoder_vitsp.yaml + dinov3 hub dinov3_vits16plus.
RELEASED = AESizes(256, 384, 1536, True, False, 6, 8, 384, 1536, 128, (1, 1, 2, 2, 4), 2)
# Our 'debug' preset (timm vit_tiny_patch16_dinov3_qkvb: plain MLP, q/v biases).
DEBUG = AESizes(64, 192, 768, False, True, 2, 4, 128, 256, 32, (1, 1, 2, 2, 2), 0)


def meta_dinov3_layout(s: AESizes) -> Layout:
    """Meta's DINOv3 ViT state dict: storage tokens, masked-k qkv bias, LayerScale, SwiGLU w1-3."""
    d, h = s.dino_dim, s.dino_mlp
    lay: Layout = {
        "cls_token": (1, 1, d),
        "storage_tokens": (1, 4, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "rope_embed.periods": (s.dino_head_dim // 4,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    swiglu = {"w1": (h, d), "w2": (h, d), "w3": (d, h)}
    mlp = swiglu if s.dino_swiglu else {"fc1": (h, d), "fc2": (d, h)}
    for i in range(s.dino_depth):
        p = f"blocks.{i}."
        vectors = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias")
        lay.update({p + n: (d,) for n in (*vectors, "ls1.gamma", "ls2.gamma")})
        lay[p + "attn.qkv.weight"] = (3 * d, d)
        lay[p + "attn.qkv.bias"] = (3 * d,)
        lay[p + "attn.qkv.bias_mask"] = (3 * d,)
        lay[p + "attn.proj.weight"] = (d, d)
        for name, shape in mlp.items():
            lay[f"{p}mlp.{name}.weight"] = shape
            lay[f"{p}mlp.{name}.bias"] = (shape[0],)
    return lay


def residual_layout(s: AESizes) -> Layout:
    """create_small_vit_s: torchvision's VisionTransformer with a Linear-GELU-Linear head."""
    with torch.device("meta"):
        vit = VisionTransformer(
            image_size=s.resolution,
            patch_size=16,
            num_layers=s.res_depth,
            num_heads=s.res_heads,
            hidden_dim=s.res_width,
            mlp_dim=s.res_mlp,
            num_classes=s.res_out,
        )
        w = s.res_width
        vit.heads = torch.nn.Sequential(
            torch.nn.Linear(w, w), torch.nn.GELU(), torch.nn.Linear(w, s.res_out)
        )
    return {k: tuple(v.shape) for k, v in vit.state_dict().items()}


def ldm_decoder_layout(s: AESizes, z_channels: int, attn_res: tuple[int, ...] = (16,)) -> Layout:
    """LDM's Decoder without timestep embedding (temb_ch = 0): no temb_proj in its blocks."""
    lay: Layout = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        lay[name + ".weight"], lay[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name: str, c: int) -> None:
        lay[name + ".weight"], lay[name + ".bias"] = (c,), (c,)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def attn(name: str, c: int) -> None:
        norm(name + ".norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    n = len(s.dec_mult)
    block_in = s.dec_ch * s.dec_mult[-1]
    curr = s.resolution // 2 ** (n - 1)
    conv("conv_in", z_channels, block_in, 3)
    resnet("mid.block_1", block_in, block_in)
    attn("mid.attn_1", block_in)
    resnet("mid.block_2", block_in, block_in)
    for level in reversed(range(n)):
        block_out = s.dec_ch * s.dec_mult[level]
        for j in range(s.dec_res_blocks + 1):
            resnet(f"up.{level}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr in attn_res:
                attn(f"up.{level}.attn.{j}", block_in)
        if level != 0:
            conv(f"up.{level}.upsample.conv", block_in, block_in, 3)
            curr *= 2
    norm("norm_out", block_in)
    conv("conv_out", block_in, 3, 3)
    return lay


# A few tensors of the training loss (LPIPS, PatchGAN, logvar): the importer must drop them.
LOSS_LAYOUT: Layout = {
    "loss.logvar": (),
    "loss.perceptual_loss.scaling_layer.shift": (1, 3, 1, 1),
    "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
    "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1),
    "loss.discriminator.main.0.weight": (64, 3, 4, 4),
    "loss.discriminator.main.3.running_mean": (256,),
    "loss.discriminator.main.3.num_batches_tracked": (),
}


def released_ae_layout(s: AESizes) -> Layout:
    """The whole ``state_dict`` of a released DinoDecoder (Lightning checkpoint)."""
    z = s.dino_dim + s.res_out
    lay = {f"encoder.{k}": v for k, v in meta_dinov3_layout(s).items()}
    lay.update({f"extra_vit.{k}": v for k, v in residual_layout(s).items()})
    lay.update({f"decoder.{k}": v for k, v in ldm_decoder_layout(s, z).items()})
    lay.update({"mask_token": (1, s.res_out, 1), "norm_vit.weight": (z,), "norm_vit.bias": (z,)})
    lay.update(LOSS_LAYOUT)
    return lay


def released_dit_layout(depth: int, width: int, heads: int, in_ch: int = 392) -> Layout:
    """models_SVG.DiT(patch_size=1, qk_norm=True, learn_sigma=True, 1000 classes, 256 tokens)."""
    hd, mlp = width // heads, 4 * width
    lay: Layout = {
        "pos_embed": (1, 256, width),
        "ln1.weight": (width, in_ch),
        "ln1.bias": (width,),
        "t_embedder.mlp.0.weight": (width, 256),
        "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width),
        "t_embedder.mlp.2.bias": (width,),
        "y_embedder.embedding_table.weight": (1001, width),
        "final_layer.linear.weight": (2 * in_ch, width),
        "final_layer.linear.bias": (2 * in_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * width, width),
        "final_layer.adaLN_modulation.1.bias": (2 * width,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        for name, out, inp in (
            ("attn.qkv", 3 * width, width),
            ("attn.proj", width, width),
            ("mlp.fc1", mlp, width),
            ("mlp.fc2", width, mlp),
            ("adaLN_modulation.1", 6 * width, width),
        ):
            lay[f"{p}{name}.weight"], lay[f"{p}{name}.bias"] = (out, inp), (out,)
        for name in ("q_norm", "k_norm"):
            lay[f"{p}attn.{name}.weight"], lay[f"{p}attn.{name}.bias"] = (hd,), (hd,)
    return lay


def fill(layout: Layout, seed: int, s: AESizes | None = None) -> dict[str, torch.Tensor]:
    """Random tensors for a layout; DINO buffers get the values Meta's init gives them."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in layout.items()}
    for k in sd:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("rope_embed.periods"):
            # RopePositionEmbedding._init_weights (base 100) in bfloat16, Meta's training dtype;
            # torch.hub copies them into an fp32 buffer, so the SVG release holds fp32 tensors
            # with bf16-rounded values (1.3359 where fp32 gives 1.3335).
            n = layout[k][0]
            sd[k] = (100.0 ** (2 * torch.arange(n, dtype=torch.bfloat16) / (2 * n))).float()
        elif k.endswith("qkv.bias_mask"):  # init_weights_vit: 1, 0 on the k third, 1
            d = layout[k][0] // 3
            sd[k] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        elif k.endswith("qkv.bias") and s is not None and not s.dino_qv_bias:
            d = layout[k][0] // 3
            sd[k][:d] = 0  # q and v biases are all zero in the S+ release (timm: "bias but 0")
            sd[k][2 * d :] = 0
    return sd


def expected_state(released: dict[str, torch.Tensor], s: AESizes) -> dict[str, torch.Tensor]:
    """Where each released tensor must land in our SVGAutoencoder (timm names for DINO)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in released.items():
        if k.startswith(("loss.", "norm_vit.")):
            continue
        if not k.startswith("encoder."):
            out[k] = v
            continue
        k = k[len("encoder.") :]
        if k in ("mask_token", "rope_embed.periods") or k.endswith("bias_mask"):
            continue
        if k.endswith("attn.qkv.bias"):
            if s.dino_qv_bias:  # masked: the k third is not used
                q, _, vb = v.chunk(3)
                out["encoder.model." + k.replace("qkv.bias", "q_bias")] = q
                out["encoder.model." + k.replace("qkv.bias", "v_bias")] = vb
            continue
        for a, b in (
            ("storage_tokens", "reg_token"),
            ("ls1.gamma", "gamma_1"),
            ("ls2.gamma", "gamma_2"),
            ("mlp.w1.", "mlp.fc1_g."),
            ("mlp.w2.", "mlp.fc1_x."),
            ("mlp.w3.", "mlp.fc2."),
        ):
            k = k.replace(a, b)
        out["encoder.model." + k] = v
    return out


def assert_landed(ae: SVGAutoencoder, released: dict[str, torch.Tensor], s: AESizes) -> None:
    """Every expected tensor is in the model with its exact value; nothing else was loaded."""
    own = ae.state_dict()
    want = expected_state(released, s)
    generated = {"align.running_stats", "align.num_batches_tracked", "img_mean", "img_std"}
    assert set(own) == set(want) | generated
    for k, v in want.items():
        assert torch.equal(own[k], v.to(own[k].dtype)), k


def write_lightning_ckpt(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """A PyTorch Lightning 2.x-style checkpoint around ``sd`` (primitives and tensors only)."""
    torch.save(
        {
            "epoch": 40,
            "global_step": 123,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": sd,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 41}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val/rec_loss'}": {"best_model_path": "x"}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []}],
            "lr_schedulers": [],
        },
        path,
    )
    return path


def debug_release(tmp_path: Path, seed: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = fill(released_ae_layout(DEBUG), seed, DEBUG)
    return write_lightning_ckpt(tmp_path / f"ae{seed}.ckpt", sd), sd


def images(n: int = 3, res: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(5)) * 2 - 1


# --------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------


def test_autoencoder_every_released_tensor_lands_in_place(tmp_path: Path) -> None:
    path, sd = debug_release(tmp_path)
    ae, report = import_autoencoder(str(path), ae_preset("debug"))
    assert_landed(ae, sd, DEBUG)
    assert ae.cfg.residual.align == "batch" and not ae.training
    dropped = set(report.dropped)
    assert set(LOSS_LAYOUT) | {"norm_vit.weight", "norm_vit.bias"} <= dropped
    assert {"encoder.mask_token", "encoder.rope_embed.periods"} <= dropped
    assert "encoder.blocks.0.attn.qkv.bias_mask" in dropped
    assert report.mapped + len(report.dropped) == len(sd)
    assert report.entry == "state_dict" and len(report.sha256) == 64


def test_autoencoder_outputs_follow_the_imported_weights(tmp_path: Path) -> None:
    """Two releases give different outputs, each equal to a reference model given the weights
    at the places the reference code puts them; latents use the reference's batch alignment."""
    x = images()
    outs = []
    for seed in (1, 2):
        path, sd = debug_release(tmp_path, seed)
        ae, _ = import_autoencoder(str(path), ae_preset("debug"))
        ref = SVGAutoencoder(ae_preset("debug"), load_dino_weights=False)
        ref.align.mode = "batch"
        own = ref.state_dict()
        ref.load_state_dict({**own, **expected_state(sd, DEBUG)}, strict=True)
        ref.eval()
        with torch.no_grad():
            z, z_ref = ae.encode(x), ref.encode(x)
            rec = ae.decode(z)
            torch.testing.assert_close(z, z_ref)
            torch.testing.assert_close(rec, ref.decode(z_ref))
            # Reference alignment (match_distribution): residual scalars rescaled to DINO's.
            dino = ae.encoder(ae.normalize(x)).transpose(1, 2)  # (B, C_d, N)
            res = ae.extra_vit(ae.normalize(x))  # (B, C_r, N)
            md, sd_ = dino.mean(dim=(0, 2)).mean(), dino.std(dim=(0, 2)).mean()
            mr, sr = res.mean(dim=(0, 2)).mean(), res.std(dim=(0, 2)).mean()
            aligned = (res - mr) / (sr + 1e-6) * sd_ + md
            torch.testing.assert_close(z.flatten(2)[:, dino.shape[1] :], aligned)
            torch.testing.assert_close(z.flatten(2)[:, : dino.shape[1]], dino)
            m_al, _ = channel_stats(aligned)
            torch.testing.assert_close(m_al, md, atol=1e-5, rtol=0)
        outs.append(rec)
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        ("extra_vit.heads.2.bias", "extra_vit.heads.2.bias"),
        ("decoder.up.1.block.0.conv2.bias", "decoder.up.1.block.0.conv2.bias"),
        ("mask_token", "mask_token"),
        ("encoder.norm.weight", "encoder.model.norm.weight"),  # reported in timm's names
    ],
)
def test_autoencoder_missing_key_is_refused(tmp_path: Path, drop: str, named: str) -> None:
    sd = fill(released_ae_layout(DEBUG), 1, DEBUG)
    del sd[drop]
    path = write_lightning_ckpt(tmp_path / "ae.ckpt", sd)
    with pytest.raises(CheckpointError, match=r"1 missing \['" + re.escape(named)):
        import_autoencoder(str(path), ae_preset("debug"))


@pytest.mark.parametrize(
    ("extra", "shape"),
    [
        ("decoder.up.0.block.0.temb_proj.weight", (32, 512)),  # LDM with a timestep embedding
        ("loss.extra_head.weight", (4,)),  # a loss tensor the drop list does not name
        ("colorize", (3, 5, 1, 1)),
        ("encoder.local_cls_norm.weight", (192,)),  # timm's converter would skip it silently
        ("encoder.cls_norm.weight", (192,)),
        ("align.running_stats", (4,)),  # ours, never in a release
    ],
)
def test_autoencoder_unexpected_key_is_refused(
    tmp_path: Path, extra: str, shape: tuple[int, ...]
) -> None:
    sd = fill(released_ae_layout(DEBUG), 1, DEBUG)
    sd[extra] = torch.zeros(shape)
    path = write_lightning_ckpt(tmp_path / "ae.ckpt", sd)
    name = extra.removeprefix("encoder.")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        import_autoencoder(str(path), ae_preset("debug"))


def test_autoencoder_of_another_size_is_refused_by_its_shapes(tmp_path: Path) -> None:
    path, _ = debug_release(tmp_path)
    with pytest.raises(CheckpointError, match=r"DINO width 192 \(expected 384\)"):
        import_autoencoder(str(path))  # default: the released 'svg' preset


def test_real_released_autoencoder_shapes_map_onto_the_svg_preset() -> None:
    """The full-size release (DINOv3 S+ with SwiGLU and zero q/v bias, ViT-S residual, the
    43M-parameter decoder) fits our 'svg' preset tensor for tensor."""
    sd = fill(released_ae_layout(RELEASED), 3, RELEASED)
    ae, dropped = autoencoder_from_state(sd)
    assert ae.cfg.dino.arch == "dinov3_vits16plus" and ae.cfg.residual.align == "batch"
    assert_landed(ae, sd, RELEASED)
    assert ae.latent_channels == 392
    assert "encoder.blocks.11.attn.qkv.bias" in dropped  # zero q/v, ignored k: nothing lost


def test_nonzero_qv_bias_needs_the_qkvb_arch() -> None:
    import timm

    sd = fill(meta_dinov3_layout(RELEASED), 4, RELEASED)
    model = timm.create_model("vit_small_plus_patch16_dinov3", num_classes=0, img_size=256)
    sd["blocks.3.attn.qkv.bias"][0] = 0.1  # a q bias
    with pytest.raises(CheckpointError, match=r"blocks\.3\.attn\.qkv\.bias.*_qkvb"):
        dino_to_timm(sd, model)
    sd["blocks.3.attn.qkv.bias"][0] = 0.0
    sd["blocks.3.attn.qkv.bias"][400] = 0.1  # the k bias: masked, and softmax ignores it anyway
    out, _ = dino_to_timm(sd, model)
    assert "blocks.3.attn.q_bias" not in out and "blocks.3.attn.qkv.weight" in out
    sd["rope_embed.periods"] = sd["rope_embed.periods"] * 2
    with pytest.raises(CheckpointError, match="periods"):
        dino_to_timm(sd, model)


def test_released_bf16_periods_are_used_and_kept_by_our_checkpoint(tmp_path: Path) -> None:
    """The release's bf16-rounded periods are accepted (not compared at rtol 1e-4 and refused),
    computed with, and rebuilt when our own checkpoint of the import is loaded."""
    from svg_ray.checkpoint import save_autoencoder

    path, sd = debug_release(tmp_path)
    released = sd["encoder.rope_embed.periods"]
    fp32 = 100.0 ** (2 * torch.arange(16, dtype=torch.float32) / 32)
    assert not torch.allclose(released, fp32, rtol=1e-4)  # what the old check refused
    ae, _ = import_autoencoder(str(path), ae_preset("debug"))
    assert torch.equal(ae.encoder.model.rope.periods, released)
    save_autoencoder(ae, str(tmp_path / "ae.safetensors"))
    again = load_autoencoder(str(tmp_path / "ae.safetensors"))
    assert torch.equal(again.encoder.model.rope.periods, released)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(images()), ae.encode(images()), rtol=0, atol=0)
    # fp32 periods in a checkpoint (e.g. a 7B-style export) are used too, and recorded.
    sd["encoder.rope_embed.periods"] = fp32
    ae32, _ = autoencoder_from_state(sd, ae_preset("debug"))
    assert torch.equal(ae32.encoder.model.rope.periods, fp32)
    assert ae32.cfg.dino.rope_periods == "fp32"
    sd["encoder.rope_embed.periods"] = fp32 * 1.01
    with pytest.raises(CheckpointError, match="RoPE periods differ"):
        autoencoder_from_state(sd, ae_preset("debug"))


def test_dino_weights_from_a_separate_file(tmp_path: Path) -> None:
    """Without encoder.* the DINO weights come from --dino-weights; with both they must agree."""
    sd = fill(released_ae_layout(DEBUG), 1, DEBUG)
    dino = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    dino["rope_embed.periods"] = dino["rope_embed.periods"].bfloat16()  # as Meta's .pth has it
    torch.save(dino, tmp_path / "dino.pth")
    no_dino = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    path = write_lightning_ckpt(tmp_path / "ae.ckpt", no_dino)
    with pytest.raises(CheckpointError, match="--dino-weights"):
        import_autoencoder(str(path), ae_preset("debug"))
    ae, _ = import_autoencoder(
        str(path), ae_preset("debug"), dino_weights=str(tmp_path / "dino.pth")
    )
    assert_landed(ae, sd, DEBUG)
    both, _ = debug_release(tmp_path, seed=2)  # its own, different DINO weights
    with pytest.raises(CheckpointError, match="differ from --dino-weights"):
        import_autoencoder(str(both), ae_preset("debug"), dino_weights=str(tmp_path / "dino.pth"))
    same, _ = debug_release(tmp_path, seed=1)  # equal weights; the DINO file's periods in fp32
    dino["rope_embed.periods"] = 100.0 ** (2 * torch.arange(16, dtype=torch.float32) / 32)
    torch.save(dino, tmp_path / "dino32.pth")
    with pytest.raises(CheckpointError, match="RoPE periods that differ from --dino-weights"):
        import_autoencoder(str(same), ae_preset("debug"), dino_weights=str(tmp_path / "dino32.pth"))


def test_files_needing_pickles_are_refused(tmp_path: Path) -> None:
    sd = fill(released_ae_layout(DEBUG), 1, DEBUG)
    path = tmp_path / "ae.ckpt"
    torch.save({"state_dict": sd, "hparams": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*refused"):
        import_autoencoder(str(path), ae_preset("debug"))


# --------------------------------------------------------------------------------------------
# Diffusion transformer
# --------------------------------------------------------------------------------------------


def reference_dit(sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """SVG's DiT forward written from the math of models/models_SVG.py (DiT.forward, DiTBlock,
    FinalLayer, TimestepEmbedder), on the released names; returns all 2C output channels."""

    def lin(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    B, T, _ = x.shape
    W = sd["ln1.weight"].shape[0]
    hd = sd["blocks.0.attn.q_norm.weight"].shape[0]
    H = W // hd
    h = lin(x, "ln1") + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=1)
        qkv = lin(modulate(h, sh1, sc1), p + "attn.qkv").reshape(B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd)
        q = F.layer_norm(q, (hd,), sd[p + "attn.q_norm.weight"], sd[p + "attn.q_norm.bias"])
        k = F.layer_norm(k, (hd,), sd[p + "attn.k_norm.weight"], sd[p + "attn.k_norm.bias"])
        att = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(B, T, W), p + "attn.proj")
        mlp = F.gelu(lin(modulate(h, sh2, sc2), p + "mlp.fc1"), approximate="tanh")
        h = h + g2[:, None] * lin(mlp, p + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    return lin(modulate(h, shift, scale), "final_layer.linear")


def test_dit_imports_ema_weights_and_computes_the_reference_forward(tmp_path: Path) -> None:
    layout = released_dit_layout(2, 64, 4)
    ema, raw = fill(layout, 1), fill(layout, 2)
    path = tmp_path / "0007000.pt"
    torch.save({"ema": ema, "model": raw, "opt": {"state": {}, "param_groups": []}}, path)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 256, 392, generator=g), torch.tensor([0.0, 0.4, 1.0])
    y = torch.tensor([5, 999, 1000])  # 1000: the null class
    outs = {}
    choices: tuple[tuple[Literal["ema", "model"], dict[str, torch.Tensor]], ...] = (
        ("ema", ema),
        ("model", raw),
    )
    for weights, sd in choices:
        dit, report = import_dit(str(path), dit_config("debug"), weights=weights)
        assert report.entry == weights and report.mapped == len(layout)
        own = dit.state_dict()
        assert set(own) == set(layout)
        assert all(torch.equal(own[k], v) for k, v in sd.items())
        with torch.no_grad():
            outs[weights] = dit(x, t, y)
            torch.testing.assert_close(outs[weights], reference_dit(sd, x, t, y)[..., :392])
    assert not torch.allclose(outs["ema"], outs["model"])


def test_dit_wrappers_and_refusals(tmp_path: Path) -> None:
    sd = fill(released_dit_layout(2, 64, 4), 1)
    torch.save(sd, tmp_path / "bare.pt")
    dit, report = import_dit(str(tmp_path / "bare.pt"), dit_config("debug"))
    assert report.entry == "" and torch.equal(dit.ln1.weight, sd["ln1.weight"])
    torch.save({"model": sd}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match=r"\['ema'\].*\['model'\]"):
        import_dit(str(tmp_path / "raw.pt"), dit_config("debug"))
    for change, named in (
        ("blocks.1.attn.k_norm.bias", "blocks.1.attn.k_norm.bias"),  # missing
        ("blocks.0.attn.rope.freqs", "blocks.0.attn.rope.freqs"),  # unexpected
    ):
        bad = dict(sd)
        if change in bad:
            del bad[change]
        else:
            bad[change] = torch.zeros(4)
        torch.save({"ema": bad}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
            import_dit(str(tmp_path / "bad.pt"), dit_config("debug"))
    with pytest.raises(CheckpointError, match=r"depth 2 \(expected 28\).*SVG-XL"):
        import_dit(str(tmp_path / "bare.pt"))  # default: the released SVG-XL


def test_real_svg_xl_key_list_fits_our_dit_at_full_size() -> None:
    """The released SVG-XL names and shapes (675M parameters) checked without allocating them."""
    layout = released_dit_layout(28, 1152, 16)
    with torch.device("meta"):
        sd = {k: torch.empty(shape) for k, shape in layout.items()}
        dit = dit_from_state(sd)
        assert dit.cfg.depth == 28 and dit.cfg.width == 1152 and dit.cfg.heads == 16
        assert set(dit.state_dict()) == set(layout)
        no_qk_norm = {k: v for k, v in sd.items() if "_norm." not in k}  # a qk_norm=False DiT
        with pytest.raises(CheckpointError, match=r"missing \['blocks\.0\.attn\.k_norm\.bias'"):
            dit_from_state(no_qk_norm)
        with pytest.raises(CheckpointError, match=r"depth 28 \(expected 24\)"):
            dit_from_state(sd, dit_config("SVG-L"))


# --------------------------------------------------------------------------------------------
# Written files load through our checkpoint and bundle loaders; the command
# --------------------------------------------------------------------------------------------


def _release_files(tmp_path: Path, dit_in: int) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """Released-layout autoencoder, DiT ({"ema": ...}) and stats files (dinov3_sp_stats.pt)."""
    ae_path, _ = debug_release(tmp_path)
    torch.save({"ema": fill(released_dit_layout(2, 64, 4, in_ch=dit_in), 1)}, tmp_path / "dit.pt")
    g = torch.Generator().manual_seed(0)
    stats = {
        "dinov3_sp_mean": torch.randn(1, 1, 200, generator=g),
        "dinov3_sp_std": torch.rand(1, 1, 200, generator=g) + 0.5,
    }
    torch.save(stats, tmp_path / "stats.pt")
    return ae_path, tmp_path / "dit.pt", tmp_path / "stats.pt", stats


def test_bundle_from_the_release_loads_with_the_bundle_loader(tmp_path: Path) -> None:
    # The debug DINO makes 192 + 8 latent channels: the DiT of the bundle takes 200.
    ae_path, dit_path, stats_path, stats = _release_files(tmp_path, dit_in=200)
    cfg = ImportConfig(
        out=str(tmp_path / "bundle"),
        autoencoder=str(ae_path),
        ae_preset="debug",
        dit=str(dit_path),
        dit_size="debug",
        latent_stats=str(stats_path),
    )
    summary = run_import(cfg)
    assert summary["bundle"] and summary["autoencoder"]["dropped"]
    dit, ae, info = load_bundle(str(tmp_path / "bundle"))
    imported_ae, _ = import_autoencoder(str(ae_path), ae_preset("debug"))
    own = ae.state_dict()
    assert all(torch.equal(own[k], v) for k, v in imported_ae.state_dict().items())
    assert ae.cfg.residual.align == "batch"
    ema = torch.load(dit_path, weights_only=True)["ema"]
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in ema.items())
    np.testing.assert_array_equal(info.latent_stats.mean, stats["dinov3_sp_mean"].reshape(-1))
    np.testing.assert_array_equal(info.latent_stats.std, stats["dinov3_sp_std"].reshape(-1))
    assert info.class_names == [str(i) for i in range(1000)]
    assert info.sampler_defaults["steps"] == 25 and info.sampler_defaults["time_shift"] == 0.15
    assert info.source["dit"]["entry"] == "ema"
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(ae.encode(images())), imported_ae(images()))


def test_command_writes_single_models_and_checks_its_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.import_checkpoint import main

    ae_path, dit_path, stats_path, _ = _release_files(tmp_path, dit_in=392)
    out = tmp_path / "out"
    assert main(["--autoencoder", str(ae_path), "--ae-preset", "debug", "--out", str(out)]) == 0
    ae = load_autoencoder(str(out / "autoencoder.safetensors"))
    assert ae.cfg.residual.align == "batch"
    assert main(["--dit", str(dit_path), "--dit-size", "debug", "--out", str(out)]) == 0
    dit = load_dit(str(out / "dit_ema.safetensors"))
    assert dit.cfg.depth == 2 and dit.cfg.in_channels == 392
    assert "dit_ema.safetensors" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--latent-stats"):
        main(["--autoencoder", str(ae_path), "--dit", str(dit_path), "--out", str(out)])
    with pytest.raises(ConfigError, match="--out"):
        main(["--dit", str(dit_path)])
    with pytest.raises(CheckpointError, match=r"latent channels 392 \(expected 200\)"):
        both = ["--autoencoder", str(ae_path), "--ae-preset", "debug", "--dit", str(dit_path)]
        main([*both, "--dit-size", "debug", "--latent-stats", str(stats_path), "--out", str(out)])
