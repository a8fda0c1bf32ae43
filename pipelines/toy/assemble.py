"""Assemble the toy teachers' untrained pipeline folders from the trained VAE and CLIP.

scripts/distill.py trains a teacher the way it fine-tunes any backbone: it
loads a diffusers pipeline folder and trains its denoiser. So the build
writes, for each teacher, a folder holding a freshly initialised denoiser and
the finished parts it will keep: the toy VAE, the CLIP text tower, the
tokenizer and the scheduler.

- `teacher_init`: StableDiffusionPipeline; UNet2DConditionModel on the
  latent grid, cross-attending to the CLIP text tower's last hidden state,
  epsilon prediction, SD's scaled-linear DDPM betas (0.00085..0.012, 1000
  steps), sampled with DDIM on "trailing" timesteps (arXiv 2305.08891: the
  leading grid of SD's config never visits t=999, which matters at 1-2 steps).
- `teacher_flow_init`: StableDiffusion3Pipeline; SD3Transformer2DModel with
  FlowMatchEulerDiscreteScheduler. Both CLIP slots hold the same
  CLIPTextModelWithProjection (SD3 concatenates their penultimate states and
  their pooled projections). There is no real T5: when T5 is dropped, SD3
  feeds zeros in its place, but diffusers 0.42 refuses to load a folder whose
  text_encoder_3 is None unless the caller passes text_encoder_3=None. So the
  T5 slot holds `null_t5`, a one-layer T5 encoder whose final norm has zero
  weight: its output is exactly the zeros SD3 would use, and a plain
  `DiffusionPipeline.from_pretrained(folder)` works.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@dataclass(frozen=True)
class UNetSpec:
    channels: tuple[int, ...] = (32, 64, 64)
    # Cross-attention per level; the full-resolution level skips it (attention there costs the most).
    attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    heads: int = 4          # diffusers' `attention_head_dim` of UNet2DConditionModel is the head count
    norm_groups: int = 8


@dataclass(frozen=True)
class FlowSpec:
    layers: int = 3
    heads: int = 4
    head_dim: int = 16
    patch: int = 1
    shift: float = 1.0      # sampling-grid shift of FlowMatchEulerDiscreteScheduler


def text_tower(clip: CLIPModel, with_projection: bool) -> torch.nn.Module:
    """The CLIPModel's text tower as a stand-alone CLIPTextModel(WithProjection), weights copied."""
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    config = clip.config.text_config
    config.projection_dim = clip.config.projection_dim
    tower = cls(config)
    # transformers 5 flattened CLIPTextModel (no `text_model` wrapper); older versions nest it
    inner = getattr(tower, "text_model", tower)
    inner.load_state_dict(clip.text_model.state_dict(), strict=False)
    if with_projection:
        tower.text_projection.load_state_dict(clip.text_projection.state_dict())
    for name, value in clip.text_model.state_dict().items():
        if not torch.equal(inner.state_dict()[name], value):
            raise RuntimeError(f"text tower weight {name} was not copied from the CLIPModel")
    return tower.eval()


def null_t5(width: int):
    """(T5EncoderModel, tokenizer) whose output is exactly zero: SD3's stand-in for a dropped T5 (see module doc)."""
    from pipelines.tiny import t5_tokenizer

    tokenizer = t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=4, d_ff=4, num_layers=1, num_heads=1,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = T5EncoderModel(config)
    with torch.no_grad():
        encoder.encoder.final_layer_norm.weight.zero_()  # output = weight * normalised states = 0
    return encoder.eval(), tokenizer


def build_unet(spec: UNetSpec, latent_size: int, latent_channels: int, text_dim: int, seed: int = 0):
    if len(spec.attention) != len(spec.channels):
        raise ValueError(f"UNetSpec.attention {spec.attention} needs one flag per level of {spec.channels}")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=spec.channels, layers_per_block=spec.layers_per_block, down_block_types=down,
            up_block_types=up, cross_attention_dim=text_dim,
            attention_head_dim=spec.heads, norm_num_groups=spec.norm_groups,
        )


def build_flow_transformer(spec: FlowSpec, latent_size: int, latent_channels: int, text_dim: int,
                           projection_dim: int, seed: int = 0) -> SD3Transformer2DModel:
    width = spec.heads * spec.head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(
            sample_size=latent_size, patch_size=spec.patch, in_channels=latent_channels,
            out_channels=latent_channels, num_layers=spec.layers, attention_head_dim=spec.head_dim,
            num_attention_heads=spec.heads, joint_attention_dim=2 * text_dim, caption_projection_dim=width,
            pooled_projection_dim=2 * projection_dim, pos_embed_max_size=latent_size // spec.patch,
        )


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD_BETAS, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=0, timestep_spacing="trailing")


def _latent_grid(vae: AutoencoderKL) -> tuple[int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.sample_size // factor, vae.config.latent_channels


def save_teacher_init(folder: str | Path, vae: AutoencoderKL, clip: CLIPModel, tokenizer: CLIPTokenizer,
                      spec: UNetSpec, seed: int = 0) -> Path:
    """StableDiffusionPipeline folder with a random UNet (what configs/toy/teacher_sft.yaml trains)."""
    size, channels = _latent_grid(vae)
    unet = build_unet(spec, size, channels, clip.config.text_config.hidden_size, seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_tower(clip, False), tokenizer=tokenizer, unet=unet,
                                   scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_flow_teacher_init(folder: str | Path, vae: AutoencoderKL, clip: CLIPModel, tokenizer: CLIPTokenizer,
                           spec: FlowSpec, seed: int = 0) -> Path:
    """StableDiffusion3Pipeline folder (no T5) with a random SD3 transformer (configs/toy/teacher_flow_sft.yaml)."""
    size, channels = _latent_grid(vae)
    transformer = build_flow_transformer(spec, size, channels, clip.config.text_config.hidden_size,
                                         clip.config.projection_dim, seed)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.shift), vae=vae,
        text_encoder=text_tower(clip, True), tokenizer=tokenizer, text_encoder_2=text_tower(clip, True),
        tokenizer_2=tokenizer, **dict(zip(("text_encoder_3", "tokenizer_3"), null_t5(transformer.config.joint_attention_dim))),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
