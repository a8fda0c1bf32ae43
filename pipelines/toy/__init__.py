"""The embedded toy world: procedural shapes with exact captions, and an exact checker."""
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
    "HELDOUT_COMBINATIONS", "OBJECT_COLOURS", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "TRAIN_COMBINATIONS",
    "ObjectSpec", "Scene", "SceneSpec", "ToyDataset", "caption", "is_heldout", "parse_caption", "place",
    "render", "sample_scene", "sample_spec", "toy_prompts", "vocabulary",
    "EVAL_PROMPT_COUNT", "HELDIN_PROMPTS", "HELDOUT_PROMPTS",
    "CheckResult", "ObjectCheck", "check", "check_batch", "pass_rate",
]
