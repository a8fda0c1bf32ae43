"""Noise schedules, their sampling grids, and conversions between parameterizations.

Time ``t`` is always the denoiser's native timestep as a float tensor:

* VP (DDPM betas, Ho et al. arXiv 2006.11239): t in [0, T-1],
  x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
* Flow matching (SD3 arXiv 2403.03206, Sana): t = T s with s in [0, 1],
  x_t = (1 - s) x_0 + s eps, so alpha = 1 - s and sigma = s.

The conversions are named functions on broadcastable ``alpha``/``sigma`` (shape them
[B, 1, 1, 1] with ``append_dims``). Every one is exact algebra, so they hold for any
(alpha, sigma), not only for the schedule a model was trained on.

TrigFlow (sCM, arXiv 2410.11081; Sana-Sprint arXiv 2503.09641): x_t = cos(s) x_0 + sin(s) z with
z ~ N(0, sigma_d^2 I), angle s in [0, pi/2]. A VP schedule is already TrigFlow with
s = atan(sigma_t / alpha_t) and sigma_d = 1 on latents that were scaled to unit std (the VAE
``scaling_factor``), so the TrigFlow output F is the v-prediction and f = cos(s) x_t - sin(s) F.
Flow teachers are mapped by ``trigflow_to_flow_time``/``trigflow_to_flow_input``/
``flow_velocity_to_trigflow`` (the map used by Sana-Sprint's converted teacher).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so ``x`` ([B] or scalar) broadcasts against an ndim tensor."""
    if x.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {x.ndim} dims, more than the requested {ndim}")
    return x[(...,) + (None,) * (ndim - x.ndim)]


def _config_of(scheduler_or_config: Any) -> tuple[str | None, dict]:
    """(class name, config dict) of a diffusers scheduler, its FrozenDict config, or a plain dict."""
    if hasattr(scheduler_or_config, "config") and not isinstance(scheduler_or_config, dict):
        return type(scheduler_or_config).__name__, dict(scheduler_or_config.config)
    config = dict(scheduler_or_config)
    return config.get("_class_name"), config


# ----------------------------------------------------------------------------------------------
# VP schedule


def _betas_like_diffusers(config: dict) -> Tensor:
    """DDPM betas built in float32 exactly as diffusers builds them, so abar_t matches training bit for bit."""
    T = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal arXiv 2102.09672, Eq. 17, beta capped at 0.999
        abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                             dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule={kind!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2")
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. arXiv 2305.08891 Algorithm 1: shift/scale sqrt(abar) so abar_T = 0, keep abar_0."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    abar = ((sqrt_abar - last) * (first / (first - last))) ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class VPSchedule:
    """Discrete variance-preserving schedule; fractional t interpolates abar linearly.

    Interpolation choice: abar(t) = (1 - w) abar[i] + w abar[i+1] with i = floor(t), w = t - i.
    It is exact at integers, keeps alpha^2 + sigma^2 = 1, is monotone, and (unlike interpolating
    log abar) stays finite on zero-terminal-SNR schedules where abar[T-1] = 0. Because abar is
    piecewise linear in t, ``t_from_angle`` inverts it exactly (abar = cos^2 s).
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: Tensor, steps_offset: int = 0):
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.steps_offset = int(steps_offset)

    @classmethod
    def from_scheduler_config(cls, config: Any) -> "VPSchedule":
        """From a diffusers DDPM-family scheduler, its config, or a config dict.

        abar is cumprod(1 - beta) computed in float32 as diffusers does (what the teacher saw in
        training), then held in float64; everything downstream is float64.
        """
        _, config = _config_of(config)
        betas = _betas_like_diffusers(config)
        return cls(torch.cumprod(1.0 - betas, dim=0), config.get("steps_offset", 0))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def abar(self, t: Tensor) -> Tensor:
        """abar(t) in float64, linearly interpolated between integer steps."""
        T, t64 = self.num_train_timesteps, t.to(torch.float64)
        if torch.any((t64 < 0) | (t64 > T - 1)):
            raise ValueError(f"VP timestep out of range [0, {T - 1}]: min {t64.min().item()}, max {t64.max().item()}")
        acp = self.alphas_cumprod.to(t.device)
        i = t64.floor().clamp(max=T - 2).long()
        w = t64 - i
        return acp[i] * (1 - w) + acp[i + 1] * w

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) in t's dtype and device."""
        abar = self.abar(t)
        return abar.sqrt().to(t.dtype), (1 - abar).sqrt().to(t.dtype)

    def timesteps(self, n: int, spacing: str = "trailing") -> Tensor:
        """Descending grid of n integer timesteps (float64), equal to DDIMScheduler.set_timesteps(n)."""
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"number of steps must be in [1, {T}], got {n}")
        if spacing == "trailing":
            grid = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        elif spacing == "leading":
            grid = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + self.steps_offset
        elif spacing == "linspace":
            grid = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"spacing={spacing!r}; use 'trailing', 'leading' or 'linspace'")
        return torch.from_numpy(grid.copy()).to(torch.float64)

    @property
    def min_angle(self) -> float:
        return math.acos(math.sqrt(self.alphas_cumprod[0].item()))

    @property
    def max_angle(self) -> float:
        """TrigFlow angle at t = T-1: atan(sigma_T / alpha_T); pi/2 only with zero terminal SNR."""
        return math.acos(math.sqrt(self.alphas_cumprod[-1].item()))

    def t_from_angle(self, angle: Tensor) -> Tensor:
        """Exact inverse of s(t) = atan(sigma_t / alpha_t) under the linear-abar interpolation.

        abar = cos^2 s; find i with abar[i] >= abar >= abar[i+1]; t = i + (abar[i] - abar) / (abar[i] - abar[i+1]).
        """
        lo, hi = self.min_angle, self.max_angle
        a64 = angle.to(torch.float64)
        if torch.any((a64 < lo - 1e-9) | (a64 > hi + 1e-9)):
            raise ValueError(f"TrigFlow angle out of this schedule's range [{lo:.6f}, {hi:.6f}] "
                             f"(got {a64.min().item():.6f}..{a64.max().item():.6f}); clamp angles to max_angle")
        acp, T = self.alphas_cumprod.to(angle.device), self.num_train_timesteps
        abar = (a64.cos() ** 2).clamp(acp[-1], acp[0])
        idx = torch.searchsorted(acp.flip(0), abar)  # acp is decreasing; search its increasing reverse
        i = (T - 1 - idx).clamp(0, T - 2)
        t = i + (acp[i] - abar) / (acp[i] - acp[i + 1])
        return t.to(angle.dtype)


