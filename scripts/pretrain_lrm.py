#!/usr/bin/env python
"""Pre-train RG-LCD's latent proxy reward model (LRM) offline, for `rg_lcd.lrm.init`.

    python scripts/pretrain_lrm.py --config configs/toy/rg_lcd.yaml --prompts toy-heldin --num-prompts 256 \
        --out outputs/toy/lrm.safetensors

The recipe gives the teacher (`model.source`), the expert (`rg_lcd.reward`), the architecture
(`rg_lcd.lrm.arch`) and the resolution, so the checkpoint fits the run that loads it. For each prompt the
teacher samples K latents with deterministic DDIM at different step counts (`--sample-steps`, a spread of
quality like the student's estimates), or the sets are read from `--sets FILE.safetensors ...` (tensor
"latents" [N, K, C, h, w], header "prompts": a JSON list of N prompts; `--save-sets` writes one; several
files, e.g. of different `--seed`s, are joined in order). On the toy world, `--renders N` builds N contrast
sets instead (pipelines/toy/contrasts.py): the VAE latents of a train-split render and of `--variants` - 1
renders that each change one attribute of it, all judged against the render's caption, so the LRM sees
sets that differ only in what a caption asks for. `--estimates` then replaces every latent by what the LRM meets
in RG-LCD, a one-step estimate: each set is re-noised to a timestep of the recipe's DDIM grid
(`num_ddim_timesteps`; one timestep and one noise per set, shared by its K latents, so they still differ only
in content) and the teacher's guided estimate of x0 taken from there. `--resample K` instead re-noises each set
to the K-th last timestep of that grid and samples it back with the teacher's guided DDIM over the last K steps
(SDEdit): the content of the latents stays, their texture becomes the teacher's. The expert scores
the decoded latents once; the LRM is then fitted to softmax(a * expert) over each prompt's K latents with
the same KL as online training (trainers/latent_reward.py), and saved as safetensors. `--val-prompts N` holds
the last N sets out of the fit and reports the LRM's KL and pair agreement on them at every log line: the
agreement on sets it never saw is what tells whether it learned the expert or memorised the training sets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from pipelines.toy.contrasts import CHANGES  # noqa: E402
from trainers.config import load_config_for_cli  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="an rg_lcd recipe (teacher, expert reward, LRM architecture)")
    p.add_argument("--out", required=True, help="where to write the LRM checkpoint (.safetensors)")
    p.add_argument("--prompts", help="toy-heldin, toy-heldout, a benchmark name or a prompt file (to generate sets)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--sample-steps", default="1,2,4,8", help="DDIM step counts of the K samples per prompt")
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: rg_lcd.guidance)")
    p.add_argument("--renders", type=int, default=None, help="toy world: fit on N contrast sets of train-split "
                                                                 "renders instead (see --variants)")
    p.add_argument("--variants", type=int, default=4, help="candidates per contrast set: the render and K - 1 "
                                                            "one-change variants of it")
    p.add_argument("--changes", default=",".join(CHANGES), help="the kinds of change --renders draws variants from")
    p.add_argument("--estimates", action="store_true", help="replace every latent by the teacher's guided one-step "
                                                             "estimate from a re-noised copy (see the docstring)")
    p.add_argument("--resample", type=int, default=0, help="re-noise every set to the K-th last timestep of the "
                                                             "recipe's DDIM grid and sample it back with the teacher "
                                                             "over those K steps (see the docstring)")
    p.add_argument("--sets", nargs="+", help="read (latent, prompt) sets from these safetensors files (joined in "
                                             "order) instead of generating")
    p.add_argument("--save-sets", help="also write the generated sets here")
    p.add_argument("--train-steps", type=int, default=1000, help="0 with --init only measures a checkpoint on the "
                                                                   "--val-prompts sets")
    p.add_argument("--init", help="start from this LRM checkpoint (e.g. one fitted on --renders) instead of random")
    p.add_argument("--batch-size", type=int, default=16, help="prompts (each with its K latents) per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-prompts", type=int, default=0, help="hold the last N sets out of the fit and report the "
                                                                "LRM's agreement with the expert on them")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    return p.parse_args(argv)


@torch.no_grad()
def generate_sets(bundle, prompts: list[str], steps: list[int], guidance: float, size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Latents [N, K, C, h, w]: sample k of prompt i is DDIM with steps[k] from its own noise."""
    from pipelines.samplers import sample_ddim

    model_fn = guided_teacher(bundle, prompts, 1, guidance, size)
    sets = []
    for n in steps:
        x_T = torch.randn(bundle.latent_shape(len(prompts), (size, size)), generator=generator,
                          device=generator.device)
        sets.append(sample_ddim(model_fn, x_T, bundle.schedule.timesteps(n), bundle.schedule).float())
    return torch.stack(sets, dim=1)


