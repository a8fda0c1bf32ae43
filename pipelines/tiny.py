"""Tiny random-weight pipelines of every supported family, built from config in code.

Tests across the suite (and smoke benchmarks) need a real diffusers pipeline of
each family - same classes, same call signatures, same folder layout - without
downloading anything. These builders make one with 1-2 blocks and 8-64
channels: a 32x32 image is 8x8 (VAE) or 16x16 (AutoencoderDC) latents, and a
forward pass takes milliseconds on a CPU. Tokenizers are built from a
character-level vocabulary written here, so nothing needs the hub.

    bundle = tiny_bundle("sdxl")                    # in memory
    save_tiny_pipeline("sd3", folder)               # DiffusionPipeline.from_pretrained(folder) works offline

The weights are random: outputs are noise, but shapes, dtypes, configs and
serialisation are those of the real families.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from pipelines.backbones import Bundle, bundle_from_pipeline

TINY_FAMILIES = ("sd", "sdxl", "sd3", "sana", "pixart")

# Printable ASCII without whitespace: every prompt tokenizes to characters.
_CHARS = list(string.printable[:94])
_CLIP_DIM = 32
_TEXT_LEN = 77  # CLIP's position count; pipelines pad CLIP prompts to the tokenizer's length


# ---------------------------------------------------------------- tokenizers


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: one token per character (word-final ones carry </w>)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_TEXT_LEN)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram over characters and word-initial characters, T5's special ids 0-2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def gemma_tokenizer() -> GemmaTokenizer:
    """Character BPE with Gemma's specials and byte fallback tokens."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=8192)


# ------------------------------------------------------------- text encoders


def _clip_config(tokenizer: CLIPTokenizer, hidden: int = _CLIP_DIM) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=_TEXT_LEN, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def _t5(tokenizer: T5Tokenizer, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _gemma2(tokenizer: GemmaTokenizer, hidden: int) -> Gemma2Model:
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=8192,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma2Model(config)


# ---------------------------------------------------------------- autoencoders


def _vae_kl(latent_channels: int, scaling_factor: float, shift_factor: float | None = None) -> AutoencoderKL:
    # Three levels compress 4x (real VAEs: 8x, one more level): 32px images -> 8x8 latents.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _vae_dc() -> AutoencoderDC:
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate", downsample_block_type="conv", scaling_factor=0.41407,
    )


# ------------------------------------------------------------------ families

# Stable Diffusion's scaled-linear DDPM betas, shared by SD1.x/2.x/XL.
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _unet(cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16, **extra,
    )


def _sd() -> DiffusionPipeline:
    tokenizer = clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae_kl(4, 0.18215), text_encoder=CLIPTextModel(_clip_config(tokenizer)), tokenizer=tokenizer,
        unet=_unet(_CLIP_DIM),
        scheduler=DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sd2() -> DiffusionPipeline:
    """SD 2.x layout: SD's pipeline class with linear-projection attention and a v-prediction scheduler."""
    tokenizer = clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae_kl(4, 0.18215), text_encoder=CLIPTextModel(_clip_config(tokenizer)), tokenizer=tokenizer,
        unet=_unet(_CLIP_DIM, use_linear_projection=True),
        scheduler=DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl() -> DiffusionPipeline:
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    time_dim = 8
    unet = _unet(
        2 * _CLIP_DIM, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + _CLIP_DIM, use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_vae_kl(4, 0.13025), text_encoder=CLIPTextModel(_clip_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer_2)), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _sd3(with_t5: bool = True) -> DiffusionPipeline:
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    joint_dim = 2 * _CLIP_DIM  # CLIP-L and CLIP-G states are concatenated, then padded to T5's width
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=joint_dim, caption_projection_dim=32,
        pooled_projection_dim=2 * _CLIP_DIM, pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(16, 1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer_2)), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3, joint_dim) if with_t5 else None,
        tokenizer_3=tokenizer_3 if with_t5 else None,
    )


def _sana() -> DiffusionPipeline:
    tokenizer = gemma_tokenizer()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=16, patch_size=2,
    )
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
    )
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=_gemma2(tokenizer, 16), vae=_vae_dc(), transformer=transformer,
        scheduler=scheduler,
    )


def _pixart() -> DiffusionPipeline:
    tokenizer = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
        activation_fn="gelu-approximate", use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=_t5(tokenizer, 32), vae=_vae_kl(4, 0.13025), transformer=transformer,
        scheduler=scheduler,
    )


_BUILDERS = {"sd": _sd, "sd2": _sd2, "sdxl": _sdxl, "sd3": _sd3, "sd3-no-t5": lambda: _sd3(with_t5=False),
             "sana": _sana, "pixart": _pixart}


def tiny_pipeline(family: str, *, seed: int = 0) -> DiffusionPipeline:
    """A diffusers pipeline of `family` with tiny random weights (deterministic in `seed`).

    `family` is one of TINY_FAMILIES, "sd2" (SD 2.x: v-prediction) or "sd3-no-t5" (SD3 saved with
    text_encoder_3=None).
    """
    if family not in _BUILDERS:
        raise ValueError(f"no tiny pipeline for family {family!r}; choose one of {sorted(_BUILDERS)}")
    # Module init draws from the global RNG; fork it so building never disturbs the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_bundle(family: str, *, seed: int = 0) -> Bundle:
    """A Bundle around `tiny_pipeline(family, seed=seed)` (float32, CPU, SDPA attention)."""
    return bundle_from_pipeline(tiny_pipeline(family, seed=seed), source=f"tiny:{family}")


def save_tiny_pipeline(family: str, folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny pipeline of `family` as a diffusers folder (safetensors); returns the folder."""
    folder = Path(folder)
    tiny_pipeline(family, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder
