"""Preference losses for diffusion models: pure functions of per-sample denoising errors.

Every function here takes the per-sample errors L = mean_{C,H,W} ||f(x_t, t, c) - target||^2
of the policy (`model_*`) and, where the method has one, of the frozen reference
(`ref_*`), computed with the same t and eps for both images of a pair, and returns
an unreduced loss per pair (or per image, for KTO) plus a dict of detached logs.
The trainer (`trainers/dpo.py`) picks one by name; the papers, equations and
deviations are listed in its docstring.

One beta, one convention. Losses built on the Diffusion-DPO logit

    u = -(beta / 2) * [(L_w - L_l) - (Lref_w - Lref_l)]              (arXiv 2311.12908, Eq. 14)

(dpo, simpo, dspo, adaptive) take beta in this official -beta/2 form, so one value
means one logit scale across them; SimPO-style is the same logit with the reference
terms set to zero, so the Pixel-space paper's beta (its Eq. 5) is beta / 2 here.
KTO and MaPO keep their own papers' constants (`kto_loss`, `mapo_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_logit(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """u = -(beta/2) [(L_w - L_l) - (Lref_w - Lref_l)]; u > 0 when the policy favours the winner more than the reference."""
    return -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))


def pair_logs(u: Tensor, model_w: Tensor, model_l: Tensor, ref_w: Tensor | None = None,
              ref_l: Tensor | None = None) -> dict[str, Tensor]:
    """Implicit accuracy (fraction with u > 0), the logit, and policy / reference errors."""
    logs = {"implicit_acc": (u > 0).float().mean(), "logit": u.mean(),
            "model_mse_w": model_w.mean(), "model_mse_l": model_l.mean()}
    if ref_w is not None and ref_l is not None:
        logs.update({"ref_mse_w": ref_w.mean(), "ref_mse_l": ref_l.mean(),
                     "model_minus_ref_w": (model_w - ref_w).mean(), "model_minus_ref_l": (model_l - ref_l).mean()})
    return {k: v.detach() for k, v in logs.items()}


def flip_split_logs(u: Tensor, flipped: Tensor, per_pair: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Implicit accuracy of K draws of the logit u [K, B], and the mean of each per-pair quantity
    in `per_pair` ([B] each, e.g. Adaptive-DPO's weight), split into pairs whose label was corrupted
    (`flipped` [B], bool, on the CPU) and clean ones. A group absent from the batch is left out, not logged
    as NaN. Means are masked sums over host-side counts, so a GPU step gains no host sync.
    """
    u = u.detach().reshape(-1, u.shape[-1])
    logs = {}
    for name, mask in (("flipped", flipped), ("clean", ~flipped)):
        count = int(mask.sum())
        if count:
            w = mask.to(device=u.device, dtype=u.dtype)
            logs[f"{name}/implicit_acc"] = ((u > 0).to(u.dtype) * w).sum() / (count * u.shape[0])
            logs.update({f"{name}/{key}": (v.detach() * w).sum() / count for key, v in (per_pair or {}).items()})
    return logs


def dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor,
             beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO (Eq. 14): -log sigmoid(u), per pair."""
    u = dpo_logit(model_w, model_l, ref_w, ref_l, beta)
    return -F.logsigmoid(u), pair_logs(u, model_w, model_l, ref_w, ref_l)


def simpo_loss(model_w: Tensor, model_l: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference-free SimPO-style loss (arXiv 2409.17565, Eq. 5): -log sigmoid(-(beta/2)(L_w - L_l))."""
    u = -0.5 * beta * (model_w - model_l)
    return -F.logsigmoid(u), pair_logs(u, model_w, model_l)


def mapo_link(x: Tensor) -> Tensor:
    """phi(x) = x / (e^x - 1), with its limit 1 at x = 0; decreasing in x."""
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - 0.5 * x, safe / torch.expm1(safe))


def mapo_loss(model_w: Tensor, model_l: Tensor, beta: float, snr_value: float = 0.5,
              num_timesteps: int = 1000) -> tuple[Tensor, dict[str, Tensor]]:
    """MaPO (arXiv 2406.06424; code `utils.compute_loss`), reference-free, per pair:

        L_w - beta * log sigmoid(T * [phi(a L_w) - phi(a L_l)])

    with a = `snr_value`, T = `num_timesteps`. phi decreases, so the margin term pushes
    L_w down and L_l up; the first term is plain denoising on the winners.
    """
    margin = num_timesteps * (mapo_link(snr_value * model_w) - mapo_link(snr_value * model_l))
    ratio = F.logsigmoid(margin)
    logs = pair_logs(margin, model_w, model_l)
    logs["log_odds_ratio"] = ratio.detach().mean()
    return model_w - beta * ratio, logs


