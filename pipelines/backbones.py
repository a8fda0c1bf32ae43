"""Load a text-to-image backbone as one Bundle: denoiser, VAE, text encoders, schedule.

`load_bundle(source)` takes a Hugging Face hub id, a local diffusers pipeline
folder (one with model_index.json) or an alias from `ALIASES`, detects the
family from model_index.json's `_class_name` (SD1.x/2.x, SDXL, SD3, Sana,
PixArt-alpha/sigma; see `pipelines/families.py`) and returns a `Bundle` whose
methods hide the family: `encode_prompt` gives a `Conditioning`, `predict`
calls any denoiser of that architecture (teacher, student, fake score) with
the right keywords and returns its raw output in `prediction_type`,
`encode_images`/`decode_latents` apply the VAE's scale and shift.

Time `t` is the denoiser's native timestep (see `pipelines/schedules.py`):
[0, 999] for VP models, 1000 * s for flow models.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from pipelines.conditioning import Conditioning
from pipelines.families import FAMILIES, Family, default_image_size, family_of
from pipelines.schedules import FlowSchedule, VPSchedule, schedule_from_scheduler
from pipelines.toy import TOY_FLOW_TEACHER, TOY_TEACHER
from pipelines.wrappers import calling_through, unwrap_model

# Short names -> local pipeline folders: the toy world's shipped teachers.
ALIASES: dict[str, str] = {"toy": str(TOY_TEACHER), "toy-flow": str(TOY_FLOW_TEACHER)}

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(source: str) -> bool:
    """"name" or "org/name" with hub-legal characters (says nothing about whether it exists)."""
    return bool(_HUB_ID.match(source))


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters on the denoiser (arXiv:2106.09685), trained while the base stays frozen."""

    rank: int = 16
    alpha: float | None = None          # scale is alpha / rank; None means alpha = rank
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    init: str | bool = "gaussian"       # peft `init_lora_weights`; B starts at zero either way
    seed: int = 0                       # adapter init is seeded so every process starts identical

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise ValueError("LoraSpec.target_modules is empty; name the linear layers to adapt, e.g. ['to_q']")


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    module = unwrap_model(module)
    return getattr(module, "dtype", None) or next(module.parameters()).dtype


def prediction_type_of(scheduler) -> str:
    """'flow' for flow-matching schedulers, else the scheduler's epsilon/v_prediction/sample."""
    config = scheduler.config
    if (type(scheduler).__name__.startswith("FlowMatch") or config.get("use_flow_sigmas")
            or config.get("prediction_type") == "flow_prediction"):
        return "flow"
    return config.get("prediction_type", "epsilon")


