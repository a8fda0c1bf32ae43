"""TBCM: image-free continuous-time consistency distillation on the teacher's own trajectories.

Papers: TBCM, Tang et al., arXiv 2511.20410 (trajectory-backward consistency model); its objective is sCM,
Lu & Song, arXiv 2410.11081 (TrigFlow, Eqs. 8-9), in the form Sana-Sprint (arXiv 2503.09641) trains it.
Maths shared with LCD lives in `trainers/consistency.py`.

One step, per batch of prompts (no image is read):

1. Reference route a_0 > ... > a_K (flow teachers: the shifted flow grid sigma = k u / (1 + (k-1) u),
   u = linspace(1, 0, K+1), shift k = 2.5, mapped to angles atan(sigma / (1 - sigma)); VP teachers: their
   trailing K-step grid plus t = 0), and one uniform angle s_j in each interval (a_j, a_{j-1}) (stratified).
2. Teacher trajectory with CFG g drawn from {4, 4.5, 5} per prompt, no grad: x = sigma_d z at a_0, then
   x <- cos(s - s') x - sin(s - s') sigma_d F_teacher(x, s) through s_1 ... s_K to 0 (DDIM in TrigFlow).
   The K states (x_{s_j}, s_j) and their stored velocities dx/ds = sigma_d F_teacher are the training
   batch: the target needs no second teacher call.
3. sCM loss on each state: tangent g = -cos^2 s (sigma_d F^- - dx/ds) - r cos s sin s (x + sigma_d dF^-/ds),
   normalised g / (||g|| + 0.1), L = e^{-u(s)} / (sigma_d tan s) ||F_theta - F^- - g||^2 / D + u(s) with a
   learned log-variance head u. r warms up 0 -> 1 over 4000 steps and decreases to 0.75 late (TBCM).
4. Black-sample filter: a trajectory whose end latent has MSE m < 1 to the VAE latent of a black image
   is dropped with probability 1 - m.

Backbones. F is the TrigFlow velocity at angle s. VP teachers (SD/SDXL UNets) are TrigFlow models with
sigma_d = 1 on their VAE-scaled latents (std ~ 1): the state is the latent itself, t = t(s) with
alpha_t = cos s, and F is the v-prediction. The student keeps the teacher's parameterization by default
(`student_prediction: teacher`): its F is converted from its own eps (or v) output, so at step 0 it *is*
the unguided teacher. `student_prediction: v_prediction` reads an eps teacher's network as a v-predictor
instead (better conditioned near s_max: x_0 = cos s x - sin s v needs no division by alpha_T ~ 0.07),
but then the initial student is a network whose outputs mean something else and must be relearnt:
`velocity_warmup_steps` first regresses its F onto the stored guided teacher F (no JVP, no extra call).
Flow teachers (Sana, SD3) keep their parameterization: the TrigFlow state is sigma_d (= 0.5 as in
Sana-Sprint) times the flow-space latent, the network sees x / (sigma_d (sin s + cos s)) at
t = 1000 sin s / (sin s + cos s), and its velocity is mapped to F exactly
(`pipelines/schedules.py`). dF/ds comes from forward-mode AD (`jvp: forward_ad`, needs
`model.attention: math`) or a float32 central difference (`jvp: finite_difference`); the student's time
embeddings always run in float32.

Deviations and choices:
* Trajectories are generated inside the method for each batch (K + 1 guided teacher calls per prompt),
  not cached: the recipe needs prompts only, every step sees fresh noise and angles from the loop's
  per-step generator (so resume is exact), and no cache can go stale when the teacher or K changes.
* The student has no guidance input (our students are standard diffusers networks): it distils the
  guided teacher averaged over the drawn scales and is sampled without CFG.
* No LADD/discriminator term (TBCM builds one but does not use it), no EMA unless train.ema_decay > 0.
* 1-2 step export: VP students use `LCMScheduler(prediction_type=<the student's>, timestep_scaling=1e4)`,
  whose c_skip < 1e-11 and c_out = 1 in float32 make each step x0 = cos s x - sin s F followed by fresh
  re-noising; flow students use `FlowMatchEulerDiscreteScheduler(shift=1, stochastic_sampling=True)`, exact
  at 1 step, and at 2 steps when called with `sigmas=[1, sin m / (sin m + cos m)]` (m = `mid_angle`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from pipelines.backbones import unwrap_model
from pipelines.samplers import guided
from pipelines.schedules import append_dims, shift_sigma, to_x0_eps, trigflow_angle, trigflow_to_flow_time
from trainers.consistency import (LogVarHead, jvp_finite_difference, jvp_forward_ad, keep_time_embeddings_fp32,
                                  lcm_inference_timesteps, normalize_tangent, sample_consistency, scm_loss,
                                  scm_tangent, squared_error, tangent_ratio, trigflow_step)
from trainers.method import LossOutput, Method, Recommended
from trainers.profiling import phase
from trainers.strict import ConfigError, field

PURE_X0_SCALING = 1.0e4  # LCMScheduler timestep_scaling that turns its boundary condition into x0 = f


@dataclass
class ContinuousConsistencyOptions:
    """What TBCM and sCM-on-images (`trainers/scm.py`) share: teacher, student, tangent, weighting, export."""

    teacher_guidance: list[float] = field([4.0, 4.5, 5.0], "teacher CFG scales (diffusers convention), one per prompt")
    sigma_d: Optional[float] = field(None, "TrigFlow data std: default 1 for VP teachers (required), 0.5 for flow")
    student_prediction: Literal["teacher", "v_prediction"] = field(
        "teacher", "the student's output: the teacher's parameterization (exact init) or v (VP teachers only)")
    jvp: Literal["forward_ad", "finite_difference"] = field("finite_difference", "how dF/ds is computed")
    fd_step: float = field(1.0e-4, "angle step of the central difference (time embeddings oscillate at ~1e-3 rad)")
    velocity_warmup_steps: int = field(
        0, "first steps regress the student's F onto the teacher's guided F instead of the sCM loss (re-fits a "
           "v student started from an eps teacher)")
    tangent_warmup_steps: int = field(4000, "steps over which r rises linearly from 0 to 1")
    r_decay_start: int = field(15000, "step where r starts decreasing to final_r (TBCM calm-down)")
    r_decay_end: int = field(17000, "step where r reaches final_r; <= r_decay_start disables the decrease")
    final_r: float = field(0.75, "r after the calm-down")
    tangent_norm_c: float = field(0.1, "c in g / (||g|| + c)")
    adaptive_weighting: bool = field(True, "learn the log-variance u(s) (sCM adaptive weighting)")
    logvar_dim: int = field(128, "sinusoidal feature size of the log-variance head")
    sample_steps: int = field(1, "steps of the validation sampler and the recommended steps of the export")
    mid_angle: float = field(1.0, "intermediate TrigFlow angle of 2-step sampling (flow students)")
    lcm_original_steps: int = field(50, "grid of the exported LCMScheduler (VP students; 2 steps -> t = 999, 499)")

    def __post_init__(self):
        if not self.teacher_guidance:
            raise ValueError("teacher_guidance must list at least one CFG scale")
        if self.sigma_d is not None and self.sigma_d <= 0:
            raise ValueError(f"sigma_d must be > 0, got {self.sigma_d}")
        if not 0 < self.mid_angle < math.pi / 2 or self.fd_step <= 0:
            raise ValueError(f"need 0 < mid_angle < pi/2 and fd_step > 0, got {self.mid_angle}, {self.fd_step}")


@dataclass
class TBCMConfig(ContinuousConsistencyOptions):
    route_steps: int = field(15, "K: teacher steps per trajectory = states kept per prompt (TBCM: 16-point route)")
    route_shift: float = field(2.5, "shift of the flow reference route (flow teachers; VP use their trailing grid)")
    black_filter: bool = field(True, "drop near-black trajectories with probability 1 - MSE / black_threshold")
    black_threshold: float = field(1.0, "latent MSE to the black image below which the filter applies")

    def __post_init__(self):
        super().__post_init__()
        if self.route_steps < 1:
            raise ValueError(f"route_steps must be >= 1, got {self.route_steps}")


# ------------------------------------------------------------------ pure pieces


def reference_route(schedule, steps: int, shift: float) -> torch.Tensor:
    """Descending angles a_0 > ... > a_K (float64): the start, K - 1 interior points and the clean end."""
    if schedule.kind == "vp":
        t = torch.cat([schedule.timesteps(steps, "trailing"), torch.zeros(1, dtype=torch.float64)])
        return trigflow_angle(*schedule.alpha_sigma(t))
    sigma = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    return torch.atan2(sigma, 1 - sigma)


def stratified_angles(route: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, K+1]: column 0 is the route's start, column j a uniform angle in (a_j, a_{j-1})."""
    route = route.to(generator.device, torch.float32)
    u = torch.rand(n, len(route) - 1, generator=generator, device=generator.device)
    inner = route[1:] + u * (route[:-1] - route[1:])
    return torch.cat([route[:1].expand(n, 1), inner], dim=1)


