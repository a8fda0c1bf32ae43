"""Pixel-space loss through the frozen VAE decoder (Zhang et al., arXiv 2409.17565).

Supervised post-training adds to the latent denoising loss a distance between
two decoded *noisy* latents, one rebuilt with the true noise and one with the
predicted noise (the paper's SFT objective):

    L_pixel = mean_{C,H,W} || D(alpha_t z_0 + sigma_t eps) - D(alpha_t z_0 + sigma_t eps_hat) ||^2

D is the full decoder, frozen but differentiated, so the gradient reaches
eps_hat. The first argument is exactly x_t, so its decode needs no gradient.

The paper also tried decoding the x_0-prediction (its Eq. 8) and found the
results blurry. Because x_t = alpha_t z_0_hat + sigma_t eps_hat for every
parameterization, z_0_hat - z_0 = (sigma_t / alpha_t)(eps - eps_hat): the
x_0 variant scales the same latent error by 1/alpha_t, whose variance explodes
at high noise. It is offered as `target="x0"` for comparison, not as a default.

Losses are unweighted and per-sample; the trainer adds `cfg.weight * loss`
(lambda in the paper: 8 for the 0.6B DiT, 2 for the Emu U-Net). The preference
form (SimPO-style on these distances) belongs to the DPO trainer and reuses
`pixel_noise_loss`. For large images, enable the VAE's own gradient
checkpointing (`vae.enable_gradient_checkpointing()`) before training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PixelLossConfig:
    weight: float = field(default=2.0, metadata={"help": "lambda in L = L_latent + lambda * L_pixel "
                                                  "(paper: 8 for DiT-0.6B, 2 for the Emu U-Net)"})
    target: str = field(default="noisy", metadata={"help": "noisy: decode alpha z_0 + sigma eps(_hat) (paper); "
                                                   "x0: decode the x_0-prediction (the paper found it blurry)"})

    def __post_init__(self):
        if self.target not in ("noisy", "x0"):
            raise ValueError(f"pixel_loss.target must be 'noisy' or 'x0', got '{self.target}'")
        if self.weight < 0:
            raise ValueError(f"pixel_loss.weight must be >= 0, got {self.weight}")


def latent_scale(vae, scaling_factor: float | None = None, shift_factor: float | None = None) -> tuple[float, float]:
    """(scale, shift) that map model latents back to the VAE's: z_vae = z / scale + shift."""
    config = getattr(vae, "config", None)
    if scaling_factor is None:
        scaling_factor = getattr(config, "scaling_factor", None)
        if scaling_factor is None:
            raise ValueError("the VAE has no config.scaling_factor; pass scaling_factor= explicitly")
    if shift_factor is None:
        shift_factor = getattr(config, "shift_factor", None) or 0.0
    return float(scaling_factor), float(shift_factor)


def decode_scaled(vae, z: torch.Tensor, scaling_factor: float | None = None,
                  shift_factor: float | None = None) -> torch.Tensor:
    """Model-space latents -> images. `vae` is an AutoencoderKL or a bare decoder module."""
    scale, shift = latent_scale(vae, scaling_factor, shift_factor)
    z = z / scale + shift
    if hasattr(vae, "decode"):
        return vae.decode(z.to(getattr(vae, "dtype", z.dtype))).sample
    return vae(z)


def _append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    a = torch.as_tensor(a)
    return a.reshape(a.shape + (1,) * (ndim - a.dim())) if a.dim() < ndim else a


def _per_sample_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).square().flatten(1).mean(1)


def pixel_noise_loss(vae, z_0: torch.Tensor, eps: torch.Tensor, eps_hat: torch.Tensor, alpha_t: torch.Tensor,
                     sigma_t: torch.Tensor, **scale_kwargs) -> tuple[torch.Tensor, dict]:
    """Paper's SFT pixel term, per sample [B]; alpha_t/sigma_t are [B] or broadcastable to z_0."""
    alpha_t, sigma_t = _append_dims(alpha_t, z_0.dim()), _append_dims(sigma_t, z_0.dim())
    with torch.no_grad():
        image = decode_scaled(vae, alpha_t * z_0 + sigma_t * eps, **scale_kwargs)
    image_hat = decode_scaled(vae, alpha_t * z_0 + sigma_t * eps_hat, **scale_kwargs)
    loss = _per_sample_mse(image_hat, image)
    return loss, {"pixel/mse": loss.detach().mean()}


def pixel_x0_loss(vae, z_0: torch.Tensor, z_0_hat: torch.Tensor, **scale_kwargs) -> tuple[torch.Tensor, dict]:
    """The variant the paper rejects: mean_{C,H,W} ||D(z_0) - D(z_0_hat)||^2 per sample [B]."""
    with torch.no_grad():
        image = decode_scaled(vae, z_0, **scale_kwargs)
    loss = _per_sample_mse(decode_scaled(vae, z_0_hat, **scale_kwargs), image)
    return loss, {"pixel/mse": loss.detach().mean()}


def pixel_loss(vae, z_0: torch.Tensor, eps: torch.Tensor, eps_hat: torch.Tensor, alpha_t: torch.Tensor,
               sigma_t: torch.Tensor, cfg: PixelLossConfig, **scale_kwargs) -> tuple[torch.Tensor, dict]:
    """Dispatch on `cfg.target`; unweighted per-sample loss [B] and detached logs."""
    if cfg.target == "noisy":
        return pixel_noise_loss(vae, z_0, eps, eps_hat, alpha_t, sigma_t, **scale_kwargs)
    alpha, sigma = _append_dims(alpha_t, z_0.dim()), _append_dims(sigma_t, z_0.dim())
    # z_0_hat = (x_t - sigma eps_hat) / alpha with x_t = alpha z_0 + sigma eps; alpha -> 0 (pure noise
    # in flow models) blows up, which is the paper's point, so guard only against division by zero.
    z_0_hat = z_0 + sigma / alpha.clamp_min(1e-4) * (eps - eps_hat)
    return pixel_x0_loss(vae, z_0, z_0_hat, **scale_kwargs)
