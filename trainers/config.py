"""The run config: typed, strict, loaded from YAML plus `a.b=c` overrides.

A recipe names its method (`method: sft`) and puts that method's options under
a key of the same name (`sft: {...}`); everything else is shared by all
methods. Loading checks every key and type and every cross-field rule before
any model is touched, and every error names the file and the dotted key.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import re

import yaml

from trainers import METHODS
from trainers.data import DataConfig
from trainers.strict import ConfigError, build, field, to_dict


@dataclass
class LoraConfig:
    rank: int = field(0, "LoRA rank; 0 trains the full denoiser")
    alpha: Optional[float] = field(None, "LoRA alpha; defaults to the rank (scale 1)")
    target_modules: list[str] = field(["to_q", "to_k", "to_v", "to_out.0"], "module names that get adapters")
    init: Literal["gaussian", "default"] = field("gaussian", "adapter init: 'gaussian' as the diffusers scripts use, or peft's default")

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")


@dataclass
class ModelConfig:
    source: str = field("toy", "hub id, local diffusers pipeline folder, or a built-in name (toy, toy-flow, tiny-sd, tiny-sdxl, ...)")
    variant: Optional[str] = field(None, "weights variant to load, e.g. fp16")
    weight_dtype: Literal["float32", "float16", "bfloat16"] = field("float32", "dtype of the frozen modules (teacher, VAE, text encoders)")
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass of trained denoisers")
    attention: Literal["sdpa", "xformers", "math"] = field("sdpa", "attention kernel; 'math' is needed by forward-mode JVP")
    lora: LoraConfig = field(LoraConfig(), "LoRA adapters on the trained denoiser")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor", "sgd"] = field("adamw", "optimizer")
    lr: float = field(1e-4, "peak learning rate")
    betas: tuple[float, float] = field((0.9, 0.999), "Adam betas")
    weight_decay: float = field(1e-2, "decoupled weight decay")
    eps: float = field(1e-8, "Adam epsilon")
    schedule: Literal["constant", "linear", "cosine"] = field("constant", "learning-rate decay after warm-up")
    warmup_steps: int = field(0, "linear warm-up steps")
    decay_steps: int = field(0, "with a linear or cosine schedule, decay over the last decay_steps steps only and "
                                "hold the peak rate before them (warm-up, stable, decay); 0: decay over the whole "
                                "run after warm-up")
    fused: Optional[bool] = field(None, "one fused kernel per AdamW step; default: on when every trained parameter "
                                        "is on a CUDA device")

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps < 0:
            raise ValueError(f"optim.decay_steps must be >= 0, got {self.decay_steps}")
        if self.decay_steps and self.schedule == "constant":
            raise ValueError("optim.decay_steps needs a decay: set optim.schedule to linear or cosine, "
                             "or drop decay_steps")


@dataclass
class TrainConfig:
    seed: int = field(0, "seed for init, data order and every step's noise (re-derived from (seed, rank, step))")
    max_steps: int = field(1000, "optimizer steps")
    batch_size: int = field(8, "samples per process per micro-step")
    gradient_accumulation: int = field(1, "micro-steps per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", "autocast precision of the trained modules")
    max_grad_norm: float = field(1.0, "gradient clipping norm; 0 disables")
    ema_decay: float = field(0.0, "EMA of the trained denoiser used for export and validation; 0 disables")
    checkpoint_every: int = field(500, "steps between checkpoints; 0 only at the end")
    keep_checkpoints: int = field(2, "how many recent checkpoints to keep")
    max_nonfinite_steps: int = field(20, "skipped non-finite steps tolerated before aborting")
    log_every: int = field(10, "steps between logged scalars")
    log_with: Literal["tensorboard", "wandb", "none"] = field("tensorboard", "scalar logger")
    validate_every: int = field(0, "steps between validation image grids; 0 disables")
    validation_prompts: list[str] = field([], "prompts for validation grids (empty: the first prompts of the data)")
    num_workers: int = field(0, "data-loading worker processes that read batches ahead of the step (0: read in "
                                "the main process when the step asks)")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class ExportConfig:
    enabled: bool = field(True, "write a diffusers pipeline folder at the end")
    dir: Optional[str] = field(None, "export folder; default <output_dir>/pipeline")
    use_ema: bool = field(True, "export the EMA weights when train.ema_decay > 0")
    steps: Optional[int] = field(None, "recommended inference steps written to the model card (default: the method's)")
    guidance: Optional[float] = field(None, "recommended guidance scale (default: the method's)")


@dataclass
class EvalConfig:
    every: int = field(0, "steps between in-training evaluations (logged next to the loss); 0 disables")
    prompts: str = field("toy-heldout", "prompt set: toy-heldin, toy-heldout, a benchmark name, or a prompt file")
    num_prompts: int = field(16, "prompts per evaluation")
    images_per_prompt: int = field(1, "images per prompt (diversity metrics need >= 2)")
    steps: Optional[int] = field(None, "sampling steps (default: the method's recommended steps)")
    guidance: Optional[float] = field(None, "guidance scale (default: the method's recommended guidance)")
    metrics: list[str] = field(["toy_attributes"], "metrics from evaluation.scoring (fid, clip_score, toy_attributes, reward:<name>, ...)")
    seed: int = field(0, "first noise seed; image i uses seed + i, the same at every evaluation")
    batch_size: int = field(8, "images per generation batch")
    feature_model: Optional[str] = field(None, "FID feature model: 'inception' or a CLIP folder (default: toy CLIP for toy prompts)")
    inception_weights: Optional[str] = field(None, "torch-fidelity Inception weights file or folder (default: torch hub cache)")
    clip_model: Optional[str] = field(None, "CLIPModel folder for clip_score (default: the toy CLIP)")
    fid_ref: Optional[str] = field(None, "FID reference for non-toy prompts: image folder, saved datasets folder or .npz")
    stats_cache: Optional[str] = field(None, "folder for cached FID reference statistics (default $DIFFSTILL_CACHE)")
    reward_options: dict[str, dict[str, Any]] = field({}, "reward name -> builder options for reward:<name> metrics, "
                                                       "e.g. {hpsv2: {path: /weights/HPS_v2_compressed.pt}}")

    def __post_init__(self):
        if self.every < 0 or self.num_prompts < 1 or self.images_per_prompt < 1:
            raise ValueError("eval.every must be >= 0 and eval.num_prompts, eval.images_per_prompt >= 1")


@dataclass
class RunConfig:
    method: str = field("sft", "trainer: " + ", ".join(METHODS))
    output_dir: str = field("outputs/run", "run folder: resolved config, checkpoints, logs, export")
    model: ModelConfig = field(ModelConfig(), "the teacher / base model")
    data: DataConfig = field(DataConfig(), "training data")
    train: TrainConfig = field(TrainConfig(), "loop mechanics")
    optim: OptimConfig = field(OptimConfig(), "default optimizer for every trained group")
    optim_groups: dict[str, dict[str, Any]] = field({}, "per-group optimizer overrides, e.g. {fake_score: {lr: 1e-5}}")
    export: ExportConfig = field(ExportConfig(), "diffusers export")
    eval: EvalConfig = field(EvalConfig(), "small evaluations during training")
    options: Any = field(None, "the method's own options (the YAML key named after the method)", init=False, repr=False)

    def group_optim(self, group: str, source: str = "<config>") -> OptimConfig:
        """The optimizer config of one group: the defaults with its overrides applied."""
        merged = {**to_dict(self.optim), **self.optim_groups.get(group, {})}
        return build(OptimConfig, merged, source=source, key=f"optim_groups.{group}")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are bools, so `mixed_precision: no` stays the string "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


def method_class(name: str, source: str = "<config>") -> type:
    if name not in METHODS:
        raise ConfigError(f"{source}: method: unknown method {name!r} (known: {', '.join(METHODS)})")
    module_name, class_name = METHODS[name]
    return getattr(importlib.import_module(module_name), class_name)


def apply_override(tree: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value (e.g. train.max_steps=10)")
    dotted, raw = override.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a mapping")
    node[leaf] = parse_yaml(raw) if raw.strip() else None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply overrides, and build the typed config (or raise ConfigError)."""
    source = str(path) if path else "<defaults>"
    tree: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            tree = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: top level must be a mapping of keys")
    for o in overrides:
        apply_override(tree, o)
    if overrides:
        source = f"{source} (with overrides {' '.join(overrides)})"
    return resolve(tree, source)


