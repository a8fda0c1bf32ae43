"""Real-size denoiser architectures with random weights, for benchmarks (nothing downloads).

The denoiser is built at the published size (SD1.5 UNet 0.86B, SDXL UNet 2.6B,
a Sana-style 0.6B DiT); the text encoder keeps the published hidden size but
has one layer, and the VAE keeps the published downsampling factor with few
channels. Frozen text encoders and VAEs cost little next to the denoiser's
forward and backward, and real runs cache their outputs anyway; the benchmark
reports what the trained network costs.
"""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel,
    StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pipelines.tiny import _SD_BETAS, _clip_config, _gemma2, _vae_dc, clip_tokenizer, gemma_tokenizer

SIZES = ("sd15", "sdxl", "dit600m")


def _vae(scaling_factor: float) -> AutoencoderKL:
    # Four levels: the 8x spatial factor of the SD VAEs, at a fraction of their channels.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, scaling_factor=scaling_factor,
    )


def _one_layer_clip(tokenizer, hidden: int, projection: bool):
    config = _clip_config(tokenizer, hidden)
    config.num_hidden_layers, config.num_attention_heads, config.intermediate_size = 1, 8, hidden
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _sd15() -> StableDiffusionPipeline:
    tokenizer = clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(0.18215), text_encoder=_one_layer_clip(tokenizer, 768, False), tokenizer=tokenizer,
        unet=UNet2DConditionModel(cross_attention_dim=768, sample_size=64),
        scheduler=DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl() -> StableDiffusionXLPipeline:
    tok, tok_2 = clip_tokenizer(), clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025), text_encoder=_one_layer_clip(tok, 768, False),
        text_encoder_2=_one_layer_clip(tok_2, 1280, True), tokenizer=tok, tokenizer_2=tok_2, unet=unet,
        scheduler=DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _dit600m() -> SanaPipeline:
    tokenizer = gemma_tokenizer()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=36, attention_head_dim=32, num_layers=28,
        num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
        caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
    )
    return SanaPipeline(tokenizer=tokenizer, text_encoder=_gemma2(tokenizer, 2304), vae=_vae_dc(),
                        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


_BUILDERS = {"sd15": _sd15, "sdxl": _sdxl, "dit600m": _dit600m}


def sized_pipeline(size: str, *, seed: int = 0):
    if size not in _BUILDERS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _BUILDERS[size]()
