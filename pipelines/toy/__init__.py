"""The embedded toy world: procedural shapes with exact captions, an exact checker, and the shipped tiny models.

The model folders below are built by scripts/build_toy_world.py (docs/toy_world.md).
"""
from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent
TOY_TEACHER = TOY_DIR / "teacher"            # StableDiffusionPipeline: UNet, eps, scaled-linear DDPM betas
TOY_FLOW_TEACHER = TOY_DIR / "teacher_flow"  # StableDiffusion3Pipeline: SD3 transformer, flow matching
TOY_CLIP = TOY_DIR / "clip"                  # transformers CLIPModel + tokenizer + processor config
TOY_VAE = TOY_DIR / "vae"                    # AutoencoderKL shared by both teachers
TOY_ATTRIBUTES = TOY_DIR / "attributes"      # attribute net (reward toy_attribute_net): config.json + safetensors

from .checker import CheckResult, ObjectCheck, check, check_batch, pass_rate
from .prompts import EVAL_PROMPT_COUNT, HELDIN_PROMPTS, HELDOUT_PROMPTS
from .world import (
    HELDOUT_COMBINATIONS,
    OBJECT_COLOURS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_COMBINATIONS,
    ObjectSpec,
    Scene,
    SceneSpec,
    ToyDataset,
    caption,
    is_heldout,
    parse_caption,
    place,
    render,
    sample_scene,
    sample_spec,
    vocabulary,
)
from .prompts import toy_prompts

__all__ = [
    "TOY_DIR", "TOY_TEACHER", "TOY_FLOW_TEACHER", "TOY_CLIP", "TOY_VAE", "TOY_ATTRIBUTES",
    "HELDOUT_COMBINATIONS", "OBJECT_COLOURS", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "TRAIN_COMBINATIONS",
    "ObjectSpec", "Scene", "SceneSpec", "ToyDataset", "caption", "is_heldout", "parse_caption", "place",
    "render", "sample_scene", "sample_spec", "toy_prompts", "vocabulary",
    "EVAL_PROMPT_COUNT", "HELDIN_PROMPTS", "HELDOUT_PROMPTS",
    "CheckResult", "ObjectCheck", "check", "check_batch", "pass_rate",
]
