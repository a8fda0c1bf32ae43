"""Denoising fine-tuning (SFT), with optional latent-perceptual and pixel-space terms.

The base objective is the one every diffusion model is trained with (Ho et al.,
arXiv 2006.11239; v-targets from Salimans & Ho, arXiv 2202.00512; flow
targets from Lipman et al., arXiv 2210.02747 / Esser et al., arXiv 2403.03206):

    x_t = alpha_t x_0 + sigma_t eps,    L = w(t) || f_theta(x_t, t, c) - target(x_0, eps, t) ||^2

with the target in the model's own parameterization (eps, v, x_0 or flow
velocity eps - x_0), mean over C,H,W. Options:

* caption dropout: the prompt is replaced by "" with probability p so the
  model keeps an unconditional branch for classifier-free guidance;
* min-SNR-gamma weighting (Hang et al., arXiv 2303.09556), w = min(SNR, gamma)
  / SNR for eps targets, / (SNR + 1) for v targets (VP schedules only);
* latent perceptual loss (Berrada et al., arXiv 2411.04873), see
  `trainers/losses/perceptual.py`;
* pixel-space loss (Zhang et al., arXiv 2409.17565, Eq. 4), see
  `trainers/losses/pixel.py`;
* text encoders trained with the denoiser (`train_text_encoders`, each its own
  optimizer group, fp32, no EMA; the export carries the trained ones), as LDM
  trained its text transformer jointly (Rombach et al., arXiv 2112.10752).

This trainer also trains the toy world's teachers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pipelines.schedules import append_dims, from_x0_eps, to_x0_eps
from trainers.losses.perceptual import LPLConfig, latent_perceptual_loss
from trainers.losses.pixel import PixelLossConfig, pixel_loss
from trainers.method import LossOutput, Method, ODESampling, Recommended
from trainers.profiling import phase
from trainers.strict import ConfigError, field
from trainers.timesteps import sample_timesteps


@dataclass
class SFTConfig:
    caption_dropout: float = field(0.1, "probability of training on the empty prompt (keeps CFG working)")
    timesteps: Literal["uniform", "logit_normal"] = field("uniform", "training-time distribution; logit_normal as in SD3")
    timestep_shift: float = field(1.0, "SD3's shift s -> shift*s/(1+(shift-1)*s) of the training t toward noise "
                                       "(flow models only; 1 disables)")
    min_snr_gamma: float = field(0.0, "min-SNR-gamma loss weighting; 0 disables (VP schedules only)")
    truncated_snr: bool = field(False, "truncated-SNR weighting, max(SNR, 1) on the x_0 error: the eps loss at low "
                                       "noise, the x_0 loss at high noise, where the layout is decided (VP only)")
    lpl: LPLConfig = field(LPLConfig(weight=0.0), "latent perceptual loss term (weight 0 disables)")
    pixel: PixelLossConfig = field(PixelLossConfig(weight=0.0), "pixel-space loss term (weight 0 disables)")
    sample_steps: int = field(25, "steps of the validation sampler and the recommended steps of the export")
    guidance: float = field(5.0, "CFG scale of validation and the recommended guidance of the export")
    train_text_encoders: list[str] = field([], "pipeline components trained with the denoiser, e.g. [text_encoder]; "
                                               "each is an optimizer group (lr via optim_groups.<name>)")

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be >= 0, got {self.min_snr_gamma}")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if self.truncated_snr and self.min_snr_gamma > 0:
            raise ValueError("truncated_snr and min_snr_gamma are two loss weightings; set one (min_snr_gamma=0 "
                             "or truncated_snr=false)")

    @property
    def weighted(self) -> bool:
        return self.truncated_snr or self.min_snr_gamma > 0


TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def trained_text_encoder(bundle, name: str) -> torch.nn.Module:
    """The bundle's text encoder `name`, switched to training in fp32 (AdamW keeps no master copy)."""
    if name not in bundle.spec.text_encoder_names or getattr(bundle.pipeline, name, None) is None:
        have = [n for n in bundle.spec.text_encoder_names if getattr(bundle.pipeline, n, None) is not None]
        raise ValueError(f"sft.train_text_encoders: {bundle.source} has no {name!r} (it has: {', '.join(have)})")
    # In place: the pipeline the export writes holds this same module, so the trained weights are exported.
    return getattr(bundle.pipeline, name).float().requires_grad_(True).train()


