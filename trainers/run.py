"""One training run end to end: data, models, method, loop, export.

Order matters for users: the data is opened (and its errors raised) before
any model weights load, and the export happens only after a run that reached
its last step (a stopped run leaves a checkpoint to resume instead).
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainers.config import RunConfig, dump_config, method_class
from trainers.data import build_dataset
from trainers.loop import train


def load_run_bundle(cfg: RunConfig, device: torch.device):
    from pipelines.backbones import LoraSpec, load_bundle

    lora = cfg.model.lora
    spec = None
    if lora.rank > 0:
        spec = LoraSpec(rank=lora.rank, alpha=lora.alpha or float(lora.rank), seed=cfg.train.seed,
                        target_modules=tuple(lora.target_modules),
                        init=True if lora.init == "default" else lora.init)
    return load_bundle(cfg.model.source, dtype=getattr(torch, cfg.model.weight_dtype), device=device,
                       gradient_checkpointing=cfg.model.gradient_checkpointing, attention=cfg.model.attention,
                       lora=spec, variant=cfg.model.variant)


def export_run(cfg: RunConfig, method, recipe_text: str, trainer=None) -> Path:
    """The run's diffusers folder; the card carries the final in-training evaluation when there was one."""
    from pipelines.export import ModelCard, export_pipeline

    rec = method.recommended()
    out = Path(cfg.export.dir or Path(cfg.output_dir) / "pipeline")
    metrics, protocol = {}, ""
    if trainer is not None and trainer.last_eval is not None:
        step, numbers = trainer.last_eval
        metrics = {k.removeprefix("eval/"): v for k, v in numbers.items()}
        protocol = trainer.evaluator.protocol(step)
    card = ModelCard(method=cfg.method, base_model=cfg.model.source, recipe=recipe_text,
                     steps_trained=cfg.train.max_steps,
                     recommended_steps=cfg.export.steps or rec.steps,
                     recommended_guidance=cfg.export.guidance if cfg.export.guidance is not None else rec.guidance,
                     recommended_sigmas=method.flow_sigmas(cfg.export.steps or rec.steps),
                     metrics=metrics, metrics_protocol=protocol)
    export_pipeline(method.bundle, method.export_denoiser(), out, scheduler=rec.scheduler, model_card=card,
                    lora_only=False)
    return out


def run(cfg: RunConfig, accelerator, recipe_path: str | None = None) -> int:
    # read now: a recipe file moved or edited during a long run must not fail or change its export
    recipe = Path(recipe_path).read_text() if recipe_path else ""
    dataset = build_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    bundle = load_run_bundle(cfg, accelerator.device)
    method = method_class(cfg.method)(cfg, bundle)
    trainer = train(cfg, accelerator, method, dataset)
    if not trainer.stopped and cfg.export.enabled and accelerator.is_main_process:
        recipe += "\n# resolved:\n" + "".join(f"# {line}\n" for line in dump_config(cfg).splitlines())
        out = export_run(cfg, method, recipe, trainer)
        accelerator.print(f"exported diffusers pipeline to {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes trackers and the process group: nothing collective after this
    return 0