@torch.no_grad()
def score_sets(bundle, reward, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Expert scores [N, K] of the decoded latents."""
    return torch.stack([reward(bundle.decode_latents(latents[:, k]).clamp(-1, 1), prompts)
                        for k in range(latents.shape[1])], dim=1)


@torch.no_grad()
def encode_renders(bundle, n: int, k: int, seed: int, size: int, changes: tuple[str, ...],
                   batch: int = 512) -> tuple[Tensor, list[str]]:
    """Latents [n, k, C, h, w] of n contrast sets of toy renders (posterior means), and their captions."""
    from pipelines.toy.contrasts import render_contrast_sets

    images, prompts = render_contrast_sets(n, k, seed=seed, resolution=size, changes=changes)
    flat = images.flatten(0, 1)
    latents = torch.cat([bundle.encode_images(flat[i:i + batch]).float() for i in range(0, len(flat), batch)])
    return latents.view(n, k, *latents.shape[1:]), prompts


def guided_teacher(bundle, prompts: list[str], k: int, guidance: float, size: int):
    """The teacher's guided (x0, eps) model function for a flattened batch of sets: each prompt repeated k times."""
    from pipelines.samplers import guided

    texts = [p for p in prompts for _ in range(k)]
    cond = bundle.encode_prompt(texts, image_size=(size, size))
    uncond = bundle.encode_unconditional(len(texts), image_size=(size, size))
    predict = lambda x, t, c: bundle.predict(bundle.denoiser, x, t, c)  # noqa: E731
    return guided(predict, cond, uncond, guidance, bundle.prediction_type, bundle.schedule)


@torch.no_grad()
def one_step_estimates(bundle, latents: Tensor, prompts: list[str], guidance: float, num_timesteps: int, size: int,
                       generator: torch.Generator, batch: int = 128) -> Tensor:
    """[N, K, ...]: the teacher's guided x0 estimates from x_t = alpha_t z + sigma_t eps, with t drawn from the
    DDIM grid of `num_timesteps` and eps drawn once per set (shared by its K latents)."""
    n, k = latents.shape[:2]
    grid = bundle.schedule.timesteps(num_timesteps).to(latents.device)
    out = []
    for start in range(0, n, batch):
        z = latents[start:start + batch]
        m = len(z)
        t = grid[torch.randint(len(grid), (m,), generator=generator, device=generator.device).to(grid.device)]
        eps = torch.randn(z[:, 0].shape, generator=generator, device=generator.device).to(z)
        alpha, sigma = (a.float().view(m, 1, 1, 1, 1) for a in bundle.schedule.alpha_sigma(t))
        x_t = (alpha * z + sigma * eps[:, None]).flatten(0, 1)
        model_fn = guided_teacher(bundle, prompts[start:start + batch], k, guidance, size)
        out.append(model_fn(x_t, t.repeat_interleave(k))[0].float().view_as(z))
    return torch.cat(out)


@torch.no_grad()
def resample(bundle, latents: Tensor, prompts: list[str], guidance: float, num_timesteps: int, k_steps: int,
             size: int, generator: torch.Generator, batch: int = 128) -> Tensor:
    """[N, K, ...]: each set re-noised to the k_steps-th last timestep of the DDIM grid (one noise per set) and
    sampled back by the teacher with guided DDIM over the grid's last k_steps timesteps."""
    from pipelines.samplers import sample_ddim

    n, k = latents.shape[:2]
    grid = bundle.schedule.timesteps(num_timesteps)[-k_steps:]
    alpha, sigma = (a.float() for a in bundle.schedule.alpha_sigma(grid[:1]))
    out = []
    for start in range(0, n, batch):
        z = latents[start:start + batch]
        eps = torch.randn(z[:, 0].shape, generator=generator, device=generator.device).to(z)
        x_t = (alpha.to(z) * z + sigma.to(z) * eps[:, None]).flatten(0, 1)
        model_fn = guided_teacher(bundle, prompts[start:start + batch], k, guidance, size)
        out.append(sample_ddim(model_fn, x_t, grid, bundle.schedule).float().view_as(z))
    return torch.cat(out)


def read_sets(paths: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The sets of every file, joined in order; their K and latent shapes must agree."""
    from safetensors import safe_open

    latents, prompts = [], []
    for path in paths:
        with safe_open(path, "pt") as fh:
            tensor, header = fh.get_tensor("latents"), fh.metadata() or {}
        if "prompts" not in header or tensor.ndim != 5:
            raise ValueError(f"--sets {path}: need tensor 'latents' [N, K, C, h, w] and a 'prompts' JSON header")
        if latents and tensor.shape[1:] != latents[0].shape[1:]:
            raise ValueError(f"--sets {path}: sets of shape {list(tensor.shape[1:])} cannot join "
                             f"{paths[0]}'s {list(latents[0].shape[1:])} (K and latent shape must agree)")
        latents.append(tensor)
        prompts += json.loads(header["prompts"])
    return torch.cat(latents), prompts


@torch.no_grad()
def evaluate_fit(lrm, latents, states, mask, scores, logit_scale: float,
                 batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-set KL [N], per-candidate-pair agreement [N, K(K-1)/2] and the LRM's scores [N, K]."""
    from trainers.latent_reward import pair_agreement, preference_kl

    n, k = scores.shape
    predicted = torch.cat([score_batch(lrm, latents, states, mask, torch.arange(s, min(s + batch_size, n)), k)
                           for s in range(0, n, batch_size)])
    return preference_kl(scores, predicted, logit_scale), pair_agreement(scores, predicted), predicted


@torch.no_grad()
def checker_verdicts(bundle, latents: Tensor, prompts: list[str]) -> Tensor:
    """bool [N, K]: whether the toy world's exact checker passes each decoded latent against its set's prompt."""
    from pipelines.toy.checker import check_batch

    return torch.stack([check_batch(bundle.decode_latents(latents[:, k]).clamp(-1, 1), prompts)
                        for k in range(latents.shape[1])], dim=1)


def pass_fail_report(passed: Tensor, expert: Tensor, lrm: Tensor) -> str:
    """On the pairs of a set where the checker passes one sample and fails the other, how often the expert and
    the LRM score the passing one higher: what a reward has to get right to lift the pass rate."""
    k = passed.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    mixed = passed[:, i] != passed[:, j]
    toward_pass = torch.where(passed[:, i], 1.0, -1.0)[mixed]
    share = lambda s: ((s[:, i] - s[:, j])[mixed] * toward_pass > 0).float().mean().item()  # noqa: E731
    return (f"{int(mixed.sum())} pass/fail pairs: the passing sample scores higher under the expert in "
            f"{share(expert):.3f}, under the LRM in {share(lrm):.3f}")


def by_candidates(agree: Tensor, k: int) -> str:
    """'0-1 0.78, 0-2 0.75, ...': agreement per pair of candidate slots, where slot k is sample k of a set (with
    generated sets, the k-th of --sample-steps): a proxy that ranks only by quality agrees on mixed-step pairs
    and is at chance on pairs of equal steps."""
    i, j = torch.triu_indices(k, k, offset=1).tolist()
    return ", ".join(f"{a}-{b} {v:.2f}" for a, b, v in zip(i, j, agree.mean(0).tolist()))


def score_batch(lrm, latents, states, mask, idx, k: int) -> torch.Tensor:
    """LRM scores [len(idx), K] of the K latents of the sets `idx`."""
    rep = lambda a: None if a is None else a[idx].repeat_interleave(k, dim=0)  # noqa: E731
    return lrm(latents[idx].flatten(0, 1), rep(states), rep(mask)).view(len(idx), k)


def fit(lrm, train, val, options, args, generator) -> Tensor | None:
    """Minimise the mean KL(softmax(a * expert) || softmax(LRM)) over each prompt's K latents of `train`
    (latents, states, mask, scores); report the held-out sets `val` (or None) at every log line, and return the
    LRM's final scores of them."""
    from trainers.latent_reward import pairwise_agreement, preference_kl

    latents, states, mask, scores = train
    optimizer = torch.optim.AdamW(lrm.parameters(), lr=args.lr)
    n, k = scores.shape
    held_out = None  # the evaluation of `val` at the last step (which always logs), reused at the end
    for step in range(1, args.train_steps + 1):
        idx = torch.randint(0, n, (min(args.batch_size, n),), generator=generator, device=generator.device)
        predicted = score_batch(lrm, latents, states, mask, idx, k)
        loss = preference_kl(scores[idx], predicted, options.expert_logit_scale).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.train_steps:
            agree = pairwise_agreement(scores[idx], predicted.detach()).mean()
            line = f"step {step}: kl {loss.item():.4f}, pair agreement {agree.item():.3f}"
            if val is not None:
                lrm.eval()
                held_out = evaluate_fit(lrm, *val, options.expert_logit_scale, args.batch_size)
                lrm.train()
                line += f"; held-out sets: kl {held_out[0].mean():.4f}, pair agreement {held_out[1].mean():.3f}"
            print(line, flush=True)
    if val is not None:
        lrm.eval()
        if held_out is None:  # --train-steps 0
            held_out = evaluate_fit(lrm, *val, options.expert_logit_scale, args.batch_size)
        val_kl, val_agree, predicted = held_out
        print(f"held-out sets at the end: kl {val_kl.mean():.4f}, pair agreement {val_agree.mean():.3f}; by candidates: "
              f"{by_candidates(val_agree, k)}", flush=True)
        return predicted
    return None


def usage_error(args: argparse.Namespace, cfg, changes: tuple[str, ...], toy: bool) -> str | None:
    """The one-line message for options that cannot run together, checked before anything loads."""
    if cfg.method != "rg_lcd" or sum(a is not None for a in (args.prompts, args.sets, args.renders)) != 1:
        return "needs an rg_lcd recipe and exactly one of --prompts, --sets and --renders"
    if args.renders is not None and (not toy or args.renders < 1 or args.variants < 2):
        return (f"--renders needs a toy recipe (model.source toy or toy-flow, got {cfg.model.source!r}),"
                f" N >= 1 (got {args.renders}) and --variants >= 2 (got {args.variants})")
    if not changes or set(changes) - set(CHANGES):
        return f"--changes {args.changes!r}: name some of {', '.join(CHANGES)}"
    if args.estimates and args.resample or not 0 <= args.resample <= cfg.options.num_ddim_timesteps:
        return (f"--resample must be in [0, num_ddim_timesteps = {cfg.options.num_ddim_timesteps}] "
                f"(got {args.resample}) and not given with --estimates")
    if args.val_prompts < 0 or args.train_steps < 0:
        return f"--val-prompts and --train-steps must be >= 0, got {args.val_prompts} and {args.train_steps}"
    return None


def read_inputs(args: argparse.Namespace, bundle, size: int, changes: tuple[str, ...], device):
    """(latents or None when they are still to be sampled, prompts) from --sets, --renders or --prompts."""
    if args.sets:
        latents, prompts = read_sets(args.sets)
        return latents[:args.num_prompts].to(device), prompts[:args.num_prompts]
    if args.renders:
        return encode_renders(bundle, args.renders, args.variants, args.seed, size, changes)
    from evaluation.prompts import load_prompts

    return None, load_prompts(args.prompts, n=args.num_prompts, seed=args.seed).prompts


def candidate_latents(args: argparse.Namespace, bundle, latents, prompts: list[str], guidance: float, opts,
                      size: int, generator: torch.Generator) -> torch.Tensor:
    """The sets the LRM fits: sampled when not read, then as one-step estimates or resampled if asked (and saved)."""
    if latents is None:
        latents = generate_sets(bundle, prompts, [int(s) for s in args.sample_steps.split(",")], guidance, size,
                                generator)
    if args.estimates:
        latents = one_step_estimates(bundle, latents, prompts, guidance, opts.num_ddim_timesteps, size, generator)
    if args.resample:
        latents = resample(bundle, latents, prompts, guidance, opts.num_ddim_timesteps, args.resample, size,
                           generator)
    if args.save_sets:
        from safetensors.torch import save_file

        save_file({"latents": latents.cpu().contiguous()}, args.save_sets, metadata={"prompts": json.dumps(prompts)})
    return latents


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_for_cli(args.config, args.overrides)
    if cfg is None:
        return 2
    from pipelines.backbones import ALIASES

    toy = cfg.model.source in ALIASES  # "toy" or "toy-flow": the world whose renders and checker exist
    changes = tuple(c.strip() for c in args.changes.split(",") if c.strip())
    error = usage_error(args, cfg, changes, toy)
    if error is not None:
        print(f"pretrain_lrm: {error}", file=sys.stderr)
        return 2
    from trainers.latent_reward import LatentRewardModel, load_latent_reward, save_latent_reward, text_inputs
    from trainers.rg_lcd import build_expert
    from trainers.run import load_run_bundle

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(args.seed)
    bundle = load_run_bundle(cfg, device)
    size, opts = cfg.data.resolution, cfg.options
    latents, prompts = read_inputs(args, bundle, size, changes, device)
    n_fit = len(prompts) - args.val_prompts
    if n_fit < 1:
        print(f"pretrain_lrm: --val-prompts {args.val_prompts} leaves no set to fit ({len(prompts)} prompts)",
              file=sys.stderr)
        return 2
    guidance = args.guidance if args.guidance is not None else opts.guidance
    latents = candidate_latents(args, bundle, latents, prompts, guidance, opts, size, generator)
    reward = build_expert(opts.reward, device, getattr(torch, cfg.model.weight_dtype))
    scores = score_sets(bundle, reward, latents, prompts)
    states, mask = text_inputs(bundle.encode_prompt(prompts, image_size=(size, size)))
    if args.init:
        lrm = load_latent_reward(args.init, opts.lrm.arch, latents.shape[2], states.shape[-1]).to(device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            lrm = LatentRewardModel(opts.lrm.arch, latents.shape[2], states.shape[-1]).to(device)
    sets = (latents, states, mask, scores)
    split = lambda lo, hi: tuple(None if a is None else a[lo:hi] for a in sets)  # noqa: E731
    predicted = fit(lrm, split(0, n_fit), split(n_fit, None) if args.val_prompts else None, opts.lrm, args, generator)
    if predicted is not None and toy:
        passed = checker_verdicts(bundle, latents[n_fit:], prompts[n_fit:])
        print(f"held-out sets, {pass_fail_report(passed, scores[n_fit:], predicted)}", flush=True)
    out = save_latent_reward(lrm, args.out)
    print(f"wrote {out}: {len(prompts)} prompts x {latents.shape[1]} latents; set rg_lcd.lrm.init: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
