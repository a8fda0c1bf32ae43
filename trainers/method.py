"""The Method protocol: what a trainer tells the one training loop.

A method owns its maths and its networks' roles; the loop owns the mechanics
(Accelerator, optimizers, accumulation, clipping, EMA/target updates,
checkpoints, logging). The contract, in call order:

1. `Method(cfg, bundle)` builds the networks (frozen teacher parts stay as
   loaded; trained ones are created here) and nothing else.
2. `trainable()` returns {group name: module}; each group gets its own
   optimizer and is `accelerator.prepare`d. Frozen modules are never prepared.
3. `averaged()` returns {name: (group, decay)}: EMA / target copies the loop
   keeps and updates after each step of that group.
4. `bind(prepared, averages)` hands back the prepared modules and the EMA
   copies; the method uses only these from then on.
5. Each iteration: `groups_for_step(step)` says which groups step now (methods
   that alternate generator / critic updates), and `loss(batch, step, groups,
   generator)` returns per-sample losses and detached logs.
6. `generate(prompts, generator)` renders validation images; `export(...)`
   writes the diffusers folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipelines.backbones import Bundle
    from trainers.config import RunConfig


@dataclass
class LossOutput:
    """Per-sample loss [B] (the loop reduces it) and detached scalars to log."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Recommended:
    """How the exported model should be sampled (scheduler + card)."""

    steps: int
    guidance: float
    scheduler: Any = None  # a diffusers scheduler instance, or None for the bundle's own


class Method:
    """Base class with the defaults most methods want."""

    config_class: type = type(None)
    #: Name of the data each batch needs: "images" (pixel_values + prompt) or "prompts".
    needs: str = "images"

    def __init__(self, cfg: "RunConfig", bundle: "Bundle"):
        self.cfg = cfg
        self.options = cfg.options
        self.bundle = bundle
        self.modules: dict[str, torch.nn.Module] = {}
        self.averages: dict[str, torch.nn.Module] = {}
        self.image_size = (cfg.data.resolution, cfg.data.resolution)
        if cfg.data.kind == "latent_cache":
            self.check_latent_cache(cfg.data)

    def check_latent_cache(self, data) -> None:
        """Latents cached for another VAE or resolution would fail deep in the denoiser, or train silently wrong."""
        from trainers.data_cache import TensorCacheDataset

        found = tuple(TensorCacheDataset(data.path)[0]["latents"].shape)
        want = tuple(self.bundle.latent_shape(1, self.image_size)[1:])
        if found != want:
            raise ValueError(f"data.path {data.path}: cached latents are {list(found)}, but {self.bundle.source} at "
                             f"data.resolution {data.resolution} needs {list(want)}; set data.resolution to the "
                             "cache's, or re-cache with scripts/cache_latents.py and this recipe")

    @torch.no_grad()
    def clean_latents(self, batch: dict, generator: torch.Generator | None, n: int | None = None) -> torch.Tensor:
        """x_0 of the first n items of a batch: its cached latents (data.kind latent_cache,
        scripts/cache_latents.py) or the VAE's encoding of its images (posterior sampled with `generator`,
        its mean without one)."""
        device = self.bundle.vae.device
        if "latents" in batch:
            return batch["latents"][:n].to(device).float()
        if "pixel_values" not in batch:
            raise ValueError(f"{self.cfg.method} needs images or cached latents, and data.kind "
                             f"{self.cfg.data.kind!r} gives neither")
        return self.bundle.encode_images(batch["pixel_values"][:n].to(device), generator).float()

    @classmethod
    def check_config(cls, cfg: "RunConfig", source: str) -> None:
        """Cross-section checks that need both the shared and the method's options."""

    def trainable(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def averaged(self) -> dict[str, tuple[str, float]]:
        decay = self.cfg.train.ema_decay
        return {"ema": ("student", decay)} if decay > 0 else {}

    def bind(self, prepared: dict[str, torch.nn.Module], averages: dict[str, torch.nn.Module]) -> None:
        self.modules = prepared
        self.averages = averages

    def groups_for_step(self, step: int) -> list[str]:
        return list(self.modules)

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        raise NotImplementedError

    def recommended(self) -> Recommended:
        raise NotImplementedError

    def flow_sigmas(self, steps: int) -> list[float] | None:
        """For a flow-matching export, the sigmas (before the scheduler's shift) that `steps` steps of this
        method mean, to pass as `pipe(..., sigmas=...)`; None where the scheduler's own grid is the method's.
        diffusers' default N-step flow grid ends at sigma 1/1000, so its "2 steps" are one real step."""
        return None

    def export_denoiser(self) -> torch.nn.Module:
        """The network to export: the EMA copy when there is one and the config asks for it."""
        from pipelines.backbones import unwrap_model

        if self.cfg.export.use_ema and "ema" in self.averages:
            return self.averages["ema"]
        return unwrap_model(self.modules["student"])

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Validation images with the recommended steps and guidance."""
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        rec = self.recommended()
        return self.sample(prompts, seeds, rec.steps, rec.guidance)

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
        """Images in [-1, 1] from the current student, image i from initial noise seeded by seeds[i]."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample for in-training evaluation yet; set eval.every=0")


class ODESampling:
    """`sample` for methods whose model samples like its teacher: deterministic DDIM / flow Euler."""

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
        from pipelines.sampling import sample_images

        x_T = initial_noise(self.bundle.latent_shape(1, self.image_size)[1:], seeds, self.bundle.denoiser.device)
        return sample_images(self.bundle, self.export_denoiser(), prompts, steps, guidance, x_T, self.image_size)


def initial_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device) -> torch.Tensor:
    """x_T per image from its own CPU generator, so an image depends on its seed alone
    (the evaluation harness's rule: the same on any device and any number of processes)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)
