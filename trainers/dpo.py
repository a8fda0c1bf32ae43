"""Diffusion-DPO and its variants: one trainer, the loss chosen by `dpo.loss`.

Papers (the maths is in `trainers/preference_losses.py`, one pure function each):

* dpo: Diffusion-DPO, Wallace et al., arXiv 2311.12908, Eq. 14:
      L = -log sigmoid(-(beta/2) [(L_w - Lref_w) - (L_l - Lref_l)]),
  L_* = mean_{C,H,W} ||f(x_t^*, t, c) - target^*||^2 in the model's own parameterization
  (eps, v or flow velocity), x_t^* = alpha_t x_0^* + sigma_t eps.
* kto: Diffusion-KTO, Li et al., arXiv 2406.04314: lambda_y (1 - sigmoid(y beta (Lref - L - z_0)))
  on unpaired images labelled y = +1 / -1, z_0 = max(mean over the global batch of Lref - L, 0).
* mapo: MaPO, Hong et al., arXiv 2406.06424: reference-free,
      L_w - beta_m log sigmoid(T [phi(a L_w) - phi(a L_l)]),  phi(x) = x / (e^x - 1).
* simpo: the reference-free SimPO-style loss of Pixel-Space Post-Training, Zhang et al.,
  arXiv 2409.17565, Eq. 5: -log sigmoid(-(beta/2)(L_w - L_l)).
* dspo: DSPO, Zhu et al., ICLR 2025 (OpenReview DomBynQsqt; arXiv id unknown), the official
  SD1.5 code's score-matching form ||(f_w - target_w) - lambda (1 - sigmoid(u)) (f_w - fref_w)||^2.
* adaptive: Adaptive-DPO, Zhang et al., arXiv 2503.16921 (reconstructed, see below).
* `dpo.pixel` (dpo and simpo): the preference form of Pixel-Space Post-Training (arXiv
  2409.17565, Sec. 3): the same loss again on pixel distances
  P = mean ||D(alpha z_0 + sigma eps) - D(alpha z_0 + sigma eps_hat)||^2 through the frozen VAE
  decoder D, added as L_latent + mu L_pixel.

Deliberate choices and deviations:

* One beta in the official -beta/2 convention (DiffusionDPO `train.py`, beta = 5000 default,
  2000 for SD1.5) for every loss built on that logit (dpo, simpo, dspo, adaptive). The diffusers
  SD1.5 script's `beta * [(Lref_w - Lref_l) - (L_w - L_l)]` with 2500 is the same as 5000 here;
  the Pixel-space paper's Eq. 5 beta is half of ours. KTO and MaPO keep their papers' constants.
* The two images of a pair share t, eps and (dropped or not) caption, as in every official script.
* Ties in Pick-a-Pic are dropped by default (`pickapic`), as the official code does; the diffusers
  scripts keep them (`pickapic_with_ties`, jpg_0 as winner). See `trainers/preference_data.py`.
* ORPO: diffusers' Diffusion-ORPO puts L_w - L_l inside the sigmoid with a + sign, which rewards
  a *worse* winner. It is not offered; MaPO is its corrected, published form, and its direction
  is tested (tests/test_dpo_losses.py).
* DSPO: the SD1.5 code passes one `beta_dpo` (0.001) as both the logit's beta and lambda; in
  this trainer's beta units (thousands) that tie would make lambda thousands, so lambda
  (`dspo.weight`) is its own option, default 0.5, and must stay below 1. Why: for a fixed
  s = 1 - sigmoid(u) the loss ||(f - target) - lambda s (f - fref)||^2 is minimised at
  f = (target - lambda s fref) / (1 - lambda s), a step beyond the target away from the
  reference; at lambda s = 1 no minimiser exists and above it the minimiser moves *away* from
  the target. With s in (0, 1), lambda < 1 keeps it well defined. The official 0.001 is allowed
  (it is nearly plain SFT on the winners). The SDXL branch of that code (no MSE term, a switch
  on ||f - fref||^2 >= 0.1) is ad hoc and is not reproduced. Any parameterization is accepted;
  the paper's code asserts eps.
* KTO: the paper's sampler draws desirable images with probability 0.8; here the data order is
  uniform (exact resume needs a fixed index stream) and `kto.lambda_desirable` /
  `kto.lambda_undesirable` reweight instead, as in KTO (arXiv 2402.01306).
* Adaptive-DPO: no code is public and the loss constants of its Eq. 15 could not be read, so the
  published description is rebuilt as follows. "Annotators" are K independent (t, eps) draws of
  the same pair under the current policy (the paper's annotators are models, not people; K draws
  are the cheapest stand-in that is computed online, as its Algorithm 1 asks). With
  p_k = sigmoid(u_k): intra-annotator confidence c = mean_k p_k, inter-annotator stability
  s = std_k p_k, metric m = (1 - c) + kappa s (high = likely minority). Weight W = exp(-k_1 m)
  (down-weights minority pairs), margin Gamma = k_2 max(c_2 - m, 0) (smaller m, larger margin);
  L = -W mean_k log sigmoid(u_k - Gamma), W and Gamma from the detached m. k_1 = k_2 = 0 is DPO.
* Reference: a frozen copy of the initial denoiser, or (LoRA) the policy with its adapters
  switched off under no_grad, which saves a full denoiser of memory. MaPO and SimPO use none.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

import trainers.preference_data  # noqa: F401  (registers the preference data kinds)
from pipelines.backbones import adapters_disabled
from pipelines.conditioning import Conditioning
from pipelines.schedules import append_dims, from_x0_eps, to_x0_eps
from trainers import preference_losses as pl
from trainers.losses.pixel import pixel_noise_loss
from trainers.method import LossOutput, Method, ODESampling, Recommended
from trainers.preference_data import LABELLED_KINDS, PAIRED_KINDS
from trainers.profiling import phase
from trainers.sft import denoising_loss
from trainers.strict import ConfigError, field
from trainers.timesteps import sample_timesteps


@dataclass
class KTOOptions:
    beta: float = field(1000.0, "KTO beta in sigmoid(y beta (Lref - L - z_0)) (Diffusion-KTO default)")
    lambda_desirable: float = field(1.0, "weight of desirable (+1) images")
    lambda_undesirable: float = field(1.0, "weight of undesirable (-1) images")


@dataclass
class MaPOOptions:
    beta: float = field(0.1, "beta_m, weight of the margin term (MaPO default 0.1)")
    snr_value: float = field(0.5, "a in phi(a L) (MaPO `snr_value`)")
    num_timesteps: int = field(1000, "T multiplying the margin (MaPO: the scheduler's num_train_timesteps)")


@dataclass
class DSPOOptions:
    weight: float = field(0.5, "lambda in ||(f - target) - lambda (1 - sigmoid(u)) (f - f_ref)||^2; in [0, 1)")

    def __post_init__(self):
        if not 0.0 <= self.weight < 1.0:
            raise ValueError(f"dspo.weight (lambda) must be in [0, 1), got {self.weight}: at lambda (1 - sigmoid(u)) "
                             f">= 1 the winner's target moves away from the data")


@dataclass
class AdaptiveOptions:
    draws: int = field(2, "K noise draws per pair that act as annotators (cost: K times the forward passes)")
    k_1: float = field(1.0, "weight sharpness: W = exp(-k_1 m)")
    k_2: float = field(2.0, "margin scale: Gamma = k_2 max(c_2 - m, 0)")
    c_2: float = field(0.5, "metric below which a pair gets a margin (m = 0.5 for an undecided pair)")
    stability_weight: float = field(1.0, "kappa in m = (1 - confidence) + kappa * std")

    def __post_init__(self):
        if self.draws < 1 or self.k_1 < 0 or self.k_2 < 0:
            raise ValueError(f"adaptive needs draws >= 1, k_1 >= 0, k_2 >= 0; got {self.draws}, {self.k_1}, {self.k_2}")


@dataclass
class PreferencePixelOptions:
    weight: float = field(0.0, "mu in L_latent + mu L_pixel (paper: 8 for DiT-0.6B, 2 for the Emu U-Net); 0 disables")
    beta: Optional[float] = field(None, "beta of the pixel term in the -beta/2 convention; null = dpo.beta")


LossName = Literal["dpo", "kto", "mapo", "simpo", "dspo", "adaptive"]


@dataclass
class DPOConfig:
    loss: LossName = field("dpo", "dpo | kto | mapo | simpo | dspo | adaptive")
    beta: float = field(5000.0, "beta in the official -beta/2 convention (dpo, simpo, dspo, adaptive); "
                                "paper: 2000 SD1.5, 5000 SDXL")
    reference: Literal["auto", "copy", "adapters_off"] = field(
        "auto", "frozen copy of the initial denoiser, or the LoRA policy with adapters off; auto picks by model.lora")
    caption_dropout: float = field(0.2, "probability a pair trains on the empty prompt (official DPO: 0.2)")
    timesteps: Literal["uniform", "logit_normal"] = field("uniform", "training-time distribution")
    kto: KTOOptions = field(KTOOptions(), "loss: kto")
    mapo: MaPOOptions = field(MaPOOptions(), "loss: mapo")
    dspo: DSPOOptions = field(DSPOOptions(), "loss: dspo")
    adaptive: AdaptiveOptions = field(AdaptiveOptions(), "loss: adaptive")
    pixel: PreferencePixelOptions = field(PreferencePixelOptions(), "pixel-space preference term (dpo, simpo)")
    sample_steps: int = field(25, "steps of the validation sampler and the recommended steps of the export")
    guidance: float = field(7.5, "CFG scale of validation and the recommended guidance of the export")

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.pixel.weight > 0 and self.loss not in ("dpo", "simpo"):
            raise ValueError(f"pixel.weight > 0 is defined for loss dpo or simpo, not {self.loss!r}")


REFERENCE_FREE = ("mapo", "simpo")


@dataclass
class PairErrors:
    """Per-sample errors of K draws of B pairs ([K, B]); winners' output-space tensors of draw 0 for DSPO."""

    model_w: torch.Tensor
    model_l: torch.Tensor
    ref_w: Optional[torch.Tensor] = None
    ref_l: Optional[torch.Tensor] = None
    residual_w: Optional[torch.Tensor] = None
    gap_w: Optional[torch.Tensor] = None


PairLoss = Callable[[PairErrors, DPOConfig, float], tuple]

# The registry of paired losses: name -> how it reads the errors. KTO (unpaired) is `kto_step`.
PAIR_LOSSES: dict[str, PairLoss] = {
    "dpo": lambda e, o, beta: pl.dpo_loss(e.model_w[0], e.model_l[0], e.ref_w[0], e.ref_l[0], beta),
    "simpo": lambda e, o, beta: pl.simpo_loss(e.model_w[0], e.model_l[0], beta),
    "mapo": lambda e, o, beta: pl.mapo_loss(e.model_w[0], e.model_l[0], o.mapo.beta, o.mapo.snr_value,
                                            o.mapo.num_timesteps),
    "dspo": lambda e, o, beta: pl.dspo_loss(e.residual_w, e.gap_w, e.model_w[0], e.model_l[0], e.ref_w[0],
                                            e.ref_l[0], beta, o.dspo.weight),
    "adaptive": lambda e, o, beta: pl.adaptive_dpo_loss(e.model_w, e.model_l, e.ref_w, e.ref_l, beta, o.adaptive.k_1,
                                                        o.adaptive.k_2, o.adaptive.c_2, o.adaptive.stability_weight),
}


def reference_mode(opts: DPOConfig, lora_rank: int) -> str:
    """'none' (reference-free losses), 'copy' or 'adapters_off'."""
    if opts.loss in REFERENCE_FREE:
        return "none"
    if opts.reference == "auto":
        return "adapters_off" if lora_rank > 0 else "copy"
    return opts.reference


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over this batch and every process (KTO's z_0), without gradient."""
    total = torch.stack([x.detach().float().sum(), torch.tensor(float(x.numel()), device=x.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total[0] / total[1]


class DPO(ODESampling, Method):
    config_class = DPOConfig

    def __init__(self, cfg, bundle):
        super().__init__(cfg, bundle)
        policy = bundle.denoiser
        if cfg.model.lora.rank == 0:
            policy.requires_grad_(True)
        self.reference_mode = reference_mode(self.options, cfg.model.lora.rank)
        # Copied before training starts, so it is the initial model; never prepared, never stepped.
        self.reference = copy.deepcopy(policy).requires_grad_(False).eval() if self.reference_mode == "copy" else None
        policy.train()
        self.policy = policy
        with torch.no_grad():
            self.empty_cond = bundle.encode_prompt([""], image_size=self.image_size)

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        opts = cfg.options
        kinds = LABELLED_KINDS if opts.loss == "kto" else PAIRED_KINDS
        if cfg.data.kind not in kinds:
            layout = "labelled (+1/-1) images" if opts.loss == "kto" else "preference pairs"
            raise ConfigError(f"{source}: data.kind: dpo.loss {opts.loss!r} needs {layout} "
                              f"({', '.join(kinds)}), got {cfg.data.kind!r}")
        if opts.reference == "adapters_off" and cfg.model.lora.rank == 0:
            raise ConfigError(f"{source}: dpo.reference: 'adapters_off' needs LoRA (model.lora.rank > 0); "
                              "use 'copy' or 'auto' for full fine-tuning")

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {"student": self.policy}

    # ---- shared pieces -----------------------------------------------------------------
    def _condition(self, prompts: list[str], generator: torch.Generator) -> Conditioning:
        cond = self.bundle.encode_prompt(list(prompts), image_size=self.image_size)
        keep = torch.rand(len(prompts), generator=generator, device=generator.device) >= self.options.caption_dropout
        return cond.where(keep, self.empty_cond)

    @torch.no_grad()
    def _reference_output(self, x_t, t, cond) -> torch.Tensor:
        if self.reference_mode == "copy":
            return self.bundle.predict(self.reference, x_t, t, cond).float()
        with adapters_disabled(self.modules["student"]) as base:  # unwrapped: no DDP hooks without grad
            return self.bundle.predict(base, x_t, t, cond).float()

    def _denoise(self, x_0, eps, t, cond):
        """(x_t, alpha, sigma, policy output, target, reference output or None)."""
        bundle = self.bundle
        alpha, sigma = (append_dims(a, x_0.dim()) for a in bundle.schedule.alpha_sigma(t))
        x_t = alpha * x_0 + sigma * eps
        with phase("student"):
            output = bundle.predict(self.modules["student"], x_t, t, cond).float()
        target = from_x0_eps(x_0, eps, alpha, sigma, bundle.prediction_type)
        with phase("reference"):
            ref = None if self.reference_mode == "none" else self._reference_output(x_t, t, cond)
        return x_t, alpha, sigma, output, target, ref

    def _pixel_errors(self, x_0, eps, x_t, alpha, sigma, output) -> torch.Tensor:
        _, eps_hat = to_x0_eps(output, x_t, alpha, sigma, self.bundle.prediction_type)
        errors, _ = pixel_noise_loss(self.bundle.vae, x_0, eps, eps_hat, alpha.flatten(), sigma.flatten())
        return errors

    # ---- losses -------------------------------------------------------------------------
    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        if self.options.loss == "kto":
            return self.kto_step(batch, generator)
        return self.pair_step(batch, generator)

    def pair_step(self, batch: dict, generator: torch.Generator) -> LossOutput:
        opts, bundle, device = self.options, self.bundle, generator.device
        n = len(batch["prompt"])
        k = opts.adaptive.draws if opts.loss == "adaptive" else 1
        with torch.no_grad(), phase("encode"):
            pixels = torch.cat([batch["pixel_values_w"], batch["pixel_values_l"]]).to(device)
            latents = bundle.encode_images(pixels, generator).float()  # [2B]: winners, then losers
            cond = self._condition(batch["prompt"], generator)
        # K draws, each [winners; losers] with one t and one eps per pair.
        x_0 = latents.repeat(k, *([1] * (latents.dim() - 1)))
        t = sample_timesteps(bundle.schedule, k * n, opts.timesteps, generator).reshape(k, 1, n).expand(k, 2, n)
        eps = torch.randn((k, 1, n, *latents.shape[1:]), generator=generator, device=device)
        eps = eps.expand(k, 2, *eps.shape[2:]).reshape(x_0.shape)
        cond = Conditioning.cat([cond] * (2 * k))
        x_t, alpha, sigma, output, target, ref = self._denoise(x_0, eps, t.reshape(-1), cond)
        errors = self._pair_errors(denoising_loss(output, target), None if ref is None else denoising_loss(ref, target),
                                   k, n)
        if opts.loss == "dspo":
            errors.residual_w = (output - target)[:n]
            errors.gap_w = (output - ref)[:n]
        loss, logs = PAIR_LOSSES[opts.loss](errors, opts, opts.beta)
        if "flipped" in batch:
            logs.update(self._flip_logs(errors, torch.as_tensor(batch["flipped"], dtype=torch.bool)))
        if opts.pixel.weight > 0:
            model_pix = self._pixel_errors(x_0, eps, x_t, alpha, sigma, output)
            with torch.no_grad():
                ref_pix = None if ref is None else self._pixel_errors(x_0, eps, x_t, alpha, sigma, ref)
            pix_errors = self._pair_errors(model_pix, ref_pix, k, n)
            pix_loss, pix_logs = PAIR_LOSSES[opts.loss](pix_errors, opts, opts.pixel.beta or opts.beta)
            loss = loss + opts.pixel.weight * pix_loss
            logs.update({f"pixel/{key}": v for key, v in pix_logs.items()})
        return LossOutput(loss, logs)

    def _flip_logs(self, e: PairErrors, flipped: torch.Tensor) -> dict[str, torch.Tensor]:
        """With `data.flip_labels`: implicit accuracy (and Adaptive-DPO's m, W, Gamma) on corrupted vs
        clean pairs, to see whether a loss learns the flipped labels or discounts them."""
        opts = self.options
        # Reference-free losses: the same logit with the reference term zero.
        ref_w, ref_l = (e.ref_w, e.ref_l) if e.ref_w is not None else (0.0, 0.0)
        u = pl.dpo_logit(e.model_w, e.model_l, ref_w, ref_l, opts.beta)
        per_pair = {}
        if opts.loss == "adaptive":
            a = opts.adaptive
            m = pl.adaptive_metric(u, a.stability_weight)
            per_pair = {"adaptive_metric": m, "adaptive_weight": pl.adaptive_weight(m, a.k_1),
                        "adaptive_margin": pl.adaptive_margin(m, a.k_2, a.c_2)}
        return pl.flip_split_logs(u, flipped, per_pair)

    @staticmethod
    def _pair_errors(model: torch.Tensor, ref: Optional[torch.Tensor], k: int, n: int) -> PairErrors:
        model = model.reshape(k, 2, n)
        ref = None if ref is None else ref.reshape(k, 2, n)
        if ref is None:
            return PairErrors(model[:, 0], model[:, 1])
        return PairErrors(model[:, 0], model[:, 1], ref[:, 0], ref[:, 1])

    def kto_step(self, batch: dict, generator: torch.Generator) -> LossOutput:
        opts, bundle, device = self.options, self.bundle, generator.device
        with torch.no_grad(), phase("encode"):
            x_0 = bundle.encode_images(batch["pixel_values"].to(device), generator).float()
            cond = self._condition(batch["prompt"], generator)
        t = sample_timesteps(bundle.schedule, x_0.shape[0], opts.timesteps, generator)
        eps = torch.randn(x_0.shape, generator=generator, device=device)
        _, _, _, output, target, ref = self._denoise(x_0, eps, t, cond)
        model_err, ref_err = denoising_loss(output, target), denoising_loss(ref, target)
        z_0 = pl.kto_reference_point(global_mean(ref_err - model_err))
        label = batch["label"].to(device=device, dtype=model_err.dtype)
        loss, logs = pl.kto_loss(model_err, ref_err, label, opts.kto.beta, z_0, opts.kto.lambda_desirable,
                                 opts.kto.lambda_undesirable)
        return LossOutput(loss, logs)

    # ---- sampling and export ------------------------------------------------------------
    def recommended(self) -> Recommended:
        return Recommended(steps=self.options.sample_steps, guidance=self.options.guidance)

