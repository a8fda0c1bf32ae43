"""Write a trained denoiser as a diffusers pipeline folder plain diffusers loads.

    export_pipeline(bundle, student, "outputs/sdxl_tbcm", scheduler=lcm_scheduler, model_card=card)
    DiffusionPipeline.from_pretrained("outputs/sdxl_tbcm")    # no diffstill import, no peft needed

The folder holds the trained denoiser, the bundle's VAE, text encoders and
tokenizers, the given scheduler (whose config carries the distilled sampler)
or the bundle's, and a README.md model card with hub metadata. When the
denoiser carries LoRA adapters the folder gets both the adapters
(`pytorch_lora_weights.safetensors`, for `pipe.load_lora_weights(folder)` on
the base model) and the denoiser with the adapters merged, so a plain
`from_pretrained` needs no peft. Weights are safetensors only.

The folder is built beside its destination and renamed into place, so a
crash never leaves a half-written export where a good one was.
"""
from __future__ import annotations

import copy
import inspect
import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from pipelines.backbones import Bundle, looks_like_hub_id, unwrap_model

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@dataclass
class ModelCard:
    """What README.md says about an export."""

    method: str                               # trainer name, e.g. "tbcm"
    base_model: str                           # hub id (or folder) of the teacher / base
    recipe: str = ""                          # the resolved YAML config text
    steps_trained: int = 0
    recommended_steps: int | None = None
    recommended_guidance: float | None = None
    recommended_sigmas: list[float] | None = None  # flow students: the grid that recommended_steps means
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_protocol: str = ""                # how the metrics were measured (prompts, seeds, steps, guidance)
    notes: str = ""

    def front_matter(self, lora: bool) -> dict:
        tags = ["diffusers", "text-to-image", "diffstill", self.method] + (["lora"] if lora else [])
        meta = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
        # The hub rejects a base_model that is not a repo id; a local folder is named in the text instead.
        if looks_like_hub_id(self.base_model) and not Path(self.base_model).exists():
            meta["base_model"] = self.base_model
        return meta

    def render(self, *, name: str, pipeline_class: str, lora_file: bool, full_pipeline: bool,
               absent: tuple[str, ...] = ()) -> str:
        """README.md text: YAML front matter, usage, training facts, metrics, recipe, notes.

        `absent` names required pipeline parts saved as None (SD3 without T5): loading must pass them as None.
        """
        lines = ["---", yaml.safe_dump(self.front_matter(lora_file), sort_keys=False).strip(), "---", "",
                 f"# {name}", "", f"`{self.method}` trained from `{self.base_model}` with diffstill "
                 f"({pipeline_class}).", "", "## Usage", "", "```python", "from diffusers import DiffusionPipeline"]
        sigmas = None if self.recommended_sigmas is None else [round(s, 6) for s in self.recommended_sigmas]
        steps = ("sigmas", sigmas) if sigmas is not None else ("num_inference_steps", self.recommended_steps)
        call = "image = pipe(prompt" + "".join(
            f", {k}={v}" for k, v in (steps, ("guidance_scale", self.recommended_guidance)) if v is not None
        ) + ").images[0]"
        if full_pipeline:
            load_args = "".join(f", {part}=None" for part in absent)
            lines += [f'pipe = DiffusionPipeline.from_pretrained("{name}"{load_args})']
        else:
            lines += [f'pipe = DiffusionPipeline.from_pretrained("{self.base_model}")',
                      f'pipe.load_lora_weights("{name}")']
        lines += [call, "```", ""]
        if lora_file and full_pipeline:
            lines += [f"The denoiser here has its LoRA merged; `{LORA_WEIGHTS}` holds the adapters alone, "
                      "for `load_lora_weights` on the base model.", ""]
        lines += ["## Training", "", f"- method: `{self.method}`", f"- base model: `{self.base_model}`",
                  f"- steps trained: {self.steps_trained}"]
        if self.recommended_steps is not None:
            lines.append(f"- recommended inference steps: {self.recommended_steps}")
        if sigmas is not None:
            lines.append(f"- sigmas of those steps: {sigmas} (the scheduler applies its shift to them; without "
                         "them diffusers' flow grid ends at sigma 0.001 and N steps are N - 1 real ones)")
        if self.recommended_guidance is not None:
            lines.append(f"- recommended guidance scale: {self.recommended_guidance}")
        lines.append("")
        if self.metrics:
            lines += ["## Metrics", ""] + ([self.metrics_protocol, ""] if self.metrics_protocol else [])
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_format_metric(v)} |" for k, v in self.metrics.items()] + [""]
        if self.recipe:
            lines += ["## Recipe", "", "```yaml", self.recipe.strip(), "```", ""]
        if self.notes:
            lines += ["## Notes", "", self.notes.strip(), ""]
        return "\n".join(lines)