@dataclass
class Bundle:
    """A loaded backbone: its parts, its noise schedule and family-independent calls."""

    family: str
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: object
    schedule: VPSchedule | FlowSchedule
    prediction_type: str
    pipeline_class: str
    source: str
    # The diffusers pipeline holding these same modules: encodes prompts exactly as plain
    # inference does, and is the template `pipelines.export` saves from.
    pipeline: DiffusionPipeline = field(default=None, repr=False)

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    @property
    def default_image_size(self) -> tuple[int, int]:
        return default_image_size(self.pipeline)

    def latent_shape(self, batch_size: int, image_size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """Shape of x_t for `batch_size` images of `image_size` (default: the model's native size)."""
        height, width = image_size or self.default_image_size
        scale = self.vae_scale_factor
        return (batch_size, self.denoiser.config.in_channels, height // scale, width // scale)

    def _encode(self, prompts: list[str], negative: bool, image_size, through: dict | None = None) -> Conditioning:
        if isinstance(prompts, str):
            raise TypeError("encode_prompt takes a list of prompts, got a single string; wrap it in a list")
        device = next(p for p in self.text_encoders if p is not None).device
        with torch.set_grad_enabled(bool(through)), calling_through(self.pipeline, through or {}):
            kwargs = self.spec.encode(self.pipeline, list(prompts), negative=negative, device=device,
                                      image_size=image_size)
        return Conditioning(kwargs)

    def encode_prompt(self, prompts: list[str], *, image_size: tuple[int, int] | None = None,
                      through: dict[str, torch.nn.Module] | None = None) -> Conditioning:
        """Denoiser keyword tensors for `prompts` (batch-first, no grad).

        `image_size` (height, width) only matters for SDXL's size micro-conditioning;
        it defaults to the model's native resolution. `through` ({component name: the prepared,
        possibly DDP-wrapped text encoder}) encodes with gradients through those trained encoders.
        """
        return self._encode(prompts, False, image_size, through)

    def encode_unconditional(self, batch_size: int, *, image_size: tuple[int, int] | None = None) -> Conditioning:
        """The unconditional branch plain diffusers uses for guidance when no negative prompt is given.

        Not always `encode_prompt([""])`: SDXL zeroes it, Sana drops its instruction prefix.
        """
        return self._encode([""] * batch_size, True, image_size)

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """denoiser(x_t, t | cond), raw, in `prediction_type` ('flow' = eps - x_0), shaped like x_t.

        `denoiser` is any module with this bundle's denoiser architecture, possibly wrapped
        (DDP, torch.compile). Inputs are cast to its dtype; `t` is a float [B] or a scalar.
        """
        dtype = _dtype_of(denoiser)
        x_in = x_t.to(dtype)
        t = torch.as_tensor(t, device=x_t.device)
        t = (t if t.is_floating_point() else t.float()).expand(x_t.shape[0])
        # Sana's embedding takes t * timestep_scale; other families have no such field (scale 1).
        t = t * self.denoiser.config.get("timestep_scale", 1.0)
        extra = self.spec.extra_kwargs(unwrap_model(denoiser), x_in, self.vae_scale_factor)
        out = denoiser(x_in, timestep=t, **cond.to(device=x_t.device, dtype=dtype).kwargs, **extra,
                       return_dict=False)[0]
        if out.shape[1] == 2 * x_t.shape[1]:
            # Learned-sigma models (PixArt) stack [eps, variance]; the variance half is unused here.
            out = out[:, : x_t.shape[1]]
        return out

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (x - shift) * scale.

        A KL VAE's posterior is sampled with `generator`, or its mean when none is given;
        AutoencoderDC (Sana) is deterministic.
        """
        images = images.to(device=self.vae.device, dtype=self.vae.dtype)
        encoded = self.vae.encode(images)
        if hasattr(encoded, "latent_dist"):
            dist = encoded.latent_dist
            latents = dist.sample(generator) if generator is not None else dist.mean
        else:
            latents = encoded.latent
        return (latents - self._shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1] (unclamped, differentiable)."""
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.vae.config.scaling_factor + self._shift, return_dict=False)[0]

    @property
    def _shift(self) -> float:
        return self.vae.config.get("shift_factor", None) or 0.0


def bundle_from_pipeline(pipe: DiffusionPipeline, source: str) -> Bundle:
    """A Bundle over the modules of an already built diffusers pipeline (shared, not copied)."""
    pipeline_class = type(pipe).__name__
    spec = family_of(pipeline_class, source)
    text_encoders = [getattr(pipe, name, None) for name in spec.text_encoder_names]
    tokenizers = [getattr(pipe, name, None) for name in spec.tokenizer_names]
    for module in [pipe.vae, *text_encoders]:
        if module is not None:
            module.requires_grad_(False).eval()
    return Bundle(
        family=spec.name, denoiser=getattr(pipe, spec.denoiser_name), vae=pipe.vae, text_encoders=text_encoders,
        tokenizers=tokenizers, scheduler=pipe.scheduler, schedule=schedule_from_scheduler(pipe.scheduler),
        prediction_type=prediction_type_of(pipe.scheduler), pipeline_class=pipeline_class, source=str(source),
        pipeline=pipe,
    )


# ------------------------------------------------------------------ loading


def _read_model_index(source: str) -> tuple[str, dict]:
    """(where to load from, parsed model_index.json), with one-line errors for bad sources."""
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{path} has no model_index.json, so it is not a diffusers pipeline folder "
                "(write one with pipe.save_pretrained(folder))"
            )
        return str(path), json.loads(index.read_text())
    if path.exists() or not looks_like_hub_id(source):
        raise FileNotFoundError(f"no such pipeline folder: {path} (give a diffusers folder or a hub id)")
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(source, "model_index.json")
    except Exception as error:  # hub raises several types: offline, missing repo, gated, network
        raise FileNotFoundError(
            f"{source!r} is neither a local folder nor a hub pipeline that can be fetched "
            f"({type(error).__name__}; offline runs need it in the Hugging Face cache)"
        ) from None
    return source, json.loads(Path(index).read_text())