def velocity_regression_loss(F_theta: torch.Tensor, dxds: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """Per-sample mean (F_theta - dx/ds / sigma_d)^2: the PF-ODE dx/ds = sigma_d F names the teacher's F."""
    return squared_error(F_theta, dxds / sigma_d)


def black_keep(x_0: torch.Tensor, black: torch.Tensor, threshold: float, generator: torch.Generator) -> torch.Tensor:
    """Bool [B]: keep unless MSE(x_0, black) = m < threshold, then keep with probability m / threshold."""
    mse = (x_0.float() - black.float()).pow(2).flatten(1).mean(dim=1)
    u = torch.rand(x_0.shape[0], generator=generator, device=generator.device).to(mse.device)
    return (mse >= threshold) | (u * threshold < mse)


def native_point(schedule, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, alpha, sigma, input scale) of the teacher's own parameterization at TrigFlow angle s.

    VP: alpha = cos s, sigma = sin s, t = t(s), scale 1. Flow: s_f = sin s / (sin s + cos s), t = T s_f,
    (alpha, sigma) = (1 - s_f, s_f), and the flow input is x / (sin s + cos s) (before dividing by sigma_d).
    """
    if schedule.kind == "vp":
        # clamped in float64: a float32 angle at the schedule's end can round past it
        t = schedule.t_from_angle(s.double().clamp(schedule.min_angle, schedule.max_angle)).to(s.dtype)
        return t, s.cos(), s.sin(), torch.ones_like(s)
    s_f = trigflow_to_flow_time(s).clamp(0.0, 1.0)  # float32 pi/2 has cos < 0
    return s_f * schedule.num_train_timesteps, 1 - s_f, s_f, 1 / (s.sin() + s.cos())


def velocity_from_output(out, x_native, s, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """F = cos s eps - sin s x_0 (native units) from a raw output; linear in the output."""
    x_0, eps = to_x0_eps(out.float(), x_native, alpha, sigma, prediction_type)
    return append_dims(s.cos(), eps.ndim) * eps - append_dims(s.sin(), eps.ndim) * x_0


def consistency_timesteps(schedule, steps: int, mid_angle: float, lcm_original_steps: int) -> torch.Tensor:
    """Native timesteps of 1..n step consistency sampling (descending, float64)."""
    if schedule.kind == "vp":
        return lcm_inference_timesteps(schedule.num_train_timesteps, lcm_original_steps, steps)
    if steps == 2:
        angles = torch.tensor([math.pi / 2, mid_angle], dtype=torch.float64)
    else:
        angles = torch.linspace(math.pi / 2, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return trigflow_to_flow_time(angles) * schedule.num_train_timesteps


@contextlib.contextmanager
def full_fp32(device_type: str):
    """Autocast off and TF32 off (TF32 keeps ~10 mantissa bits, too few for a difference quotient)."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = cuda.allow_tf32, cudnn.allow_tf32
    cuda.allow_tf32 = cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        cuda.allow_tf32, cudnn.allow_tf32 = saved


# ------------------------------------------------------------------ the method


class ContinuousConsistency(Method):
    """sCM in TrigFlow form on (state, angle, dx/ds) triples; subclasses say where the triples come from."""

    def __init__(self, cfg, bundle):
        super().__init__(cfg, bundle)
        opts, schedule = self.options, bundle.schedule
        vp = schedule.kind == "vp"
        if vp and opts.sigma_d not in (None, 1.0):
            raise ValueError(f"sigma_d={opts.sigma_d}: a VP teacher is a TrigFlow model only with sigma_d = 1")
        if not vp and opts.student_prediction == "v_prediction":
            raise ValueError("student_prediction=v_prediction is for VP (SD-style) teachers; a flow teacher's "
                             "student keeps its flow output: use 'teacher'")
        self.sigma_d = opts.sigma_d or (1.0 if vp else 0.5)
        self.student_prediction = (bundle.prediction_type if opts.student_prediction == "teacher"
                                   else opts.student_prediction)
        self.teacher = bundle.denoiser.requires_grad_(False).eval()
        keep_time_embeddings_fp32(self.teacher)
        student = copy.deepcopy(self.teacher).float().requires_grad_(True).train()
        keep_time_embeddings_fp32(student)
        self.student = student
        self.logvar = LogVarHead(opts.logvar_dim).to(self.teacher.device) if opts.adaptive_weighting else None
        self.image_size = (cfg.data.resolution, cfg.data.resolution)
        self.angle_range = (schedule.min_angle, schedule.max_angle)
        with torch.no_grad():
            self.uncond = bundle.encode_unconditional(1, image_size=self.image_size)

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        name = cfg.method
        if cfg.model.lora.rank > 0:
            raise ConfigError(f"{source}: model.lora.rank: {name} trains the full student; set it to 0")
        if cfg.options.jvp == "forward_ad" and cfg.model.attention != "math":
            raise ConfigError(f"{source}: model.attention: {name}.jvp forward_ad needs 'math' attention "
                              f"(fused kernels have no forward-mode derivative), got {cfg.model.attention!r}")

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, **({"logvar": self.logvar} if self.logvar is not None else {})}

    def draw_guidance(self, n: int, generator: torch.Generator) -> torch.Tensor:
        scales = torch.tensor(self.options.teacher_guidance, device=generator.device)
        return scales[torch.randint(0, len(scales), (n,), generator=generator, device=generator.device)]

    def consistency_loss(self, x_t: torch.Tensor, s: torch.Tensor, dxds: torch.Tensor, cond, weight: torch.Tensor,
                         step: int) -> LossOutput:
        """The sCM loss on states x_t at angles s whose teacher PF-ODE derivative is dxds; per-state `weight`."""
        opts = self.options
        if step < opts.velocity_warmup_steps:
            return self.velocity_regression(x_t, s, dxds, cond, weight)
        r = tangent_ratio(step, opts.tangent_warmup_steps, opts.r_decay_start, opts.r_decay_end, opts.final_r)
        with phase("jvp"):
            dFds = self.velocity_derivative(x_t, s, dxds, cond)
        with phase("student"):
            F_theta = self.student_velocity(self.modules["student"], x_t, s, cond).float()
        F_minus = F_theta.detach()
        tangent = scm_tangent(F_minus, dxds, x_t, dFds, s, self.sigma_d, r)
        g_norm = normalize_tangent(tangent, opts.tangent_norm_c)
        logvar = self.modules["logvar"](s) if self.logvar is not None else torch.zeros_like(s)
        loss = scm_loss(F_theta, F_minus, g_norm, s, logvar, self.sigma_d) * weight
        logs = {"r": torch.tensor(r), "logvar": logvar.detach().mean(),
                "tangent_norm": tangent.flatten(1).norm(dim=1).mean()}
        return LossOutput(loss, logs)

    def velocity_regression(self, x_t, s, dxds, cond, weight) -> LossOutput:
        """Warm-up loss: mean (F_theta - F_teacher)^2 with F_teacher = (dx/ds) / sigma_d, the stored guided F."""
        with phase("student"):
            F_theta = self.student_velocity(self.modules["student"], x_t, s, cond).float()
        loss = velocity_regression_loss(F_theta, dxds, self.sigma_d) * weight
        if self.logvar is not None:  # keep the head in the graph (DDP expects every parameter to get a gradient)
            loss = loss + 0.0 * self.modules["logvar"](s)
        return LossOutput(loss, {"velocity_mse": loss.detach().mean()})

    # ---- teacher side ----------------------------------------------------------------------
    def teacher_velocity(self, x: torch.Tensor, s: torch.Tensor, cond, g: torch.Tensor) -> torch.Tensor:
        """Guided teacher F at TrigFlow state x, angle s (CFG u + g (c - u) on the raw output)."""
        b = self.bundle
        t, alpha, sigma, scale = native_point(b.schedule, s)
        x_native = append_dims(scale, x.ndim) * x / self.sigma_d
        predict = lambda x_t, tt, c: b.predict(self.teacher, x_t, tt, c).float()  # noqa: E731
        x_0, eps = guided(predict, cond, self.uncond, g, b.prediction_type, b.schedule)(x_native, t)
        return append_dims(s.cos(), x.ndim) * eps - append_dims(s.sin(), x.ndim) * x_0

    # ---- student side ----------------------------------------------------------------------
    def student_velocity(self, net, x: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        b = self.bundle
        t, alpha, sigma, scale = native_point(b.schedule, s)
        x_native = append_dims(scale, x.ndim) * x / self.sigma_d
        a, sg = append_dims(alpha, x.ndim), append_dims(sigma, x.ndim)
        return velocity_from_output(b.predict(net, x_native, t, cond), x_native, s, a, sg, self.student_prediction)

    def velocity_derivative(self, x: torch.Tensor, s: torch.Tensor, dxds: torch.Tensor, cond) -> torch.Tensor:
        """dF^-/ds along the teacher's PF-ODE, from the unwrapped student without autograd history."""
        net = unwrap_model(self.modules["student"])
        fn = lambda xx, ss: self.student_velocity(net, xx, ss, cond)  # noqa: E731
        opts = self.options
        with torch.no_grad():
            if opts.jvp == "forward_ad":
                return jvp_forward_ad(fn, x, s, dxds)
            with full_fp32(x.device.type):  # a difference quotient over 1e-4 needs true fp32 matmuls
                return jvp_finite_difference(fn, x, s, dxds, opts.fd_step, *self.angle_range)

    # ---- sampling and export ---------------------------------------------------------------
    def recommended(self) -> Recommended:
        from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

        b, opts = self.bundle, self.options
        if b.schedule.kind == "vp":
            scheduler = LCMScheduler.from_config(
                b.scheduler.config, prediction_type=self.student_prediction,
                original_inference_steps=opts.lcm_original_steps, timestep_scaling=PURE_X0_SCALING,
                clip_sample=False, thresholding=False)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=b.schedule.num_train_timesteps,
                                                        shift=1.0, stochastic_sampling=True)
        return Recommended(steps=opts.sample_steps, guidance=1.0, scheduler=scheduler)

    def flow_sigmas(self, steps: int) -> list[float] | None:
        """The consistency sampler's flow times (the exported scheduler has shift 1); 1 step is the default."""
        b = self.bundle
        if b.schedule.kind == "vp" or steps < 2:
            return None
        t = consistency_timesteps(b.schedule, steps, self.options.mid_angle, self.options.lcm_original_steps)
        return (t / b.schedule.num_train_timesteps).tolist()

    @torch.no_grad()
    def sample_latents(self, denoiser, prompts: list[str], steps: int, generator: torch.Generator) -> torch.Tensor:
        """1..n step consistency sampling (no CFG) in the student's native parameterization."""
        b, opts = self.bundle, self.options
        was_training = denoiser.training
        denoiser.eval()
        cond = b.encode_prompt(prompts, image_size=self.image_size)
        x = torch.randn(b.latent_shape(len(prompts), self.image_size), generator=generator, device=generator.device)
        predict = lambda x_t, t, c: b.predict(denoiser, x_t, t, c)  # noqa: E731
        model_fn = guided(predict, cond, None, 1.0, self.student_prediction, b.schedule)
        timesteps = consistency_timesteps(b.schedule, steps, opts.mid_angle, opts.lcm_original_steps)
        x_0 = sample_consistency(model_fn, x, timesteps, b.schedule, generator)
        denoiser.train(was_training)
        return x_0

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        latents = self.sample_latents(self.export_denoiser(), prompts, self.options.sample_steps, generator)
        return self.bundle.decode_latents(latents).clamp(-1, 1)


