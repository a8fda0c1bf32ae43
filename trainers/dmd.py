"""Loss terms of distribution-matching distillation with a fake score and a discriminator.

DMD (Yin et al., arXiv 2311.18784), DMD2 (Yin et al., arXiv 2405.14867) and f-distill (Xu et al.,
arXiv 2502.15681). All terms are pure and per-sample ([B]); x_0 tensors are [B, C, H, W] latents.

Generator (one step, G = G_theta(z)), at x_t = alpha_t G + sigma_t eps:

    grad   = (x0_fake(x_t) - x0_teacher(x_t)) * w_dmd * h                   (f-distill Eq. 8 in x_0 space)
    w_dmd  = 1 / mean_{C,H,W} |G - x0_teacher|                               (DMD Eq. 8 normaliser)
    L_dm   = 1/2 mean_{C,H,W} (G - sg(G - grad))^2,  so  dL_dm/dG = grad / (C H W)

A gradient step therefore moves G along x0_teacher - x0_fake: towards the teacher's denoised
estimate and away from the fake score's.

Discriminator (logit l, real = data side), non-saturating GAN (DMD2 Sec. 4.2):

    L_D = softplus(l_fake) + softplus(-l_real),     L_G,gan = softplus(-l_fake)

Approximate R1 (APT, Lin et al., arXiv 2501.08316): instead of the input-gradient norm, penalise the
change of the real logit under a small input perturbation, (l(x) - l(x + s n))^2 with s = 0.1.

Fake score: x_0-space denoising regression on the stopped generator output, (x0_fake - sg(G))^2.

Also here: the discriminator head and the pieces that feed it (the bottleneck features of a denoiser,
captured by a forward hook) and `DetachedParams`, which runs a trained network as a frozen function of
its input (the generator's view of the fake score and the head).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pipelines.backbones import unwrap_model


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def dmd_normaliser(x_0: Tensor, x0_teacher: Tensor) -> Tensor:
    """w_dmd = 1 / mean |G - x0_teacher| per sample, shaped [B, 1, ..., 1] (no gradient)."""
    scale = _per_sample_mean((x_0.detach().float() - x0_teacher.float()).abs()).clamp(min=1e-12)
    return (1.0 / scale).reshape(-1, *([1] * (x_0.dim() - 1)))


def distribution_matching_loss(x_0: Tensor, x0_teacher: Tensor, x0_fake: Tensor,
                               weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(per-sample L_dm, the detached update direction `grad`); `weight` [B] is h(r) / mean h(r)."""
    grad = (x0_fake.float() - x0_teacher.float()) * dmd_normaliser(x_0, x0_teacher)
    if weight is not None:
        grad = grad * weight.reshape(-1, *([1] * (x_0.dim() - 1))).float()
    grad = torch.nan_to_num(grad.detach())
    target = (x_0.float() - grad).detach()
    return 0.5 * _per_sample_mean((x_0.float() - target) ** 2), grad


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator term softplus(-l) = -log sigmoid(l)."""
    return F.softplus(-logits_fake.float())


def gan_discriminator_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """softplus(l_fake) + softplus(-l_real) = -log(1 - sigmoid(l_fake)) - log sigmoid(l_real)."""
    return F.softplus(logits_fake.float()) + F.softplus(-logits_real.float())


def approximate_r1(logits_real: Tensor, logits_perturbed: Tensor) -> Tensor:
    """(l(x) - l(x + s n))^2: finite-difference stand-in for the R1 penalty s^2 |grad_x l|^2 (APT)."""
    return (logits_real.float() - logits_perturbed.float()) ** 2


def fake_score_loss(x0_fake: Tensor, x_0: Tensor) -> Tensor:
    """x_0-space denoising regression of the fake score on the (stopped) generator samples."""
    return _per_sample_mean((x0_fake.float() - x_0.detach().float()) ** 2)


# ---------------------------------------------------------------- discriminator


def bottleneck_layer(denoiser: nn.Module) -> nn.Module:
    """The layer whose output the head reads: a UNet's mid block, else the middle transformer block."""
    denoiser = unwrap_model(denoiser)
    if getattr(denoiser, "mid_block", None) is not None:
        return denoiser.mid_block
    blocks = getattr(denoiser, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"no bottleneck found in {type(denoiser).__name__}: it has neither mid_block nor "
                         "transformer_blocks")
    return blocks[len(blocks) // 2]


def bottleneck_width(denoiser: nn.Module) -> int:
    config = unwrap_model(denoiser).config
    if "block_out_channels" in config:
        return int(config["block_out_channels"][-1])
    return int(config["num_attention_heads"] * config["attention_head_dim"])


@contextlib.contextmanager
def capture_bottleneck(denoiser: nn.Module):
    """Yields a list that receives the bottleneck output of the next forward call of `denoiser`."""
    store: list[torch.Tensor] = []

    def hook(module, inputs, output):
        if not store:  # a recomputation under gradient checkpointing must not replace the first capture
            store.append(output[-1] if isinstance(output, tuple) else output)

    handle = bottleneck_layer(denoiser).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class DiscriminatorHead(nn.Module):
    """Logit per sample from bottleneck features: [B, C, H, W] maps (conv) or [B, N, C] tokens (MLP).

    Also holds the per-time-bin EMA of the density ratio, so it is checkpointed with the head.
    """

    def __init__(self, channels: int, hidden: int, spatial: bool, num_bins: int):
        super().__init__()
        self.spatial = spatial
        if spatial:
            groups = math.gcd(32, hidden)
            self.body = nn.Sequential(
                nn.Conv2d(channels, hidden, 4, stride=2, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU(),
                nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU())
        else:
            self.body = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 1)
        self.register_buffer("ratio_ema", torch.ones(num_bins))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.body(features.float())
        pooled = h.mean(dim=(2, 3)) if self.spatial else h.mean(dim=1)
        return self.out(pooled).squeeze(1)


class DetachedParams(nn.Module):
    """Calls `module` with its parameters detached: gradients reach the inputs only.

    `unwrap_model` sees through it (`.module`), so `Bundle.predict` still finds the right dtype and keywords.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = unwrap_model(module)

    def forward(self, *args, **kwargs):
        params = {name: p.detach() for name, p in self.module.named_parameters()}
        # Gradient checkpointing would recompute in the backward pass with the live parameters, which
        # differ from the detached ones it saved; this call's graph (inputs only) is kept whole instead.
        flagged = [m for m in self.module.modules() if getattr(m, "gradient_checkpointing", False) is True]
        for m in flagged:
            m.gradient_checkpointing = False
        try:
            return functional_call(self.module, params, args, kwargs)
        finally:
            for m in flagged:
                m.gradient_checkpointing = True