def in_target_space(w_x0: torch.Tensor, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A weight on the x_0 error as a weight on the model's own target's error.

    With x_t = alpha x_0 + sigma eps: ||eps err||^2 = SNR ||x_0 err||^2 and ||v err||^2 = (SNR + 1) ||x_0 err||^2.
    """
    if prediction_type == "epsilon":
        return w_x0 / snr
    if prediction_type == "v_prediction":
        return w_x0 / (snr + 1.0)
    return w_x0  # x_0 target


def min_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weight (Hang et al.): min(SNR, gamma) on the x_0 error."""
    snr = (alpha / sigma) ** 2
    return in_target_space(torch.clamp(snr, max=gamma), snr, prediction_type)


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample truncated-SNR weight (Salimans & Ho, arXiv 2202.00512, Sec. 4): max(SNR, 1) on the x_0 error.

    For an eps model that is 1 where SNR >= 1 and 1 / SNR at higher noise. Plain eps-MSE gives the
    x_0 error at t = 999 on SD's schedule a weight of SNR = 0.005, so a model learns late, if ever, what only the
    first sampling steps decide (where objects go).
    """
    snr = (alpha / sigma) ** 2
    return in_target_space(torch.clamp(snr, min=1.0), snr, prediction_type)


def denoising_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over every non-batch dimension."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)


class SFT(ODESampling, Method):
    config_class = SFTConfig

    def __init__(self, cfg, bundle):
        super().__init__(cfg, bundle)
        student = bundle.denoiser
        if cfg.model.lora.rank == 0:
            student.requires_grad_(True)
        student.train()
        if self.options.weighted and bundle.schedule.kind != "vp":
            raise ValueError(f"sft.min_snr_gamma / sft.truncated_snr weight VP schedules; {bundle.source} is a flow "
                             "model (use sft.timesteps=logit_normal instead)")
        if self.options.timestep_shift != 1.0 and bundle.schedule.kind == "vp":
            raise ValueError(f"sft.timestep_shift shifts flow timesteps; {bundle.source} is a VP model (set "
                             "sft.timestep_shift=1 and use sft.truncated_snr=true for more high-noise weight)")
        self.student = student
        self.text_encoders = {name: trained_text_encoder(bundle, name) for name in self.options.train_text_encoders}
        self.empty_cond = bundle.encode_prompt([""], image_size=self.image_size)  # encoding runs without grad

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        if cfg.data.kind in ("prompts", "text_cache"):
            raise ConfigError(f"{source}: data.kind: sft trains on images; '{cfg.data.kind}' data has none "
                              "(cached latents work: scripts/cache_latents.py, then data.kind=latent_cache)")
        names = cfg.options.train_text_encoders
        if names and cfg.model.lora.rank > 0:
            raise ConfigError(f"{source}: sft.train_text_encoders needs full fine-tuning; LoRA adapts the denoiser "
                              "only (set model.lora.rank=0 or sft.train_text_encoders=[])")
        for name in names:
            if name not in TEXT_ENCODER_NAMES:
                raise ConfigError(f"{source}: sft.train_text_encoders: unknown component {name!r} "
                                  f"(known: {', '.join(TEXT_ENCODER_NAMES)})")

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, **self.text_encoders}

    def encode(self, prompts: list[str]):
        """Conditioning for `prompts` and the empty prompt, with gradients through trained text encoders."""
        if not self.text_encoders:
            return self.bundle.encode_prompt(prompts, image_size=self.image_size), self.empty_cond
        through = {name: self.modules[name] for name in self.text_encoders}
        # The empty prompt moves with the trained encoders, so it is encoded again every step, in the same
        # call: DDP allows one forward of a wrapped module per backward.
        both = self.bundle.encode_prompt([*prompts, ""], image_size=self.image_size, through=through)
        return both[: len(prompts)], both[len(prompts):]

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        bundle, opts = self.bundle, self.options
        device = generator.device
        with phase("encode"):
            x_0 = self.clean_latents(batch, generator).to(device)
            cond, empty = self.encode(batch["prompt"])
        n = x_0.shape[0]
        keep = torch.rand(n, generator=generator, device=device) >= opts.caption_dropout
        cond = cond.where(keep, empty)
        t = sample_timesteps(bundle.schedule, n, opts.timesteps, generator, opts.timestep_shift)
        alpha, sigma = (append_dims(a, x_0.dim()) for a in bundle.schedule.alpha_sigma(t))
        eps = torch.randn(x_0.shape, generator=generator, device=device)
        x_t = alpha * x_0 + sigma * eps
        with phase("student"):
            output = bundle.predict(self.modules["student"], x_t, t, cond).float()
        target = from_x0_eps(x_0, eps, alpha, sigma, bundle.prediction_type)
        loss = denoising_loss(output, target)
        logs = {"loss_denoise": loss.detach().mean()}
        if opts.min_snr_gamma > 0:
            loss = loss * min_snr_weight(alpha.flatten(), sigma.flatten(), opts.min_snr_gamma, bundle.prediction_type)
        if opts.truncated_snr:
            loss = loss * truncated_snr_weight(alpha.flatten(), sigma.flatten(), bundle.prediction_type)
        if opts.lpl.weight > 0:
            x0_hat, _ = to_x0_eps(output, x_t, alpha, sigma, bundle.prediction_type)
            snr = (alpha.flatten() / sigma.flatten()) ** 2
            with phase("lpl"):
                term, lpl_logs = latent_perceptual_loss(bundle.vae, x0_hat, x_0, opts.lpl, t=t, snr=snr)
            loss = loss + opts.lpl.weight * term
            logs.update(lpl_logs)
        if opts.pixel.weight > 0:
            _, eps_hat = to_x0_eps(output, x_t, alpha, sigma, bundle.prediction_type)
            with phase("pixel"):
                term, pix_logs = pixel_loss(bundle.vae, x_0, eps, eps_hat, alpha.flatten(), sigma.flatten(), opts.pixel)
            loss = loss + opts.pixel.weight * term
            logs.update(pix_logs)
        return LossOutput(loss, logs)

    def recommended(self) -> Recommended:
        return Recommended(steps=self.options.sample_steps, guidance=self.options.guidance)