# ----------------------------------------------------------------------------------------------
# Flow-matching schedule

_FLOW_GRID_OPTIONS = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas",
                      "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def uniform_flow_sigmas(steps: int) -> list[float]:
    """Sigmas 1, (N-1)/N, ..., 1/N: N real flow steps (a flow scheduler appends the final 0 and shifts them)."""
    return [1.0 - i / steps for i in range(steps)]


def shift_sigma(u, shift: float):
    """SD3's resolution shift of a flow sigma: shift u / (1 + (shift - 1) u) (tensor, array or float)."""
    return shift * u / (1 + (shift - 1) * u)


class FlowSchedule:
    """Rectified-flow schedule x_t = (1 - s) x_0 + s eps, t = T s; ``shift`` only shapes sampling grids."""

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, grid_options: tuple[str, ...] = ()):
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.grid_options = tuple(grid_options)  # diffusers grid options we do not reproduce

    @classmethod
    def from_scheduler_config(cls, config: Any) -> "FlowSchedule":
        """From FlowMatchEulerDiscreteScheduler (``shift``) or DPM/UniPC with use_flow_sigmas (``flow_shift``)."""
        _, config = _config_of(config)
        shift = config.get("shift", config.get("flow_shift", 1.0))
        options = tuple(k for k in _FLOW_GRID_OPTIONS if config.get(k))
        return cls(config.get("num_train_timesteps", 1000), shift if shift is not None else 1.0, options)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(1 - s, s) with s = t / T, in t's dtype and device."""
        T = self.num_train_timesteps
        if torch.any((t < 0) | (t > T)):
            raise ValueError(f"flow timestep out of range [0, {T}]: min {t.min().item()}, max {t.max().item()}")
        s = t.to(torch.float64) / T
        return (1 - s).to(t.dtype), s.to(t.dtype)

    def timesteps(self, n: int, spacing: str = "trailing") -> Tensor:
        """Descending grid of n timesteps (float64) equal to FlowMatchEulerDiscreteScheduler.set_timesteps(n).

        diffusers: s_min = shift(1/T) / (1 + (shift-1)/T) (the shifted smallest training sigma),
        u = linspace(1, s_min, n), s = shift u / (1 + (shift-1) u), t = T s. s_min is shifted twice
        there; we reproduce that. The grid starts at t = T, the flow analogue of "trailing".
        """
        if self.grid_options:
            raise ValueError(f"FlowSchedule.timesteps does not reproduce diffusers options {self.grid_options} "
                             "(dynamic shifting needs the image size); set them off or pass your own grid")
        if spacing != "trailing":
            raise ValueError(f"FlowSchedule has one grid (FlowMatchEulerDiscreteScheduler's); got spacing={spacing!r}")
        T, k = self.num_train_timesteps, self.shift
        u = np.linspace(1.0, shift_sigma(1.0 / T, k), n)
        return torch.from_numpy(shift_sigma(u, k) * T).to(torch.float64)

    @property
    def min_angle(self) -> float:
        return 0.0

    @property
    def max_angle(self) -> float:
        return math.pi / 2

    def t_from_angle(self, angle: Tensor) -> Tensor:
        """t = T sin s / (sin s + cos s): the flow time with the same signal-to-noise ratio as angle s."""
        return trigflow_to_flow_time(angle) * self.num_train_timesteps


_VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                  "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler", "PNDMScheduler",
                  "UniPCMultistepScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "DEISMultistepScheduler",
                  "KDPM2DiscreteScheduler", "TCDScheduler")


def schedule_from_scheduler(scheduler_or_config: Any) -> VPSchedule | FlowSchedule:
    """The schedule a diffusers scheduler (object, config, or dict with ``_class_name``) describes."""
    name, config = _config_of(scheduler_or_config)
    if name is None:  # an in-memory scheduler.config has no _class_name: tell the families apart by their keys
        name = ("FlowMatch" if "shift" in config else "DDPMScheduler" if "beta_schedule" in config else None)
    if name is None:
        raise ValueError("scheduler config has no '_class_name', 'shift' or 'beta_schedule'; pass the scheduler object")
    if name.startswith("FlowMatch") or (name in _VP_SCHEDULERS and config.get("use_flow_sigmas")):
        return FlowSchedule.from_scheduler_config(config)
    if name in _VP_SCHEDULERS:
        return VPSchedule.from_scheduler_config(config)
    raise ValueError(f"unknown scheduler class {name!r}; known: FlowMatch*, {', '.join(_VP_SCHEDULERS)}")


# ----------------------------------------------------------------------------------------------
# Parameterizations. x_t = alpha x_0 + sigma eps throughout.


