#!/usr/bin/env python
"""Build a preference set: sample a model K times per prompt, rank the samples with a reward.

    accelerate launch scripts/make_preferences.py --model toy --prompts toy-heldin --num-prompts 1024 \
        --prompt-seed 1 --out outputs/toy_preferences --samples 4 --reward toy_attributes --resolution 32

Any reward of `rewards.build_reward` ranks the samples, including non-differentiable judges
such as the toy attribute checker. The best and the worst sample of a prompt become a pair
(`--pairs extremes`), or every two samples with different scores do, the better one chosen
(`--pairs all`: up to K(K-1)/2 pairs per prompt from the same images); samples that score the
same give no pair (a tie says nothing about preference). `--min-gap G` keeps only the pairs whose
chosen sample outscores the rejected one by at least G: a reward's small differences between samples
of one prompt are often its noise rather than a preference.
Output, the `preference_folder` layout of `trainers/preference_data.py`:

    <out>/images/000012_3.png           sample 3 of prompt 12
    <out>/parts/000012.json             scores and the chosen pair of prompt 12 (written last, atomically)
    <out>/preferences.jsonl             {"prompt", "chosen", "rejected", "scores"} per pair, merged at the end

`--noise-correlation RHO` gives a prompt's samples starting noises correlated RHO (one shared draw mixed into
each), so they share a layout and a pair differs mostly where the reward decides.

`--relabel-from SRC` ranks the samples of an existing set SRC with another reward instead of
sampling again (the new records point at SRC's images), so one sampling run serves several judges.
Prompts are sharded across processes (prompt i on rank i mod world size) and sample k of
prompt i starts from noise seeded by (seed, i, k) alone, so the set is the same for any number
of processes and devices. A prompt
whose part file exists is skipped: re-running the command resumes an interrupted build. The
options that shape the samples and scores are kept in `<out>/settings.json`; resuming with other ones
is an error before anything loads (`--pairs` and `--min-gap` may change: they only re-merge).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.atomic_files import write_json_atomic  # noqa: E402
from trainers.data import mix_seed  # noqa: E402

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


# The options that decide what a part file holds; --pairs and --min-gap only change the merge.
SETTINGS = ("model", "prompts", "num_prompts", "prompt_seed", "relabel_from", "samples", "reward", "reward_options",
            "steps", "guidance", "resolution", "seed", "dtype", "noise_correlation")
# What a settings.json written before an option existed meant by it.
SETTING_DEFAULTS = {"reward_options": {}, "noise_correlation": 0.0}


def check_settings(out: Path, args: argparse.Namespace) -> dict:
    """The run's settings; a ValueError naming every difference when `out` was built with others."""
    settings = {k: getattr(args, k) for k in SETTINGS}
    path = out / "settings.json"
    if path.is_file():
        old = {**SETTING_DEFAULTS, **json.loads(path.read_text())}
        diff = [f"--{k.replace('_', '-')} {old.get(k)!r} there, {v!r} now" for k, v in settings.items()
                if old.get(k) != v]
        if diff:
            raise ValueError(f"{out} holds a preference set made with other options ({'; '.join(diff)}); "
                             "re-run with the same options to resume, or choose a new --out folder")
    return settings


def write_settings(out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "settings.json", settings)


def part_path(out: Path, index: int) -> Path:
    return out / "parts" / f"{index:06d}.json"


def rank_samples(scores: Sequence[float]) -> tuple[int, int] | None:
    """(best, worst) sample indices, or None when every score is equal; first index wins ties."""
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], k))
    return None if scores[best] == scores[worst] else (best, worst)


def ranked_record(index: int, prompt: str, names: list[str], scores: list[float]) -> dict:
    """A prompt's part record: its samples, their scores, and the best-vs-worst pair (None on a tie)."""
    pair = rank_samples(scores)
    return {"index": index, "prompt": prompt, "images": names, "scores": scores,
            "chosen": names[pair[0]] if pair else None, "rejected": names[pair[1]] if pair else None}


def correlated_noise(independent: torch.Tensor, shared: torch.Tensor, rho: float) -> torch.Tensor:
    """sqrt(rho) shared + sqrt(1 - rho) independent[k]: unit-variance starting noises of one prompt's samples whose
    pairwise correlation is rho, so its samples share a layout and differ in details (rho 0: independent)."""
    return rho ** 0.5 * shared + (1 - rho) ** 0.5 * independent


def starting_noise(shape: tuple[int, ...], seeds: list[int], rho: float, device) -> torch.Tensor:
    """x_T of one prompt's samples: each from its own seed, mixed at correlation rho with one shared draw seeded
    by all of them (so the set still depends on (seed, prompt index) alone)."""
    from trainers.method import initial_noise

    x_T = initial_noise(shape, seeds, device)
    return correlated_noise(x_T, initial_noise(shape, [mix_seed(*seeds)], device), rho) if rho > 0 else x_T


