"""The toy world's AutoencoderKL: build, train on renders, and measure what it keeps.

The teachers denoise VAE latents, so a generated image can only be as right
as the VAE's decoder lets it be. The number that decides the VAE is the exact
checker's pass rate on its reconstructions of real renders (docs/toy_world.md
explains why a 4x down-up proxy alone would lose ~30%).

Loss: mean squared error on [-1, 1] pixels plus a tiny KL to N(0, I)
(weight 1e-6, the LDM recipe's order, arXiv 2112.10752): the KL only keeps the
posterior variance from collapsing to zero; the latent scale is fixed
afterwards by `scaling_factor = 1 / std(latents)`, as SD does. The shift is
0.0 (not None) because StableDiffusion3Pipeline adds `shift_factor` when
decoding and fails on None; StableDiffusionPipeline ignores it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import AutoencoderKL

from .checker import pass_rate
from .world import ToyDataset

KL_WEIGHT = 1e-6


@dataclass(frozen=True)
class VAESpec:
    """Architecture: len(channels) - 1 halvings, so factor = 2 ** (len(channels) - 1)."""

    channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 16

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


def build_vae(spec: VAESpec, resolution: int = 32, seed: int = 0) -> AutoencoderKL:
    """An untrained AutoencoderKL of `spec` (init seeded without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=spec.latent_channels, block_out_channels=spec.channels,
            down_block_types=("DownEncoderBlock2D",) * len(spec.channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.channels), layers_per_block=spec.layers_per_block,
            norm_num_groups=spec.norm_groups, sample_size=resolution, scaling_factor=1.0, shift_factor=0.0,
        )


def render_pool(split: str, size: int, seed: int, resolution: int = 32) -> tuple[torch.Tensor, list[str]]:
    """All items of ToyDataset(split, size, seed) as one [N, 3, H, W] tensor in [-1, 1] and their captions."""
    data = ToyDataset(split, size, seed, resolution)
    items = [data[i] for i in range(size)]
    return torch.stack([it["pixel_values"] for it in items]), [it["prompt"] for it in items]


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Per-sample MSE(x, decode(z)) + KL_WEIGHT * KL(q(z|x) || N(0, I)), z sampled from the posterior."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator)
    x_hat = vae.decode(z).sample
    mse = (x_hat - x).pow(2).flatten(1).mean(1)
    kl = posterior.kl() / x[0].numel()  # diffusers sums the KL over latent elements; per pixel value here
    return mse + KL_WEIGHT * kl, {"mse": mse.detach().mean(), "kl": kl.detach().mean()}


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 1e-3,
              seed: int = 0, log: Callable[[str], None] = print, log_every: int = 100) -> AutoencoderKL:
    """Adam with cosine decay on random batches of `images` (a pre-rendered pool)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        loss, logs = vae_loss(vae, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"  vae step {step + 1}/{steps}  mse {logs['mse']:.5f}  kl {logs['kl']:.3f}  "
                f"({(step + 1) / (time.perf_counter() - start):.2f} steps/s)")
    return vae.eval()


@torch.no_grad()
def encode_mean(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unscaled posterior means of `images`."""
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """decode(mean encode(x)), clamped to [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(images[i:i + batch_size]).latent_dist.mean).sample.clamp(-1, 1)
                      for i in range(0, len(images), batch_size)])


def latent_std(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Standard deviation of all unscaled latent values: scaling_factor is its inverse."""
    return float(encode_mean(vae, images).std())


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), over the whole set."""
    mse = float((x.double() - y.double()).pow(2).mean())
    return 10 * math.log10(4.0 / mse)


def reconstruction_report(vae: AutoencoderKL, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Checker pass rate on reconstructions (and on the originals, for reference) and PSNR."""
    recon = reconstruct(vae, images)
    return {"recon_pass_rate": pass_rate(recon, captions), "real_pass_rate": pass_rate(images, captions),
            "psnr_db": psnr(recon, images)}
