"""Distillation-DPO: preference-aligned one-step distillation ranked by any metric, even a non-differentiable one.

Paper: Distillation-DPO, Zhao et al., arXiv 2504.11447 (LiDAR scene completion; generalised here to
text-to-image). The fake-score form of each term is DMD2, Yin et al., arXiv 2405.14867, as implemented
for f-distill in trainers/fdistill.py and trainers/dmd.py, whose generator, perturbation, guided
teacher, one-step sampling and export this method inherits unchanged.

For each prompt c the student G makes K samples from K noises (K = 2: the paper's pair); a reward (any
`rewards.REWARDS` entry, used only to rank) names the best of them the winner and the worst the loser;
two fake score networks model the student's winning and losing distributions. With DMD's per-sample
step (trainers/dmd.py)

    g(x; f) = (x0_f(x_t) - x0_teacher(x_t)) / mean|x - x0_teacher|,   x_t = alpha_t x + sigma_t eps
    L_dm(x; f) = 1/2 mean (x - sg(x - g))^2,          so  dL_dm/dx = g / N  (N = C H W)

the student minimises, per pair (the paper's KL(p_w || p_T) - KL(p_l || p_T)),

    L = d (lambda_w L_dm(x_w; fake_w) - lambda_l L_dm(x_l; fake_l, g -> cap(g)))
    cap(g) = g kappa tanh(m / kappa) / m,    m = mean|g|          (per sample)

with d = 0 for a tie (best and worst scores within tie_margin) and 1 otherwise. A descent step moves the
winner along x0_teacher - x0_fake_w (towards the teacher) and the loser along x0_fake_l - x0_teacher (away
from it). When `reference_weight` lambda_ref > 0, the plain DMD term on both images of every pair, ties
included, is added,

    + lambda_ref (L_dm(x_w; fake_all) + L_dm(x_l; fake_all))

against a third fake score fed every candidate sample (the student's whole distribution, as in DMD2):
the preference terms then act on top of distribution matching instead of replacing it. With
`preference_guidance` gamma > 0 the reference term's teacher is guided, at both images of every pair (an
addition, below):

    x0_teacher -> x0_teacher + gamma (x0_fake_w(x_t) - x0_fake_l(x_t))

The critic step regresses fake_w on sg(x_w) and fake_l on sg(x_l), each at its own t and
eps (trainers/dmd.fake_score_loss), ties masked out. The student steps every `student_update_every`
iterations, both fake scores on the others (all three every iteration when it is 1).

Deliberate choices and deviations:

* The published surrogate gives the student no gradient. Its code multiplies the detached score
  difference by (x_t - x_0) with x_t built from x_0; with LiDiff's noising x_t = x_0 + sigma eps that
  is sigma eps, whose derivative with respect to x_0 (and so the student) is exactly zero. With a VP
  x_t = alpha x_0 + sigma eps it would be (alpha - 1) times the intended gradient: the wrong sign.
  Here the intended DMD gradient is used, with signs per branch (tests/test_distill_dpo.py shows both).
* The loser term is bounded: ascent on KL(p_l || p_T) has no minimum, and DMD's normaliser
  1 / mean|x - x0_teacher| blows up exactly when a loser already sits near the teacher's prediction.
  The loser's step is tanh-capped per sample, so mean|cap(g)| = kappa tanh(m / kappa) < kappa and the
  loser's gradient on its sample has L1 norm below lambda_l kappa whatever the fake score says; for
  m << kappa the cap is the identity (plain DMD ascent). A smooth cap, not a clip, keeps the update a
  continuous function of the fake score. lambda_l defaults to half lambda_w (the paper weighs them
  equally), so winners dominate a pair's net push.
* Pairs: by default the noises are independent draws (eps, eps'), which gives a text-to-image
  ranker two different images to judge; `pair_noise: scaled` uses the paper's (eps, 1.1 eps).
* Best of K (`samples_per_prompt`, an addition): with K > 2 the pair is the reward's best and worst of K
  samples. A coarse ranker (the checker's graded score) ties fewer pairs, and the winner is more often a
  sample that passes. The K candidates are generated without autograd; the picked two are generated again
  with it from their noises (the same samples), so memory does not grow with K and one extra no-grad
  pass of 2 samples is the whole cost at K = 2.
* Ties give no update at all: the pair is masked out of the student and both fake-score losses (the
  mask multiplies, so every network still takes part in the graph and DDP needs no unused-parameter
  search). A batch of ties is a no-op step; a 0/1 ranker (the toy attribute checker) therefore needs a
  student that already passes sometimes, i.e. `student_source` pointing at a one-step export.
* Both images of a pair are noised with the same t and eps on the student step (as the paper); the
  fake scores see their samples at independent t and eps.
* Fake scores are two full copies of the teacher, not two LoRA adapters on one network: the loop gives
  every optimizer group its own prepared module, and two adapter sets on one shared network would be
  one module in two groups (DDP and FSDP cannot prepare it twice) or need adapter switching inside a
  wrapped forward. The cost is one more denoiser than DMD2 (student, two fake scores, frozen teacher).
  Full fine-tuning only, as f-distill; LoRA is rejected.
* Student initialisation: the teacher, or the denoiser of `student_source` (a one-step DMD2 / f-distill
  export, e.g. outputs/toy/fdistill_rkl/pipeline) with the teacher's architecture. Fake scores start
  from the teacher, as in the paper and DMD2. One-step sampling and the exported scheduler are
  f-distill's (`one_step_scheduler`).
* The reward ranks decoded images in [-1, 1] under no_grad; it is never differentiated and not trained.
* Preference guidance (`preference_guidance`, an addition). The paper's terms pull winners towards the teacher
  and push losers from it, so their fixed point is at best the teacher: a student that already draws what the
  teacher draws has nothing to gain. The two fake scores know more than that. By Tweedie's formula,
  x0_f(x_t) = (x_t + sigma_t^2 grad log p_f,t(x_t)) / alpha_t, so x0_fake_w - x0_fake_l = (sigma_t^2 / alpha_t)
  grad log (p_w,t / p_l,t): the gradient of the log odds that a sample near x_t is a winner, learned from the
  ranker's own decisions (an implicit classifier, as classifier-free guidance's conditional minus
  unconditional). Adding gamma times it to the teacher's x_0 is, at every t, the score of the tilted target
  p_T (p_w / p_l)^gamma, and the reference DMD term matches the student's whole distribution to it. Both
  fake scores are evaluated at both images of each pair; ties included, since they are functions of x_t.
  With untrained fake scores (two copies of the teacher) the guidance is exactly zero. Once trained, their
  difference also holds what two networks fitted to different samples always differ by; on the toy that
  part is as large as the ranker's (docs/methods/distill_dpo.md), and the guidance gains nothing there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from pipelines.conditioning import Conditioning
from trainers.dmd import distribution_matching_loss, dmd_normaliser, fake_score_loss
from trainers.fdistill import FDistill
from trainers.method import LossOutput, Method
from trainers.profiling import phase
from trainers.strict import ConfigError, field


@dataclass
class DistillDPOConfig:
    reward: str = field("toy_attributes", "registered reward (rewards.REWARDS) that ranks each pair; used only to "
                                           "rank, so it need not be differentiable")
    reward_options: dict[str, Any] = field({}, "keyword options of the reward's builder, e.g. {path: /weights/x}")
    tie_margin: float = field(0.0, "a pair whose scores differ by at most this is a tie and gives no update")
    samples_per_prompt: int = field(2, "K: student samples per prompt; the reward's best and worst of them form the "
                                       "pair (2: the pair itself, as the paper)")
    pair_noise: Literal["independent", "scaled"] = field("independent", "second noise of a pair: an independent "
                                                          "draw, or noise_scale * the first (the paper; K = 2 only)")
    noise_scale: float = field(1.1, "eps' = noise_scale * eps when pair_noise: scaled (paper: 1.1)")
    winner_weight: float = field(1.0, "lambda_w: weight of the winner's DMD term (towards the teacher)")
    loser_weight: float = field(0.5, "lambda_l: weight of the loser's capped DMD term (away from the teacher)")
    loser_cap: float = field(1.0, "kappa: the loser's per-sample step mean|g| is capped at kappa tanh(m / kappa)")
    reference_weight: float = field(0.0, "lambda_ref: weight of a plain DMD term on both images of every pair "
                                         "(ties included) against a third fake score of all the student's "
                                         "samples; 0 builds no third network")
    preference_guidance: float = field(0.0, "gamma: the reference term's teacher x_0 becomes x0_teacher + gamma "
                                            "(x0_fake_w - x0_fake_l), the teacher tilted by the learned winner / loser "
                                            "density ratio (p_w / p_l)^gamma; needs reference_weight > 0")
    teacher_guidance: float = field(1.75, "teacher CFG scale (diffusers form u + g (c - u)) baked into the student")
    student_update_every: int = field(10, "the student steps every k iterations, the two fake scores on the others")
    student_source: Optional[str] = field(None, "diffusers folder or hub id whose denoiser initialises the student "
                                                "(a one-step DMD2/f-distill export); null: the teacher")
    t_min: float = field(0.001, "smallest perturbation time, as a fraction of the time range (f-distill)")
    t_max: float = field(0.999, "largest perturbation time, as a fraction of the time range (f-distill)")

    def __post_init__(self):
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (a pair), got {self.samples_per_prompt}")
        if self.pair_noise == "scaled" and self.samples_per_prompt != 2:
            raise ValueError("pair_noise: scaled makes exactly two noises (eps, noise_scale * eps); use "
                             f"pair_noise: independent with samples_per_prompt {self.samples_per_prompt}")
        if self.student_update_every < 1:
            raise ValueError(f"student_update_every must be >= 1, got {self.student_update_every}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if self.loser_cap <= 0 or self.noise_scale <= 0:
            raise ValueError(f"loser_cap and noise_scale must be > 0, got {self.loser_cap}, {self.noise_scale}")
        if min(self.winner_weight, self.loser_weight, self.tie_margin, self.reference_weight,
               self.preference_guidance) < 0:
            raise ValueError("winner_weight, loser_weight, reference_weight, preference_guidance and tie_margin "
                             "must be >= 0")
        if self.preference_guidance > 0 and self.reference_weight == 0:
            raise ValueError("preference_guidance guides the reference term's teacher; set reference_weight > 0 "
                             "(e.g. 1) or preference_guidance: 0")


# ---------------------------------------------------------------- pure pieces


def candidate_noises(shape: tuple[int, ...], k: int, mode: str, scale: float,
                     generator: torch.Generator) -> Tensor:
    """[k B, ...]: k noises per prompt, candidate-major (rows j B .. (j + 1) B - 1 are candidate j): independent
    draws, or for a scaled pair (k = 2) eps then scale * eps."""
    eps = torch.randn(shape, generator=generator, device=generator.device)
    if mode == "scaled":
        return torch.cat([eps, scale * eps])
    rest = [torch.randn(shape, generator=generator, device=generator.device) for _ in range(k - 1)]
    return torch.cat([eps, *rest])


def best_and_worst(scores: Tensor, tie_margin: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """scores [k, B] -> (best [B], worst [B] candidate indices, decided [B] float: 0 when max - min <= tie_margin).
    Equal scores: best is the first such candidate and worst the last, so the two differ whenever k >= 2."""
    scores = scores.float()
    k = scores.shape[0]
    best = scores.argmax(dim=0)
    worst = k - 1 - scores.flip(0).argmin(dim=0)
    spread = scores.max(dim=0).values - scores.min(dim=0).values
    return best, worst, (spread > tie_margin).float()


def pick(x: Tensor, index: Tensor) -> Tensor:
    """Candidate index[i] of prompt i from a candidate-major [k B, ...] batch: [B, ...]."""
    n = index.shape[0]
    return x[index.to(x.device) * n + torch.arange(n, device=x.device)]


def loser_cap_weight(grad: Tensor, cap: float) -> Tensor:
    """Per-sample [B] factor kappa tanh(m / kappa) / m, m = mean|grad|: the capped step has mean|.| < kappa."""
    m = grad.detach().float().abs().flatten(1).mean(dim=1).clamp(min=1e-12)
    return cap * torch.tanh(m / cap) / m


def distill_dpo_loss(x_w: Tensor, x_l: Tensor, teacher_w: Tensor, teacher_l: Tensor, fake_w: Tensor,
                     fake_l: Tensor, decided: Tensor, winner_weight: float = 1.0, loser_weight: float = 0.5,
                     loser_cap: float = 1.0, fake_all: tuple[Tensor, Tensor] | None = None,
                     reference_weight: float = 0.0, preference: tuple[Tensor, Tensor] | None = None,
                     preference_guidance: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair d (lambda_w L_dm(x_w) - lambda_l L_dm,capped(x_l)), plus lambda_ref (L_dm(x_w) + L_dm(x_l))
    against `fake_all` = (its x_0 at the winner's and at the loser's x_t) when given; detached logs. With
    `preference` = (x0_fake_w - x0_fake_l at the winner's x_t, at the loser's), the reference term's teacher is
    x0_teacher + preference_guidance * preference."""
    loss_w, _ = distribution_matching_loss(x_w, teacher_w, fake_w)
    raw_l = (fake_l.float() - teacher_l.float()) * dmd_normaliser(x_l, teacher_l)
    cap = torch.nan_to_num(loser_cap_weight(raw_l, loser_cap))
    loss_l, _ = distribution_matching_loss(x_l, teacher_l, fake_l, cap)
    loss = decided.float() * (winner_weight * loss_w - loser_weight * loss_l)
    logs = {"loss_dm_winner": loss_w.detach().mean(), "loss_dm_loser": loss_l.detach().mean(),
            "loser_cap_factor": cap.detach().mean()}
    if fake_all is not None:
        if preference is not None:
            teacher_w = teacher_w.float() + preference_guidance * preference[0].float()
            teacher_l = teacher_l.float() + preference_guidance * preference[1].float()
            logs["preference_size"] = torch.cat([p.detach().flatten() for p in preference]).abs().mean()
        ref_w, _ = distribution_matching_loss(x_w, teacher_w, fake_all[0])
        ref_l, _ = distribution_matching_loss(x_l, teacher_l, fake_all[1])
        loss = loss + reference_weight * (ref_w + ref_l)
        logs["loss_dm_reference"] = (ref_w + ref_l).detach().mean() / 2
    return loss, logs