def _save_png(image: torch.Tensor, path: Path) -> None:
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)


def make_preferences(sample: Callable[[list[str], list[int]], torch.Tensor], reward: RewardFn,
                     prompts: Sequence[str], out: str | Path, *, samples: int, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> int:
    """Sample, score and record every prompt of this rank not recorded yet; returns how many it did.

    `sample(prompts, seeds) -> images [N, 3, H, W] in [-1, 1]`, image n from noise seeded by seeds[n];
    `reward(images, prompts) -> [N]`.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to form a pair, got {samples}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    done = 0
    for i in range(rank, len(prompts), world_size):
        if part_path(out, i).is_file():
            continue
        batch = [prompts[i]] * samples
        images = sample(batch, [mix_seed(seed, i, k) for k in range(samples)])
        scores = [float(s) for s in reward(images, batch)]
        names = [f"images/{i:06d}_{k}.png" for k in range(samples)]
        for image, name in zip(images, names):
            _save_png(image, out / name)
        write_json_atomic(part_path(out, i), ranked_record(i, prompts[i], names, scores))
        done += 1
    return done


def _load_png(path: Path) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def say_line(line: str) -> None:
    """Print one line in a single write: the ranks share one stdout, and a launcher that runs Python unbuffered
    turns print()'s separate text and newline writes into lines of two ranks run together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def relabel(src: str | Path, reward: RewardFn, out: str | Path, *, rank: int = 0, world_size: int = 1) -> int:
    """Rank the samples of the set in `src` with `reward` into `out` (same part layout, resumable).

    Records keep `src`'s image files (paths relative to `out`); returns how many prompts it did.
    """
    src, out = Path(src), Path(out)
    parts = sorted((src / "parts").glob("*.json"))
    if not parts:
        raise FileNotFoundError(f"--relabel-from '{src}' has no parts/*.json; point it at a make_preferences.py output")
    if src.resolve() == out.resolve():
        raise ValueError(f"--relabel-from and --out are both '{out}'; write the relabelled set to another folder")
    (out / "parts").mkdir(parents=True, exist_ok=True)
    done = 0
    for part in parts[rank::world_size]:
        old = json.loads(part.read_text())
        if part_path(out, old["index"]).is_file():
            continue
        images = torch.stack([_load_png(src / name) for name in old["images"]])
        batch = [old["prompt"]] * len(images)
        scores = [float(s) for s in reward(images, batch)]
        names = [os.path.relpath(src / name, out) for name in old["images"]]
        write_json_atomic(part_path(out, old["index"]), ranked_record(old["index"], old["prompt"], names, scores))
        done += 1
    return done


def all_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """Every (better, worse) index pair with different scores, in sample order."""
    n = len(scores)
    return [(j, k) if scores[j] > scores[k] else (k, j)
            for j in range(n) for k in range(j + 1, n) if scores[j] != scores[k]]


def record_pairs(record: dict, pairs: str, min_gap: float = 0.0) -> list[dict]:
    """The preference lines of one part record: its extremes pair, or all its strictly ordered pairs, each
    kept only when the chosen sample outscores the rejected one by at least `min_gap`."""
    scores, names = record["scores"], record["images"]
    if pairs == "extremes":
        chosen = [(names.index(record["chosen"]), names.index(record["rejected"]))] if record["chosen"] else []
    else:
        chosen = all_pairs(scores)
    return [{"prompt": record["prompt"], "chosen": names[w], "rejected": names[l], "scores": scores}
            for w, l in chosen if scores[w] - scores[l] >= min_gap]


PAIRINGS = ("extremes", "all")


def merge_parts(out: str | Path, pairs: str = "extremes", min_gap: float = 0.0) -> int:
    """Write <out>/preferences.jsonl from the part files (prompt order); returns the number of pairs."""
    if pairs not in PAIRINGS:
        raise ValueError(f"pairs must be one of {PAIRINGS}, got {pairs!r}")
    out = Path(out)
    records = sorted((json.loads(p.read_text()) for p in (out / "parts").glob("*.json")), key=lambda r: r["index"])
    lines = [json.dumps(line) for r in records for line in record_pairs(r, pairs, min_gap)]
    tmp = out / "preferences.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out / "preferences.jsonl")
    return len(lines)


def _mapping(text: str) -> dict:
    import yaml

    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"need a YAML mapping such as '{{terms: {{toy_clip: 1.0}}}}', got {text!r}")
    return value


