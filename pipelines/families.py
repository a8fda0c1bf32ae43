"""What differs between backbone families, one small table entry per family.

A family is the set of diffusers pipelines that share a denoiser call
signature and a text-conditioning recipe: SD1.x/2.x, SDXL, SD3, Sana and
PixArt-alpha/sigma. Each entry says which pipeline classes belong to it, what
the denoiser component is called, which text encoders and tokenizers it has,
how to turn prompts into the denoiser's keyword tensors, and which extra
keywords the denoiser call needs.

Prompts are encoded through the pipeline's own `encode_prompt` with the
defaults of its `__call__` (max sequence lengths, Sana's complex human
instruction, SDXL's zeroed empty prompt). That way a student trained on this
conditioning sees exactly what plain diffusers feeds it at inference; a
re-implementation would drift on details like those.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

Encoder = Callable[..., dict]


@dataclass(frozen=True)
class Family:
    """One backbone family (see module docstring)."""

    name: str
    pipeline_classes: tuple[str, ...]
    denoiser_name: str                      # component name in the pipeline: "unet" | "transformer"
    text_encoder_names: tuple[str, ...]
    tokenizer_names: tuple[str, ...]
    # encode(pipe, prompts, *, negative, device, image_size) -> denoiser keyword tensors
    encode: Encoder
    # extra_kwargs(denoiser, x_t, vae_scale_factor) -> keywords computed from x_t at call time
    extra_kwargs: Callable[[torch.nn.Module, torch.Tensor, int], dict] = lambda denoiser, x_t, scale: {}
    # keyword overrides for DiffusionPipeline.from_pretrained (skip parts a trainer never uses)
    load_kwargs: dict = field(default_factory=dict)


def call_default(pipe, name: str):
    """The default of `pipe.__call__`'s argument `name`: what plain inference uses."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


def default_image_size(pipe) -> tuple[int, int]:
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    size = denoiser.config.sample_size * pipe.vae_scale_factor
    return (size, size)


# ------------------------------------------------------------------ encoders
# Each calls the pipeline's encode_prompt once. With negative=True it asks for
# classifier-free guidance with no negative prompt and keeps the negative half:
# that is the unconditional branch plain diffusers builds by default.


def _encode_sd(pipe, prompts, *, negative, device, image_size):
    pos, neg = pipe.encode_prompt(prompts, device, 1, negative)
    return {"encoder_hidden_states": neg if negative else pos}


def _encode_sdxl(pipe, prompts, *, negative, device, image_size):
    # Penultimate CLIP-L and CLIP-G states concatenated; pooled from CLIP-G; an empty
    # negative is all zeros when the pipeline says force_zeros_for_empty_prompt.
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=negative)
    states, pooled = (neg, neg_pooled) if negative else (pos, pooled)
    height, width = image_size or default_image_size(pipe)
    # SDXL micro-conditioning (arXiv:2307.01952 sec. 2.2): original size, crop top-left, target size.
    time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=states.dtype, device=states.device)
    time_ids = time_ids.expand(len(prompts), -1).clone()
    return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def _encode_sd3(pipe, prompts, *, negative, device, image_size):
    # With text_encoder_3=None the pipeline substitutes zeros for the T5 tokens.
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompts, None, None, device=device, do_classifier_free_guidance=negative,
        max_sequence_length=call_default(pipe, "max_sequence_length"),
    )
    states, pooled = (neg, neg_pooled) if negative else (pos, pooled)
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


def _encode_masked(pipe, prompts, *, negative, device, image_size, **options):
    pos, mask, neg, neg_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=negative, device=device, clean_caption=False,
        max_sequence_length=call_default(pipe, "max_sequence_length"), **options,
    )
    states, mask = (neg, neg_mask) if negative else (pos, mask)
    return {"encoder_hidden_states": states, "encoder_attention_mask": mask}


def _encode_sana(pipe, prompts, *, negative, device, image_size):
    # Sana prefixes conditional prompts with its "complex human instruction" (never the negative).
    chi = call_default(pipe, "complex_human_instruction")
    return _encode_masked(pipe, prompts, negative=negative, device=device, image_size=image_size,
                          complex_human_instruction=chi)


def _pixart_resolution(denoiser, x_t, vae_scale_factor):
    # PixArt-alpha 1024 models condition on the generated size and aspect ratio; the
    # pipeline passes the (binned) output size, which is the latent size times the VAE factor.
    if not getattr(denoiser, "use_additional_conditions", False):
        return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    height, width = x_t.shape[-2] * vae_scale_factor, x_t.shape[-1] * vae_scale_factor
    batch = x_t.shape[0]
    resolution = torch.tensor([height, width], dtype=x_t.dtype, device=x_t.device).expand(batch, -1)
    aspect = torch.full((batch, 1), height / width, dtype=x_t.dtype, device=x_t.device)
    return {"added_cond_kwargs": {"resolution": resolution, "aspect_ratio": aspect}}


FAMILIES: dict[str, Family] = {
    "sd": Family(
        "sd", ("StableDiffusionPipeline",), "unet", ("text_encoder",), ("tokenizer",), _encode_sd,
        load_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    ),
    "sdxl": Family(
        "sdxl", ("StableDiffusionXLPipeline",), "unet", ("text_encoder", "text_encoder_2"),
        ("tokenizer", "tokenizer_2"), _encode_sdxl,
    ),
    "sd3": Family(
        "sd3", ("StableDiffusion3Pipeline",), "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"),
        ("tokenizer", "tokenizer_2", "tokenizer_3"), _encode_sd3,
    ),
    "sana": Family("sana", ("SanaPipeline",), "transformer", ("text_encoder",), ("tokenizer",), _encode_sana),
    "pixart": Family(
        "pixart", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "transformer", ("text_encoder",), ("tokenizer",),
        _encode_masked, extra_kwargs=_pixart_resolution,
    ),
}

# model_index.json `_class_name` -> family name
PIPELINE_FAMILIES: dict[str, str] = {cls: fam.name for fam in FAMILIES.values() for cls in fam.pipeline_classes}


def family_of(pipeline_class: str, where: str) -> Family:
    """The family of a pipeline class name; a one-line error naming what is supported otherwise."""
    if pipeline_class not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{where}: unsupported pipeline class {pipeline_class!r}; supported: {', '.join(PIPELINE_FAMILIES)}"
        )
    return FAMILIES[PIPELINE_FAMILIES[pipeline_class]]
