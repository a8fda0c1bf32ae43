"""f-distill: one-step distillation by f-divergence distribution matching (DMD2 is its reverse-KL case).

Papers: f-distill, Xu, Nie, Vahdat, arXiv 2502.15681 (Eq. 8, Alg. 1, Table 5); DMD2, Yin et al.,
arXiv 2405.14867 (fake score, GAN head on its bottleneck, two-time-scale updates).

    G = G_theta(x_T, t_max | c)                          one step from pure noise (VP: t = T-1, flow: t = 1000)
    x_t = alpha_t G + sigma_t eps,  t ~ U[t_min, t_max] fraction of the time range
    x0_teacher = u + g (c - u)  (teacher CFG, diffusers form),  x0_fake = fake score (conditional, no grad)
    r = exp(D(x_t)) clipped, per-time-bin normalised;  w = h(r) / mean h(r)     (trainers/fdivergence.py)
    L_student = 1/2 ||G - sg(G - (x0_fake - x0_teacher) w_dmd w)||^2 + lambda_gan softplus(-D(x_t))
    L_critic  = ||x0_fake(x_t') - sg(G)||^2 + softplus(D(x_t')) + softplus(-D(x_real,t''))  [+ gamma R1]
(loss terms in trainers/dmd.py). The student steps every `student_update_every` iterations; the fake
score and discriminator step on the others (with k = 1 all three step every iteration).

Choices and deviations:
* Discriminator placement: by default the head reads the *fake score's* bottleneck (UNet mid block, or
  the middle transformer block), as in the paper and DMD2: the D loss then also trains the fake score's
  encoder, which tracks the generator anyway. `discriminator_features: teacher` reads the frozen
  teacher's bottleneck instead (the authors' later FastGen code; only the head trains). The head is its
  own optimizer group, "discriminator", so it gets its own LR via `optim_groups`.
* The ratio-bin EMA is a buffer of the discriminator module (`ratio_ema`), so the loop's checkpoint saves
  it and a resumed run continues from it; every rank holds the same value because it is updated from
  all-reduced bin statistics. The batch mean of h is all-reduced too; both reductions go through an
  `all_sum` callable so the maths in trainers/fdivergence.py stays pure.
* Frozen-weight calls: on student steps the fake score and the head run with detached parameters
  (`DetachedParams`, via `torch.func.functional_call`), so only the student receives gradients and DDP
  never waits for gradients of a group that does not step; on critic steps the student runs under no_grad.
  In the critic step the fake score sees [x_t fake; x_t real; perturbed x_t real] in one call, so every
  parameter is used and DDP needs no `find_unused_parameters`.
* Real samples: the discriminator's real side is real data noised at an independent t (VAE-encoded
  images from any image data kind, or cached latents). With prompt-only data (`real_data: none`) there is
  no density ratio: r = 1, every divergence's weight normalises to 1 and the update is DMD's reverse-KL
  gradient without a GAN term (no teacher sampling is needed or done).
* Approximate R1 perturbs the noisy real input x_t (what the head sees), not the clean latent.
* Student initialisation: a copy of the teacher, or the denoiser of a one-step export of it (`student_source`),
  to continue a student on other prompts; the fake score (and head) always start fresh.
* Full fine-tuning only (as the paper); LoRA is rejected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from pipelines.backbones import configure_denoiser, looks_like_hub_id, resolve_source, unwrap_model
from pipelines.conditioning import Conditioning
from pipelines.samplers import guided, sample_ddim
from pipelines.schedules import append_dims, to_x0_eps
from trainers.dmd import (DetachedParams, DiscriminatorHead, approximate_r1, bottleneck_width, capture_bottleneck,
                          distribution_matching_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss)
from trainers.fdivergence import DIVERGENCES, RatioOptions, distributed_sum, fdivergence_weights
from trainers.method import LossOutput, Method, Recommended, initial_noise
from trainers.profiling import phase
from trainers.strict import ConfigError, field

IMAGE_FREE_KINDS = ("prompts", "text_cache")


@dataclass
class FDistillConfig:
    divergence: Literal[tuple(DIVERGENCES)] = field("js", "f-divergence: " + ", ".join(DIVERGENCES))
    alpha: float = field(0.5, "exponent of the alpha-divergence (h = r^alpha); only for divergence: alpha")
    teacher_guidance: float = field(1.75, "teacher CFG scale (diffusers form u + g (c - u)) baked into the student")
    student_update_every: int = field(10, "the student steps every k iterations, fake score + D on the others")
    gan_weight: float = field(1e-3, "weight of the generator's non-saturating GAN term")
    discriminator_weight: float = field(1.0, "weight of the discriminator loss in the critic update")
    r1_weight: float = field(1.0, "weight of the approximate R1 penalty on the head; 0 disables")
    r1_noise: float = field(0.1, "std of the input perturbation of approximate R1")
    discriminator_features: Literal["fake_score", "teacher"] = field("fake_score", "bottleneck the head reads")
    real_data: Literal["auto", "images", "none"] = field("auto", "discriminator's real side: images (noised data) or "
                                                        "none (r = 1, DMD update); auto picks from data.kind")
    ratio_logit_clamp: float = field(10.0, "clip of the logit before r = exp(logit)")
    ratio_min: float = field(0.1, "lower clip of the density ratio")
    ratio_max: float = field(20.0, "upper clip of the density ratio")
    ratio_normalization: bool = field(True, "divide r by the EMA of its mean in the sample's time bin")
    ratio_bins: int = field(10, "time bins of the ratio normalisation")
    ratio_ema_rate: float = field(0.0, "EMA rate of the per-bin mean ratio (0: this batch's bin mean)")
    t_min: float = field(0.001, "smallest perturbation time, as a fraction of the time range")
    t_max: float = field(0.999, "largest perturbation time, as a fraction of the time range")
    head_channels: int = field(0, "hidden width of the discriminator head; 0 uses the bottleneck width")
    student_source: Optional[str] = field(None, "diffusers folder or hub id whose denoiser initialises the student "
                                                "(a one-step export, to continue it on other prompts with fresh "
                                                "critics); null: the teacher")

    def __post_init__(self):
        if self.student_update_every < 1:
            raise ValueError(f"student_update_every must be >= 1, got {self.student_update_every}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if not 0.0 < self.ratio_min < self.ratio_max:
            raise ValueError(f"need 0 < ratio_min < ratio_max, got {self.ratio_min}, {self.ratio_max}")
        if not 0.0 <= self.ratio_ema_rate < 1.0 or self.ratio_bins < 1:
            raise ValueError(f"need ratio_ema_rate in [0, 1) and ratio_bins >= 1, got {self.ratio_ema_rate}, "
                             f"{self.ratio_bins}")
        if self.divergence == "alpha" and self.alpha in (0.0, 1.0):
            raise ValueError("alpha must not be 0 or 1 (those limits are rkl and fkl: use those names)")
        if min(self.gan_weight, self.discriminator_weight, self.r1_weight, self.r1_noise) < 0:
            raise ValueError("gan_weight, discriminator_weight, r1_weight and r1_noise must be >= 0")

    def ratio_options(self) -> RatioOptions:
        return RatioOptions(self.divergence, self.alpha, self.ratio_logit_clamp, self.ratio_min, self.ratio_max,
                            self.ratio_bins, self.ratio_ema_rate, self.ratio_normalization)


# ---------------------------------------------------------------- the method


class FDistill(Method):
    config_class = FDistillConfig
    needs = "prompts"

    def __init__(self, cfg, bundle):
        super().__init__(cfg, bundle)
        opts = self.options
        self.teacher = bundle.denoiser.requires_grad_(False).eval()
        self.student = self._initial_student()
        self.fake_score = self._copy_of_teacher()
        self.use_real = self.real_data_kind(cfg) == "images"
        self.head = None
        if self.use_real:
            source = self.teacher if opts.discriminator_features == "teacher" else self.fake_score
            width = bottleneck_width(source)
            spatial = getattr(unwrap_model(source), "mid_block", None) is not None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                self.head = DiscriminatorHead(width, opts.head_channels or width, spatial, opts.ratio_bins)
            self.head.to(self.teacher.device)
        self.image_size = (cfg.data.resolution, cfg.data.resolution)
        with torch.no_grad():
            self.uncond = bundle.encode_unconditional(1, image_size=self.image_size)
        sched = bundle.schedule
        self.t_end = float(sched.num_train_timesteps - 1) if sched.kind == "vp" else 1000.0
        self.all_sum = distributed_sum

    def _copy_of_teacher(self) -> nn.Module:
        net = copy.deepcopy(self.teacher).float().requires_grad_(True).train()
        return net

    def _initial_student(self) -> nn.Module:
        """The teacher's copy, or the denoiser of `<method>.student_source` (same architecture required)."""
        source = self.options.student_source
        if not source:
            return self._copy_of_teacher()
        option = f"{self.cfg.method}.student_source"
        where = resolve_source(source)
        if not Path(where).is_dir() and not looks_like_hub_id(where):
            raise FileNotFoundError(f"{option}: {source!r} is neither a folder nor a hub id; point it at a "
                                    "one-step export such as outputs/toy/fdistill_rkl/pipeline")
        name = self.bundle.spec.denoiser_name
        if Path(where).is_dir() and not (Path(where) / name).is_dir():
            raise FileNotFoundError(f"{option}: {where} has no {name}/ folder, so it is not an export of this "
                                    f"teacher's family ({self.bundle.source}); use a student distilled from it")
        teacher = unwrap_model(self.teacher)
        net = type(teacher).from_pretrained(where, subfolder=name)
        shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
        if shapes(net) != shapes(teacher):
            raise ValueError(f"{option}: the denoiser in {where} does not have the teacher's architecture "
                             f"({self.bundle.source}); use a student distilled from this teacher")
        configure_denoiser(net, gradient_checkpointing=self.cfg.model.gradient_checkpointing,
                           attention=self.cfg.model.attention)
        return net.to(self.teacher.device).float().requires_grad_(True).train()

    @staticmethod
    def real_data_kind(cfg) -> str:
        choice = cfg.options.real_data
        if choice == "auto":
            return "none" if cfg.data.kind in IMAGE_FREE_KINDS else "images"
        return choice

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        if cfg.model.lora.rank > 0:
            raise ConfigError(f"{source}: model.lora.rank: fdistill trains the full student and fake score "
                              "(as the paper); set model.lora.rank: 0")
        if cls.real_data_kind(cfg) == "images" and cfg.data.kind in IMAGE_FREE_KINDS:
            raise ConfigError(f"{source}: fdistill.real_data: 'images' but data.kind '{cfg.data.kind}' has no images; "
                              "use an image data kind or real_data: none")

    def trainable(self) -> dict[str, nn.Module]:
        groups = {"student": self.student, "fake_score": self.fake_score}
        if self.head is not None:
            groups["discriminator"] = self.head
        return groups

    def groups_for_step(self, step: int) -> list[str]:
        k = self.options.student_update_every
        critic = [g for g in self.modules if g != "student"]
        if k == 1:
            return ["student", *critic]
        return ["student"] if step % k == 0 else critic

    # ---- pieces ------------------------------------------------------------------------------
    def _alpha_sigma(self, t: torch.Tensor, ndim: int):
        return tuple(append_dims(a.float(), ndim) for a in self.bundle.schedule.alpha_sigma(t))

    def x0_of(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t, x_t.ndim)
        return to_x0_eps(output.float(), x_t, alpha, sigma, self.bundle.prediction_type)[0]

    def generate_x0(self, student: nn.Module, x_T: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """G(x_T | c): the student's x_0 estimate from pure noise at the generator time."""
        t = torch.full((x_T.shape[0],), self.t_end, device=x_T.device)
        return self.x0_of(self.bundle.predict(student, x_T, t, cond), x_T, t)

    def perturb(self, x_0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, opts = x_0.shape[0], self.options
        u = opts.t_min + (opts.t_max - opts.t_min) * torch.rand(n, generator=generator, device=x_0.device)
        t = u * self.t_end
        eps = torch.randn(x_0.shape, generator=generator, device=x_0.device)
        alpha, sigma = self._alpha_sigma(t, x_0.ndim)
        return alpha * x_0 + sigma * eps, t

    def teacher_x0(self, x_t, t, cond, features: bool):
        """Guided teacher x_0 (no grad) and, when asked, its bottleneck features (grad to x_t)."""
        b, g = self.bundle, self.options.teacher_guidance
        with torch.set_grad_enabled(features), capture_bottleneck(self.teacher) as store:
            x0_c = self.x0_of(b.predict(self.teacher, x_t, t, cond), x_t, t).detach()
        if g != 1.0:
            with torch.no_grad():
                x0_u = self.x0_of(b.predict(self.teacher, x_t, t, self.uncond.repeat(x_t.shape[0])), x_t, t)
            x0_c = x0_u + g * (x0_c - x0_u)
        return x0_c, (store[0] if features else None)

    # ---- losses ------------------------------------------------------------------------------
    def student_loss(self, cond: Conditioning, n: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        opts, b = self.options, self.bundle
        device = generator.device
        x_T = torch.randn(b.latent_shape(n, self.image_size), generator=generator, device=device)
        with phase("student"):
            x_0 = self.generate_x0(self.modules["student"], x_T, cond)
        x_t, t = self.perturb(x_0, generator)
        want_features = self.head is not None
        on_teacher = opts.discriminator_features == "teacher"
        with phase("teacher"):
            x0_teacher, feats = self.teacher_x0(x_t, t, cond, want_features and on_teacher)
        with (phase("fake_score"), torch.set_grad_enabled(want_features and not on_teacher),
              capture_bottleneck(self.fake_score) as store):
            x0_fake = self.x0_of(b.predict(DetachedParams(self.fake_score), x_t, t, cond), x_t, t)
        x0_fake = x0_fake.detach()
        weight, logs = None, {}
        loss_gan = torch.zeros(n, device=device)
        if want_features:
            feats = feats if on_teacher else store[0]
            logits = DetachedParams(self.modules["discriminator"])(feats)
            head = unwrap_model(self.modules["discriminator"])
            weight, new_ema, logs = fdivergence_weights(logits, t, self.t_end, head.ratio_ema,
                                                        opts.ratio_options(), self.all_sum)
            with torch.no_grad():
                head.ratio_ema.copy_(new_ema)
            loss_gan = gan_generator_loss(logits)
        loss_dm, _ = distribution_matching_loss(x_0, x0_teacher, x0_fake, weight)
        logs = {**logs, "loss_dm": loss_dm.detach().mean(), "loss_gan_g": loss_gan.detach().mean()}
        return loss_dm + opts.gan_weight * loss_gan, logs

    def critic_loss(self, batch: dict, cond: Conditioning, n: int, generator: torch.Generator):
        opts, b = self.options, self.bundle
        device = generator.device
        with torch.no_grad():
            x_T = torch.randn(b.latent_shape(n, self.image_size), generator=generator, device=device)
            x_0 = self.generate_x0(self.modules["student"], x_T, cond)
        x_t, t = self.perturb(x_0, generator)
        if self.head is None:
            x0_fake = self.x0_of(b.predict(self.modules["fake_score"], x_t, t, cond), x_t, t)
            loss = fake_score_loss(x0_fake, x_0)
            return loss, {"loss_fake_score": loss.detach().mean()}
        with torch.no_grad():
            real = self.real_latents(batch, generator)
        x_real, t_real = self.perturb(real, generator)
        x_real_jit = x_real + opts.r1_noise * torch.randn(x_real.shape, generator=generator, device=device)
        inputs = torch.cat([x_t, x_real, x_real_jit])
        times, conds = torch.cat([t, t_real, t_real]), Conditioning.cat([cond, cond, cond])
        if opts.discriminator_features == "teacher":
            x0_fake = self.x0_of(b.predict(self.modules["fake_score"], x_t, t, cond), x_t, t)
            with torch.no_grad(), capture_bottleneck(self.teacher) as store:
                b.predict(self.teacher, inputs, times, conds)
        else:
            with capture_bottleneck(self.fake_score) as store:
                out = b.predict(self.modules["fake_score"], inputs, times, conds)
            x0_fake = self.x0_of(out[:n], x_t, t)
        logits = self.modules["discriminator"](store[0])
        l_fake, l_real, l_jit = logits[:n], logits[n:2 * n], logits[2 * n:]
        loss_fake = fake_score_loss(x0_fake, x_0)
        loss_d = gan_discriminator_loss(l_fake, l_real)
        loss_r1 = approximate_r1(l_real, l_jit)
        loss = loss_fake + opts.discriminator_weight * loss_d + opts.r1_weight * loss_r1
        logs = {"loss_fake_score": loss_fake.detach().mean(), "loss_d": loss_d.detach().mean(),
                "loss_r1": loss_r1.detach().mean(), "d_real_accuracy": (l_real > 0).float().mean(),
                "d_fake_accuracy": (l_fake < 0).float().mean()}
        return loss, logs

    def real_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if "latents" not in batch and "pixel_values" not in batch:
            raise ValueError("fdistill.real_data: images, but the batch has no pixel_values or latents; "
                             "use an image data kind or set fdistill.real_data: none")
        return self.clean_latents(batch, generator).to(generator.device)

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        with torch.no_grad(), phase("encode"):
            cond = self.bundle.encode_prompt(batch["prompt"], image_size=self.image_size)
        n = len(batch["prompt"])
        total = torch.zeros(n, device=generator.device)
        logs: dict[str, torch.Tensor] = {}
        if "student" in groups:
            loss, student_logs = self.student_loss(cond, n, generator)
            total, logs = total + loss, {**logs, **student_logs}
        if "fake_score" in groups:
            with phase("critic"):
                loss, critic_logs = self.critic_loss(batch, cond, n, generator)
            total, logs = total + loss, {**logs, **critic_logs}
        return LossOutput(total, logs)

    # ---- sampling and export -----------------------------------------------------------------
    def recommended(self) -> Recommended:
        return Recommended(steps=1, guidance=1.0, scheduler=one_step_scheduler(self.bundle))

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        return self.sample(prompts, seeds, 1, 1.0)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], x_T: torch.Tensor, steps: int = 1, guidance: float = 1.0):
        """What the exported folder computes: DDIM (trailing, final alpha 1) or flow Euler from x_T."""
        denoiser, b = self.export_denoiser(), self.bundle
        was_training = denoiser.training
        denoiser.eval()
        cond = b.encode_prompt(prompts, image_size=self.image_size)
        uncond = b.encode_unconditional(len(prompts), image_size=self.image_size) if guidance > 1 else None
        predict = lambda x_t, t, c: b.predict(denoiser, x_t, t, c)  # noqa: E731
        model_fn = guided(predict, cond, uncond, guidance, b.prediction_type, b.schedule)
        x_0 = sample_ddim(model_fn, x_T, b.schedule.timesteps(steps, "trailing"), b.schedule)
        denoiser.train(was_training)
        return x_0

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
        shape = self.bundle.latent_shape(1, self.image_size)[1:]
        x_T = initial_noise(shape, seeds, self.teacher.device)
        return self.bundle.decode_latents(self.sample_latents(prompts, x_T, steps, guidance)).clamp(-1, 1)


def one_step_scheduler(bundle):
    """A diffusers scheduler whose 1-step call evaluates the student at the generator time and returns its x_0.

    VP: DDIM with trailing spacing (timestep T-1) and final alpha 1 (the step returns x0_hat exactly).
    Flow: Euler from sigma = 1 (t = 1000) to 0, i.e. x_0 = x_T - u.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if bundle.schedule.kind == "vp":
        return DDIMScheduler.from_config(bundle.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                         clip_sample=False, thresholding=False,
                                         prediction_type=bundle.prediction_type)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=bundle.schedule.num_train_timesteps,
                                           shift=getattr(bundle.schedule, "shift", 1.0))