class TBCM(ContinuousConsistency):
    """States from the teacher's own guided trajectories for prompts (no image is read)."""

    config_class = TBCMConfig
    needs = "prompts"

    def __init__(self, cfg, bundle):
        super().__init__(cfg, bundle)
        opts = self.options
        self.route = reference_route(bundle.schedule, opts.route_steps, opts.route_shift)
        with torch.no_grad():
            black = -torch.ones(1, 3, *self.image_size, device=self.teacher.device)
            self.black = bundle.encode_images(black).float() if opts.black_filter else None

    @torch.no_grad()
    def trajectories(self, cond, angles: torch.Tensor, g: torch.Tensor, generator: torch.Generator):
        """Run the guided teacher through `angles` [B, K+1] to 0; return states, velocities [B, K, ...] and x_0."""
        n, K = angles.shape[0], angles.shape[1] - 1
        x = self.sigma_d * torch.randn(self.bundle.latent_shape(n, self.image_size), generator=generator,
                                       device=generator.device)
        states, velocities = [], []
        for j in range(K + 1):
            s = angles[:, j]
            F = self.teacher_velocity(x, s, cond, g)
            if j > 0:
                states.append(x)
                velocities.append(F)
            s_next = angles[:, j + 1] if j < K else torch.zeros_like(s)
            x = trigflow_step(x, F, s, s_next, self.sigma_d)
        return torch.stack(states, 1), torch.stack(velocities, 1), x

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        opts, device = self.options, generator.device
        prompts = list(batch["prompt"])
        n, K = len(prompts), opts.route_steps
        with torch.no_grad(), phase("encode"):
            cond = self.bundle.encode_prompt(prompts, image_size=self.image_size)
        angles = stratified_angles(self.route, n, generator)
        g = self.draw_guidance(n, generator)
        with phase("teacher"):
            states, velocities, x_end = self.trajectories(cond, angles, g, generator)
        keep = torch.ones(n, dtype=torch.bool, device=device)
        if self.black is not None:
            keep = black_keep(x_end / self.sigma_d, self.black, opts.black_threshold, generator)
        x_t, s = states.flatten(0, 1), angles[:, 1:].reshape(-1)
        dxds = self.sigma_d * velocities.flatten(0, 1)
        out = self.consistency_loss(x_t, s, dxds, cond.repeat(K), keep.repeat_interleave(K).float(), step)
        out.logs["kept"] = keep.float().mean()
        return out