def resolve_source(source: str) -> str:
    """An alias from ALIASES becomes its folder; anything else is returned unchanged."""
    return ALIASES.get(str(source), str(source))


def load_bundle(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    lora: LoraSpec | None = None,
    variant: str | None = None,
) -> Bundle:
    """Load a diffusers text-to-image pipeline as a Bundle (see module docstring).

    Every part is loaded in `dtype` except a VAE that asks for float32 (`force_upcast`) when
    `dtype` is float16, as the SDXL pipeline does. VAE and text encoders are frozen;
    the denoiser trains unless `lora` is given, in which case only its adapters do.
    `attention`: "sdpa" (torch default), "xformers", or "math" (forward-mode AD safe).
    """
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={attention!r}; choose one of {ATTENTION_BACKENDS}")
    where, index = _read_model_index(resolve_source(source))
    spec = family_of(index.get("_class_name", "<missing _class_name>"), f"{where}/model_index.json")
    # Parts saved as None (SD3 without T5) must be passed as None, or diffusers refuses the folder.
    absent = {name: None for name, entry in index.items() if entry == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(where, dtype=dtype, variant=variant,
                                             **{**absent, **spec.load_kwargs})
    pipe.set_progress_bar_config(disable=True)
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)
    bundle = bundle_from_pipeline(pipe, source=where)
    configure_denoiser(bundle.denoiser, gradient_checkpointing=gradient_checkpointing, attention=attention,
                       lora=lora)
    pipe.to(device)
    return bundle


# ------------------------------------------------------------- denoiser options


def configure_denoiser(denoiser: torch.nn.Module, *, gradient_checkpointing: bool = False, attention: str = "sdpa",
                       lora: LoraSpec | None = None) -> torch.nn.Module:
    """Apply load_bundle's training options to a denoiser in place (also for students built later)."""
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if lora is not None:
        add_lora(denoiser, lora)
    set_attention(denoiser, attention)
    return denoiser


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """The base network under LoRA: every peft layer switched off inside the block (a teacher or
    reference for free), back on after. Works with and without diffusers' peft mixin."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = unwrap_model(module)
    layers = [layer for layer in base.modules() if isinstance(layer, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield base
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def add_lora(denoiser: torch.nn.Module, lora: LoraSpec) -> torch.nn.Module:
    """Freeze the denoiser and add trainable float32 LoRA adapters (peft) to `lora.target_modules`."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=list(lora.target_modules),
                        init_lora_weights=lora.init)
    names = [name for name, _ in denoiser.named_modules()]
    missing = [k for k in lora.target_modules if not any(n == k or n.endswith("." + k) for n in names)]
    if missing:  # checked before anything is frozen, so a failed call leaves the denoiser as it was
        raise ValueError(f"LoRA target_modules {missing} match no layer of {type(denoiser).__name__}; "
                         "name its linear layers, e.g. to_q, to_k, to_v, to_out.0")
    denoiser.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        if hasattr(denoiser, "add_adapter"):
            denoiser.add_adapter(config)
        else:  # PixArt's transformer has no diffusers peft mixin; peft injects directly
            inject_adapter_in_model(config, denoiser)
    for name, param in denoiser.named_parameters():
        param.requires_grad_("lora_" in name)
        # Half-precision trainable weights lose small updates; adapters train in float32.
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return denoiser


class MathKernelAttention:
    """Runs an attention processor with torch's math SDPA kernel.

    The fused SDPA kernels have no forward-mode derivative, so jvp through them fails
    (continuous-time consistency needs jvp); the math kernel is built from plain ops.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                  attention_mask=attention_mask, **kwargs)


def set_attention(denoiser: torch.nn.Module, attention: str) -> None:
    """Select the attention implementation of every attention layer of `denoiser`."""
    if attention == "sdpa":
        return
    if attention == "xformers":
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise ImportError("attention='xformers' needs the xformers package "
                              "(pip install 'diffstill[gpu]'), or use attention='sdpa'")
        denoiser.enable_xformers_memory_efficient_attention()
        return
    if attention != "math":
        raise ValueError(f"attention={attention!r}; choose one of {ATTENTION_BACKENDS}")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = {
        # Where diffusers has a classic (matmul + softmax) processor, use it; wrap the rest.
        name: AttnProcessor() if type(proc) is AttnProcessor2_0 else MathKernelAttention(proc)
        for name, proc in denoiser.attn_processors.items()
    }
    denoiser.set_attn_processor(processors)