def eps_to_x0(eps: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_0 = (x_t - sigma eps) / alpha."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - alpha x_0) / sigma."""
    return (x_t - alpha * x_0) / sigma


def x0_eps_to_v(x_0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x_0 (Salimans & Ho arXiv 2202.00512; defined this way for any schedule)."""
    return alpha * eps - sigma * x_0


def v_to_x0_eps(v: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Solve [x_t; v] = [[alpha, sigma], [-sigma, alpha]] [x_0; eps]; determinant alpha^2 + sigma^2.

    x_0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2), eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2).
    On VP the determinant is 1; on the flow schedule it is (1-s)^2 + s^2 > 0, so v stays well defined.
    """
    norm = alpha**2 + sigma**2
    return (alpha * x_t - sigma * v) / norm, (sigma * x_t + alpha * v) / norm


def x0_eps_to_flow_velocity(x_0: Tensor, eps: Tensor) -> Tensor:
    """u = eps - x_0, the target of diffusers' FlowMatch training (= dx_t/ds on the flow schedule)."""
    return eps - x_0


def flow_velocity_to_x0_eps(u: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """With eps = x_0 + u: x_t = (alpha + sigma) x_0 + sigma u, so x_0 = (x_t - sigma u)/(alpha + sigma),
    eps = (x_t + alpha u)/(alpha + sigma). On the flow schedule alpha + sigma = 1."""
    norm = alpha + sigma
    return (x_t - sigma * u) / norm, (x_t + alpha * u) / norm


_TO_X0_EPS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "epsilon": lambda out, x_t, a, s: (eps_to_x0(out, x_t, a, s), out),
    "sample": lambda out, x_t, a, s: (out, x0_to_eps(out, x_t, a, s)),
    "v_prediction": v_to_x0_eps,
    "flow": flow_velocity_to_x0_eps,
}
_FROM_X0_EPS: dict[str, Callable[..., Tensor]] = {
    "epsilon": lambda x_0, eps, a, s: eps,
    "sample": lambda x_0, eps, a, s: x_0,
    "v_prediction": x0_eps_to_v,
    "flow": lambda x_0, eps, a, s: x0_eps_to_flow_velocity(x_0, eps),
}


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in _TO_X0_EPS:
        raise ValueError(f"prediction_type={prediction_type!r}; use one of {PREDICTION_TYPES}")


def to_x0_eps(output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x_0, eps) from a raw model output of the given prediction type."""
    _check_prediction_type(prediction_type)
    return _TO_X0_EPS[prediction_type](output, x_t, alpha, sigma)


def from_x0_eps(x_0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """The raw model output of the given prediction type that corresponds to (x_0, eps)."""
    _check_prediction_type(prediction_type)
    return _FROM_X0_EPS[prediction_type](x_0, eps, alpha, sigma)


# ----------------------------------------------------------------------------------------------
# TrigFlow (sCM arXiv 2410.11081 Sec. 2; Sana-Sprint arXiv 2503.09641 Sec. 3)


def trigflow_angle(alpha: Tensor, sigma: Tensor) -> Tensor:
    """s = atan(sigma / alpha) in [0, pi/2] (atan2, so alpha = 0 gives pi/2)."""
    return torch.atan2(sigma, alpha)


def x0_eps_to_trigflow(x_0: Tensor, eps: Tensor, angle: Tensor, sigma_d: float = 1.0) -> Tensor:
    """TrigFlow target F = (dx_t/ds) / sigma_d = cos(s) eps - sin(s) x_0 / sigma_d, where z = sigma_d eps.

    With sigma_d = 1 on a VP schedule (cos s = alpha, sin s = sigma) this is v = alpha eps - sigma x_0.
    """
    return angle.cos() * eps - angle.sin() * x_0 / sigma_d


def trigflow_consistency(x_t: Tensor, F: Tensor, angle: Tensor, sigma_d: float = 1.0) -> Tensor:
    """f(x_t, s) = cos(s) x_t - sin(s) sigma_d F; equals x_0 when F is the exact TrigFlow velocity.

    cos s (cos s x_0 + sin s z) - sin s (cos s z - sin s x_0) = x_0.
    """
    return angle.cos() * x_t - angle.sin() * sigma_d * F


def trigflow_to_flow_time(angle: Tensor) -> Tensor:
    """s_flow = sin s / (sin s + cos s): the flow time whose noise-to-signal ratio s/(1-s) is tan s."""
    return angle.sin() / (angle.sin() + angle.cos())


def flow_to_trigflow_time(s_flow: Tensor) -> Tensor:
    """Angle s = atan(s_flow / (1 - s_flow)), the inverse of ``trigflow_to_flow_time``."""
    return torch.atan2(s_flow, 1 - s_flow)


def trigflow_to_flow_input(x_t: Tensor, angle: Tensor, sigma_d: float = 1.0) -> Tensor:
    """x_flow = (x_t / sigma_d) sqrt(s_f^2 + (1 - s_f)^2) = (x_t / sigma_d) / (sin s + cos s).

    x_t / sigma_d = cos s (x_0/sigma_d) + sin s eps; dividing by (sin s + cos s) gives
    (1 - s_f)(x_0/sigma_d) + s_f eps: the flow model's data is x_0 / sigma_d.
    """
    return x_t / sigma_d / (angle.sin() + angle.cos())


def flow_to_trigflow_input(x_flow: Tensor, s_flow: Tensor, sigma_d: float = 1.0) -> Tensor:
    """x_t = sigma_d x_flow / sqrt(s_f^2 + (1 - s_f)^2), the inverse of ``trigflow_to_flow_input``."""
    return sigma_d * x_flow / (s_flow**2 + (1 - s_flow) ** 2).sqrt()


def flow_velocity_to_trigflow(u: Tensor, x_flow: Tensor, s_flow: Tensor) -> Tensor:
    """F = ((1 - 2 s_f) x_flow + (1 - 2 s_f + 2 s_f^2) u) / sqrt(s_f^2 + (1 - s_f)^2).

    With N = sqrt(s_f^2 + (1-s_f)^2): cos s = (1-s_f)/N, sin s = s_f/N, and y_0 = x_flow - s_f u,
    eps = x_flow + (1 - s_f) u. Then F = cos s eps - sin s y_0 = ((1-s_f) eps - s_f y_0)/N, which expands
    to the line above.
    """
    n2 = s_flow**2 + (1 - s_flow) ** 2
    return ((1 - 2 * s_flow) * x_flow + n2 * u) / n2.sqrt()


def trigflow_to_flow_velocity(F: Tensor, x_flow: Tensor, s_flow: Tensor) -> Tensor:
    """u = (N F - (1 - 2 s_f) x_flow) / N^2 with N^2 = s_f^2 + (1 - s_f)^2; inverse of ``flow_velocity_to_trigflow``."""
    n2 = s_flow**2 + (1 - s_flow) ** 2
    return (n2.sqrt() * F - (1 - 2 * s_flow) * x_flow) / n2