def _format_metric(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------ LoRA


def has_lora(denoiser: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in denoiser.modules())


def merged_copy(denoiser: torch.nn.Module) -> torch.nn.Module:
    """A copy of `denoiser` with its LoRA folded into the base weights and the peft layers removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(denoiser)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, module.get_base_layer())
    if "peft_config" in vars(plain):
        del plain.peft_config
    plain._hf_peft_config_loaded = False
    return plain


def save_lora(pipeline_cls: type, denoiser_name: str, denoiser: torch.nn.Module, folder: Path) -> None:
    """pytorch_lora_weights.safetensors in the format `pipeline_cls.load_lora_weights` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser)
    if denoiser_name == "unet":  # UNet LoRAs use diffusers' own key names; transformer ones keep peft's
        state = convert_state_dict_to_diffusers(state)
    # rank and alpha travel as metadata, so the loaded scale equals the trained alpha / rank
    metadata = denoiser.peft_config["default"].to_dict()
    pipeline_cls.save_lora_weights(
        folder, safe_serialization=True, weight_name=LORA_WEIGHTS,
        **{f"{denoiser_name}_lora_layers": state, f"{denoiser_name}_lora_adapter_metadata": metadata},
    )


# ------------------------------------------------------------------ export


def assemble_pipeline(template, **replace):
    """A new pipeline of the template's class sharing its parts, with `replace` swapped in."""
    cls = type(template)
    config = {k: v for k, v in template.config.items() if not k.startswith("_")}
    parts = template.components
    kwargs = {}
    for name in list(inspect.signature(cls.__init__).parameters)[1:]:
        if name in replace:
            kwargs[name] = replace[name]
        elif name in parts:
            kwargs[name] = parts[name]
        elif name in config:
            kwargs[name] = config[name]
    return cls(**kwargs)


def export_pipeline(
    bundle: Bundle,
    denoiser: torch.nn.Module,
    out_dir: str | Path,
    *,
    scheduler=None,
    model_card: ModelCard,
    lora_only: bool = False,
) -> Path:
    """Write `denoiser` with the bundle's other parts as a diffusers folder at `out_dir`; returns it.

    `scheduler` (default: the bundle's) is the sampler the folder loads with. `lora_only`
    writes just the adapters and the card (the user loads them onto the base model).
    An existing export at `out_dir` is replaced atomically.
    """
    out_dir = Path(out_dir)
    denoiser = unwrap_model(denoiser)
    lora = has_lora(denoiser)
    pipeline_cls = type(bundle.pipeline)
    can_save_lora = hasattr(pipeline_cls, "save_lora_weights")
    if lora_only and not lora:
        raise ValueError("lora_only=True but the denoiser has no LoRA adapters; export the full pipeline instead")
    if lora_only and not can_save_lora:
        raise ValueError(f"{pipeline_cls.__name__} cannot load LoRA files in diffusers; use lora_only=False "
                         "(the merged denoiser is exported)")
    denoiser_name = bundle.spec.denoiser_name

    def write(folder: Path) -> None:
        if not lora_only:
            plain = merged_copy(denoiser) if lora else denoiser
            sampler = scheduler if scheduler is not None else bundle.scheduler
            pipe = assemble_pipeline(bundle.pipeline, **{denoiser_name: plain, "scheduler": sampler})
            pipe.save_pretrained(folder, safe_serialization=True)
            drop_load_paths(folder)
        if lora and can_save_lora:
            save_lora(pipeline_cls, denoiser_name, denoiser, folder)
        absent = tuple(name for name, part in bundle.pipeline.components.items()
                       if part is None and name not in pipeline_cls._optional_components)
        card = model_card.render(name=out_dir.name, pipeline_class=pipeline_cls.__name__,
                                 lora_file=lora and can_save_lora, full_pipeline=not lora_only, absent=absent)
        (folder / "README.md").write_text(card)

    return write_atomically(out_dir, write)


def drop_load_paths(folder: Path) -> None:
    """Remove `_name_or_path` from the part configs under `folder`.

    diffusers records where each part was loaded from; in an export that is a folder on the
    machine that trained it, meaningless to whoever loads the export (and it tells them about
    the trainer's disk).
    """
    for config_file in folder.glob("*/config.json"):
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _looks_like_export(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / LORA_WEIGHTS).is_file() or not any(folder.iterdir())


def write_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a fresh folder beside `out_dir`, then rename it to `out_dir`."""
    if out_dir.exists() and not (out_dir.is_dir() and _looks_like_export(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not a pipeline export; choose another output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.partial-{tag}"
    old = out_dir.parent / f".{out_dir.name}.old-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        pickles = [p.name for p in tmp.rglob("*") if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise RuntimeError(f"export wrote pickled weights {pickles}; only safetensors are allowed")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
