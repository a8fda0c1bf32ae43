#!/usr/bin/env python
"""Encode a recipe's training images with its VAE once, so training reads latents instead of images.

    python scripts/cache_latents.py --config configs/sd15_sft_lpl.yaml --out /data/latents [key=value ...]
    accelerate launch scripts/distill.py --config configs/sd15_sft_lpl.yaml data.kind=latent_cache data.path=/data/latents

The images come from the recipe's `data` block and are resized and cropped as training would (the
augmentation is frozen at `data.seed`); the VAE is the recipe's `model.source`. Each latent is one
draw from the VAE posterior (seeded by `--seed`), as SFT draws one per step. Unreadable images are
skipped and counted. Methods that read `latents` from a batch (SFT, reflow, f-distill real data) then
skip the VAE encoder entirely.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.config import load_config_for_cli  # noqa: E402


IMAGE_KINDS = ("imagefolder", "hf_disk", "webdataset", "toy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML recipe whose data and model to use")
    parser.add_argument("--out", required=True, help="cache folder to write (safetensors shards + index.json)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per VAE call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior draws")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, e.g. data.path=/data/imgs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_for_cli(args.config, args.overrides)
    if cfg is None:
        return 2
    if cfg.data.kind not in IMAGE_KINDS:
        print(f"config error: {args.config}: data.kind: {cfg.data.kind} has no images to encode (use one of "
              f"{', '.join(IMAGE_KINDS)})", file=sys.stderr)
        return 2
    if Path(args.out, "index.json").exists():
        print(f"error: {args.out} already holds a cache; choose another --out or delete it", file=sys.stderr)
        return 2
    import torch
    from tqdm.auto import tqdm

    from trainers.data import build_dataset
    from trainers.data_cache import cache_latents
    from trainers.run import load_run_bundle

    dataset = build_dataset(cfg.data)  # data errors before the model loads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_run_bundle(cfg, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    bar = tqdm(total=len(dataset), desc="encode", unit="img")

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        bar.update(pixels.shape[0])
        return bundle.encode_images(pixels.to(device), generator).float()

    start = time.perf_counter()
    with torch.no_grad():
        index = cache_latents(dataset, encode, args.out, batch_size=args.batch_size)
    bar.close()
    print(f"cached {len(index['prompts'])} latents ({index['skipped']} unreadable images skipped) in {args.out} "
          f"in {time.perf_counter() - start:.1f}s; train with data.kind=latent_cache data.path={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