def dspo_loss(residual_w: Tensor, gap_w: Tensor, model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor,
              beta: float, weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """DSPO score-matching form (ICLR 2025; official SD1.5 code), per pair:

        mean_{C,H,W} || (f_w - target_w) - lambda * (1 - sigmoid(u)) * (f_w - fref_w) ||^2

    `residual_w` = f_w - target_w and `gap_w` = f_w - fref_w are the winners' output-space
    tensors [B, ...]; u is the DPO logit; lambda = `weight`. Gradients flow through u and
    `gap_w` as in the official code (nothing detached).
    """
    u = dpo_logit(model_w, model_l, ref_w, ref_l, beta)
    scale = (1.0 - torch.sigmoid(u)).reshape(-1, *([1] * (residual_w.dim() - 1)))
    loss = (residual_w - weight * scale * gap_w).square().flatten(1).mean(1)
    return loss, pair_logs(u, model_w, model_l, ref_w, ref_l)


def kto_reference_point(implicit_reward_mean: Tensor) -> Tensor:
    """z_0 = stopgrad(max(mean over the global batch of (Lref - L), 0))."""
    return implicit_reward_mean.detach().clamp(min=0.0)


def kto_loss(model: Tensor, ref: Tensor, label: Tensor, beta: float, z_0: Tensor,
             lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-KTO (arXiv 2406.04314), per image:

        lambda_y * (1 - sigmoid(y * beta * (g - z_0))),   g = Lref - L,  y = +1 desirable / -1 undesirable

    g is the implicit log-ratio: positive when the policy denoises the image better than the reference.
    """
    g = ref - model
    value = torch.sigmoid(label * beta * (g - z_0))
    lam = torch.where(label > 0, torch.full_like(g, lambda_desirable), torch.full_like(g, lambda_undesirable))
    desirable = label > 0
    logs = {"implicit_acc": ((label * (g - z_0)) > 0).float().mean(), "kto_z0": z_0.mean(),
            "model_mse": model.mean(), "ref_mse": ref.mean(), "model_minus_ref": (model - ref).mean(),
            "desirable_fraction": desirable.float().mean()}
    return lam * (1.0 - value), {k: v.detach() for k, v in logs.items()}


def adaptive_metric(u: Tensor, stability_weight: float) -> Tensor:
    """Minority metric m [B] from K draws of the DPO logit u [K, B] (detached).

    confidence c = mean_k sigmoid(u_k) (intra-annotator), instability s = std_k sigmoid(u_k)
    (inter-annotator); m = (1 - c) + kappa * s is high for low-confidence, unstable pairs.
    """
    p = torch.sigmoid(u.detach())
    return (1.0 - p.mean(0)) + stability_weight * p.std(0, unbiased=False)


def adaptive_weight(m: Tensor, k_1: float) -> Tensor:
    """W(m) = exp(-k_1 m): 1 for a confident majority pair, smaller as the pair looks like a minority one."""
    return torch.exp(-k_1 * m)


def adaptive_margin(m: Tensor, k_2: float, c_2: float) -> Tensor:
    """Gamma(m) = k_2 * max(c_2 - m, 0): a margin only for pairs below the threshold c_2 (majority)."""
    return k_2 * (c_2 - m).clamp(min=0.0)


def adaptive_dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, k_1: float,
                      k_2: float, c_2: float, stability_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Adaptive-DPO (arXiv 2503.16921), reconstructed; errors are [K, B] over K noise draws:

        -W(m) * mean_k log sigmoid(u_k - Gamma(m))

    W and Gamma are functions of the detached metric m, so they reweight and shift the DPO
    gradient without being optimised themselves. k_1 = k_2 = 0 gives DPO averaged over K draws.
    """
    u = dpo_logit(model_w, model_l, ref_w, ref_l, beta)
    m = adaptive_metric(u, stability_weight)
    w, gamma = adaptive_weight(m, k_1), adaptive_margin(m, k_2, c_2)
    loss = -w * F.logsigmoid(u - gamma).mean(0)
    logs = pair_logs(u, model_w, model_l, ref_w, ref_l)
    logs.update({"adaptive_metric": m.mean(), "adaptive_weight": w.mean(), "adaptive_margin": gamma.mean()})
    return loss, logs