def build_ranker(name: str, options: dict, device):
    """The reward that ranks the samples; options it does not take are an error naming the ones it does."""
    from rewards import REWARDS, accepted_options, build_reward

    if name not in REWARDS:
        raise SystemExit(f"make_preferences: --reward: unknown reward {name!r} (known: {', '.join(REWARDS)})")
    accepted = accepted_options(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise SystemExit(f"make_preferences: --reward-options: {unknown} not accepted by reward {name!r} "
                         f"(it takes {sorted(accepted)})")
    return build_reward(name, device=device, **options)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", help="pipeline folder, hub id or alias (toy); not with --relabel-from")
    parser.add_argument("--prompts", help="toy-heldin / toy-heldout, a benchmark set, or a .txt (one per line) or "
                                          ".jsonl with a 'prompt' column")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (toy sets: draw N)")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the toy prompt draw (apart from --seed)")
    parser.add_argument("--relabel-from", metavar="SRC", help="rank the samples of an existing set SRC with --reward "
                                                              "instead of sampling (no --model or --prompts)")
    parser.add_argument("--out", required=True, help="output folder (preference_folder layout)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (K)")
    parser.add_argument("--reward", default="toy_attributes", help="a name from rewards.REWARDS")
    parser.add_argument("--reward-options", default="{}", type=_mapping, metavar="YAML",
                        help="keyword options of the reward's builder as a YAML mapping, e.g. "
                             "'{terms: {toy_attribute_score: 1.0, toy_attribute_net: 0.001}}' for --reward weighted")
    parser.add_argument("--pairs", default="extremes", choices=PAIRINGS,
                        help="extremes: best vs worst sample per prompt; all: every two samples that score differently")
    parser.add_argument("--min-gap", type=float, default=0.0,
                        help="keep a pair only when its chosen sample outscores the rejected one by at least this "
                             "(in the reward's units; a merge option like --pairs)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed; prompt i uses noise seeded by (seed, i)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--noise-correlation", type=float, default=0.0, metavar="RHO",
                        help="correlation of the starting noises of one prompt's samples (0: independent); near 1 "
                             "its samples look alike and a pair differs mostly where the reward decides")
    args = parser.parse_args(argv)
    if not 0 <= args.noise_correlation < 1:
        parser.error(f"--noise-correlation must be in [0, 1) (1 would make every sample the same), "
                     f"got {args.noise_correlation}")
    if args.min_gap < 0:
        parser.error(f"--min-gap must be >= 0 (a pair's score gap is positive), got {args.min_gap}")
    if args.relabel_from is None and (args.model is None or args.prompts is None):
        parser.error("--model and --prompts are required unless --relabel-from is given")
    if args.relabel_from is not None and (args.model is not None or args.prompts is not None):
        parser.error("--relabel-from reuses that set's prompts and images: drop --model and --prompts")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    from evaluation.prompts import load_prompts
    from pipelines.backbones import load_bundle
    from pipelines.devices import has_accelerator
    from pipelines.sampling import sample_images

    accelerator = Accelerator(cpu=not has_accelerator())  # without it a CPU --multi_gpu launch is N copies of rank 0
    try:
        settings = check_settings(Path(args.out), args)
    except ValueError as err:
        raise SystemExit(f"make_preferences: {err}") from None
    accelerator.wait_for_everyone()  # every rank has checked before the settings are (re)written
    if accelerator.is_main_process:
        write_settings(Path(args.out), settings)
    if args.relabel_from is not None:
        return _relabel_main(args, accelerator)
    prompts = load_prompts(args.prompts, n=args.num_prompts, seed=args.prompt_seed).prompts  # fails before loading
    device = accelerator.device
    reward = build_ranker(args.reward, args.reward_options, device)
    bundle = load_bundle(args.model, dtype=getattr(torch, args.dtype), device=device)
    bundle.denoiser.requires_grad_(False).eval()
    size = (args.resolution, args.resolution) if args.resolution else bundle.default_image_size

    def sample(batch: list[str], seeds: list[int]) -> torch.Tensor:
        x_T = starting_noise(bundle.latent_shape(1, size)[1:], seeds, args.noise_correlation, device)
        return sample_images(bundle, bundle.denoiser, batch, args.steps, args.guidance, x_T, size)

    done = make_preferences(sample, reward, prompts, args.out, samples=args.samples, seed=args.seed,
                            rank=accelerator.process_index, world_size=accelerator.num_processes)
    say_line(f"rank {accelerator.process_index} of {accelerator.num_processes}: {done} new prompts")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pairs = merge_parts(args.out, args.pairs, args.min_gap)
        print(f"{pairs} pairs from {len(prompts)} prompts in {Path(args.out) / 'preferences.jsonl'}")
    return 0


def _relabel_main(args: argparse.Namespace, accelerator) -> int:
    reward = build_ranker(args.reward, args.reward_options, accelerator.device)
    done = relabel(args.relabel_from, lambda x, p: reward(x.to(accelerator.device), p).cpu(), args.out,
                   rank=accelerator.process_index, world_size=accelerator.num_processes)
    say_line(f"rank {accelerator.process_index} of {accelerator.num_processes}: {done} prompts relabelled")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"{merge_parts(args.out, args.pairs, args.min_gap)} pairs in {Path(args.out) / 'preferences.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