# ---------------------------------------------------------------- the method


class DistillDPO(FDistill):
    """Inherits f-distill's generator, perturbation, guided teacher, sampling and export; replaces its
    networks (two fake scores, no discriminator), its losses and its config checks."""

    config_class = DistillDPOConfig
    needs = "prompts"

    def __init__(self, cfg, bundle):
        Method.__init__(self, cfg, bundle)  # not FDistill's: it would build a fake score and head unused here
        opts = self.options
        self.teacher = bundle.denoiser.requires_grad_(False).eval()
        self.student = self._initial_student()
        self.fake_winner = self._copy_of_teacher()
        self.fake_loser = self._copy_of_teacher()
        self.fake_all = self._copy_of_teacher() if opts.reference_weight > 0 else None
        with torch.no_grad():
            self.uncond = bundle.encode_unconditional(1, image_size=self.image_size)
        sched = bundle.schedule
        self.t_end = float(sched.num_train_timesteps - 1) if sched.kind == "vp" else 1000.0
        from rewards import build_reward

        self.reward = build_reward(opts.reward, device=self.teacher.device, **opts.reward_options)

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        from rewards import REWARDS, accepted_options

        opts = cfg.options
        if cfg.model.lora.rank > 0:
            raise ConfigError(f"{source}: model.lora.rank: distill_dpo trains the full student and fake scores; "
                              "set model.lora.rank: 0")
        if opts.reward not in REWARDS:
            raise ConfigError(f"{source}: distill_dpo.reward: unknown reward {opts.reward!r} "
                              f"(known: {', '.join(sorted(REWARDS))})")
        accepted = accepted_options(opts.reward)
        unknown = sorted(set(opts.reward_options) - accepted)
        if unknown:
            raise ConfigError(f"{source}: distill_dpo.reward_options: {unknown} not accepted by reward "
                              f"{opts.reward!r} (it takes {sorted(accepted)})")

    def trainable(self) -> dict[str, nn.Module]:
        nets = {"student": self.student, "fake_winner": self.fake_winner, "fake_loser": self.fake_loser}
        return nets if self.fake_all is None else {**nets, "fake_all": self.fake_all}

    # groups_for_step is f-distill's: student every k-th iteration, every other group on the rest.

    # ---- pieces ------------------------------------------------------------------------------
    def candidates(self, cond: Conditioning, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x_T, x_0) [K n]: K student samples per prompt, made without autograd (only the picked pair is
        generated again with it, so memory does not grow with K)."""
        opts = self.options
        k = opts.samples_per_prompt
        x_T = candidate_noises(self.bundle.latent_shape(n, self.image_size), k, opts.pair_noise, opts.noise_scale,
                               generator)
        with torch.no_grad():
            return x_T, self.generate_x0(self.modules["student"], x_T, Conditioning.cat([cond] * k))

    @torch.no_grad()
    def rank(self, x_0: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Score every candidate with the reward; (best, worst, decided, logs)."""
        n, k = len(prompts), self.options.samples_per_prompt
        images = self.bundle.decode_latents(x_0.detach()).float().clamp(-1, 1)
        scores = self.reward(images, list(prompts) * k).float().reshape(k, n)
        best, worst, decided = best_and_worst(scores, self.options.tie_margin)
        logs = {"reward_winner": scores.max(dim=0).values.mean(), "reward_loser": scores.min(dim=0).values.mean(),
                "tie_fraction": 1.0 - decided.mean()}
        return best, worst, decided, logs

    def perturb_pair(self, x_w: Tensor, x_l: Tensor, generator: torch.Generator):
        """Both images of a pair at one shared t and eps (the paper's generator step)."""
        opts, n = self.options, x_w.shape[0]
        u = opts.t_min + (opts.t_max - opts.t_min) * torch.rand(n, generator=generator, device=x_w.device)
        t = u * self.t_end
        eps = torch.randn(x_w.shape, generator=generator, device=x_w.device)
        alpha, sigma = self._alpha_sigma(t, x_w.ndim)
        return alpha * x_w + sigma * eps, alpha * x_l + sigma * eps, t

    # ---- losses ------------------------------------------------------------------------------
    def student_loss(self, cond: Conditioning, prompts: list[str], generator: torch.Generator):
        opts, b, n = self.options, self.bundle, len(prompts)
        with phase("student"):
            x_T, x_0 = self.candidates(cond, n, generator)
        with phase("reward"):
            best, worst, decided, logs = self.rank(x_0, prompts)
        with phase("student"):  # the picked pair again, now with autograd: same noises, same samples
            pair = torch.cat([pick(x_T, best), pick(x_T, worst)])
            x_pair = self.generate_x0(self.modules["student"], pair, Conditioning.cat([cond, cond]))
        x_w, x_l = x_pair[:n], x_pair[n:]
        x_t_w, x_t_l, t = self.perturb_pair(x_w, x_l, generator)
        x_t, t2 = torch.cat([x_t_w, x_t_l]), torch.cat([t, t])
        with phase("teacher"):
            teacher, _ = self.teacher_x0(x_t, t2, Conditioning.cat([cond, cond]), False)
        # the fake scores are frozen functions here; nothing flows through them
        with torch.no_grad(), phase("fake_score"):
            fake_w, fake_l, preference = self.preference_scores(x_t, t2, cond)
            fake_all = None
            if self.fake_all is not None:
                x0 = self.x0_of(b.predict(self.fake_all, x_t, t2, Conditioning.cat([cond, cond])), x_t, t2)
                fake_all = (x0[:n], x0[n:])
        loss, loss_logs = distill_dpo_loss(x_w, x_l, teacher[:n], teacher[n:], fake_w, fake_l, decided,
                                           opts.winner_weight, opts.loser_weight, opts.loser_cap, fake_all,
                                           opts.reference_weight, preference, opts.preference_guidance)
        return loss, {**logs, **loss_logs}

    def preference_scores(self, x_t: Tensor, t: Tensor, cond: Conditioning):
        """x_t, t [2 n] (winners then losers) -> (x0_fake_w at the winners, x0_fake_l at the losers, preference):
        preference = None, or with preference_guidance > 0 both fake scores at both halves and their difference
        x0_fake_w - x0_fake_l split as (at the winners, at the losers)."""
        b, n = self.bundle, x_t.shape[0] // 2
        if self.options.preference_guidance == 0:
            fake_w = self.x0_of(b.predict(self.fake_winner, x_t[:n], t[:n], cond), x_t[:n], t[:n])
            fake_l = self.x0_of(b.predict(self.fake_loser, x_t[n:], t[n:], cond), x_t[n:], t[n:])
            return fake_w, fake_l, None
        both = Conditioning.cat([cond, cond])
        fake_w = self.x0_of(b.predict(self.fake_winner, x_t, t, both), x_t, t)
        fake_l = self.x0_of(b.predict(self.fake_loser, x_t, t, both), x_t, t)
        diff = fake_w - fake_l
        return fake_w[:n], fake_l[n:], (diff[:n], diff[n:])

    def critic_loss(self, cond: Conditioning, prompts: list[str], generator: torch.Generator):
        b, n = self.bundle, len(prompts)
        with phase("student"):
            _, x_0 = self.candidates(cond, n, generator)
        with phase("reward"):
            best, worst, decided, logs = self.rank(x_0, prompts)
        x_w, x_l = pick(x_0, best), pick(x_0, worst)
        total = torch.zeros(n, device=x_0.device)
        for group, x in (("fake_winner", x_w), ("fake_loser", x_l)):
            x_t, t = self.perturb(x, generator)
            x0_fake = self.x0_of(b.predict(self.modules[group], x_t, t, cond), x_t, t)
            loss = decided * fake_score_loss(x0_fake, x)
            total, logs = total + loss, {**logs, f"loss_{group}": loss.detach().mean()}
        if self.fake_all is not None:  # every candidate, ties included: the student's whole distribution
            k = self.options.samples_per_prompt
            x_t, t = self.perturb(x_0, generator)
            x0_fake = self.x0_of(b.predict(self.modules["fake_all"], x_t, t, Conditioning.cat([cond] * k)), x_t, t)
            loss = fake_score_loss(x0_fake, x_0).reshape(k, n).mean(dim=0)
            total, logs = total + loss, {**logs, "loss_fake_all": loss.detach().mean()}
        return total, logs

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        prompts = list(batch["prompt"])
        with torch.no_grad(), phase("encode"):
            cond = self.bundle.encode_prompt(prompts, image_size=self.image_size)
        total = torch.zeros(len(prompts), device=generator.device)
        logs: dict[str, Tensor] = {}
        if "student" in groups:
            loss, student_logs = self.student_loss(cond, prompts, generator)
            total, logs = total + loss, {**logs, **student_logs}
        if "fake_winner" in groups:
            loss, critic_logs = self.critic_loss(cond, prompts, generator)
            total, logs = total + loss, {**logs, **critic_logs}
        return LossOutput(total, logs)
