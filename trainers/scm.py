"""sCM distillation on real images: continuous-time consistency on noised dataset latents.

Paper: sCM, Lu & Song, arXiv 2410.11081 (its distillation form, sCD, in TrigFlow; Eqs. 8-9), the objective
TBCM (arXiv 2511.20410) keeps while replacing the states. This trainer is the baseline TBCM is measured
against: the same student, tangent, JVP, adaptive weighting and export (`trainers/tbcm.py`,
`ContinuousConsistency`), with the training states taken from images instead of teacher trajectories.

One step, per batch of (image, caption):

1. x_0 = the VAE latent of the image (model units); z ~ N(0, I); angle s from the sCM proposal
   tan s = exp(tau) / sigma_d, tau ~ N(p_mean, p_std), clamped to the teacher's usable angles.
2. x_s = sigma_d (cos s x_0 + sin s z): for a VP teacher (sigma_d 1) that is alpha_t x_0 + sigma_t z, for a
   flow teacher sigma_d times the flow-space state (the TrigFlow state TBCM uses).
3. One guided teacher call at (x_s, s) with CFG g drawn from `teacher_guidance`: dx/ds = sigma_d F_teacher.
4. The sCM loss of `ContinuousConsistency.consistency_loss`, one state per image.

Cost per state: one CFG teacher call and a VAE encode, against TBCM's (K + 1) / K CFG teacher calls and
no image at all. Defaults p_mean 0.2, p_std 1.6 are Sana-Sprint's (arXiv 2503.09641), the TrigFlow form
the suite follows (sCM's ImageNet runs used -1.0 and 1.4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.schedules import append_dims
from trainers.method import LossOutput
from trainers.profiling import phase
from trainers.strict import field
from trainers.tbcm import ContinuousConsistency, ContinuousConsistencyOptions


@dataclass
class SCMConfig(ContinuousConsistencyOptions):
    p_mean: float = field(0.2, "mean of tau in the angle proposal tan s = exp(tau) / sigma_d (Sana-Sprint: 0.2)")
    p_std: float = field(1.6, "std of tau (Sana-Sprint: 1.6)")

    def __post_init__(self):
        super().__post_init__()
        if self.p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")


def proposal_angles(tau: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """s = atan(exp(tau) / sigma_d): the sCM training-angle proposal for a draw tau ~ N(p_mean, p_std)."""
    return torch.atan(torch.exp(tau) / sigma_d)


def noised_state(x_0: torch.Tensor, z: torch.Tensor, s: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """x_s = sigma_d (cos s x_0 + sin s z), x_0 and z in unit-std model units."""
    return sigma_d * (append_dims(s.cos(), x_0.ndim) * x_0 + append_dims(s.sin(), x_0.ndim) * z)


class SCM(ContinuousConsistency):
    """States from noised dataset latents, one teacher call each."""

    config_class = SCMConfig
    needs = "images"

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        opts, device = self.options, generator.device
        prompts = list(batch["prompt"])
        n = len(prompts)
        with torch.no_grad(), phase("encode"):
            cond = self.bundle.encode_prompt(prompts, image_size=self.image_size)
            x_0 = self.clean_latents(batch, generator).to(self.teacher.device)
        tau = opts.p_mean + opts.p_std * torch.randn(n, generator=generator, device=device)
        s = proposal_angles(tau, self.sigma_d).clamp(*self.angle_range)
        z = torch.randn(x_0.shape, generator=generator, device=device).to(x_0.device)
        x_t = noised_state(x_0, z, s.to(x_0.device), self.sigma_d)
        g = self.draw_guidance(n, generator)
        with torch.no_grad(), phase("teacher"):
            dxds = self.sigma_d * self.teacher_velocity(x_t, s, cond, g)
        return self.consistency_loss(x_t, s, dxds, cond, torch.ones(n, device=x_t.device), step)