def resolve(tree: dict, source: str) -> RunConfig:
    method_name = tree.get("method", "sft")
    cls = method_class(method_name, source)
    for other in METHODS:
        if other != method_name and other in tree:
            raise ConfigError(f"{source}: {other}: options for method {other!r} but method is {method_name!r}")
    options_tree = tree.get(method_name)
    shared = {k: v for k, v in tree.items() if k != method_name}
    cfg = build(RunConfig, shared, source=source)
    cfg.options = build(cls.config_class, options_tree, source=source, key=method_name)
    for group in cfg.optim_groups:
        cfg.group_optim(group, source)
    cls.check_config(cfg, source)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    tree = to_dict(cfg)
    tree.pop("options")
    tree[cfg.method] = to_dict(cfg.options)
    return tree


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Every leaf setting that differs between two config trees, as 'dotted.key: old -> new', in key order."""
    changes = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a} -> {b}")
    return changes


def load_config_for_cli(path: str | Path | None, overrides: list[str] = ()) -> RunConfig | None:
    """load_config for a command line: a ConfigError is printed as one line on stderr and gives None."""
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None


def save_config(cfg: RunConfig, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "config.yaml"
    out.write_text(dump_config(cfg))
    return out


__all__ = ["ConfigError", "RunConfig", "load_config", "load_config_for_cli", "save_config", "dump_config", "method_class",
           "changed_settings"]
