#!/usr/bin/env python
"""Train any diffstill method from a YAML recipe.

    accelerate launch scripts/distill.py --config configs/toy/sft_lpl.yaml [key=value ...]
    python scripts/distill.py --config configs/toy/sft_lpl.yaml train.max_steps=10 --dry-run

The config is checked completely before any model loads; the resolved config
is printed and saved in the run folder. Re-running the same command resumes
from the newest checkpoint. SIGTERM writes a checkpoint and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.config import dump_config, load_config_for_cli  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_for_cli(args.config, args.overrides)
    if cfg is None:
        return 2
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    if cfg.train.log_with == "wandb" and importlib.util.find_spec("wandb") is None:
        print(f"config error: {args.config}: train.log_with: wandb is not installed "
              "(pip install 'diffstill[wandb]', or set train.log_with=tensorboard)", file=sys.stderr)
        return 2
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from pipelines.devices import has_accelerator
    from trainers.run import run

    log_with = None if cfg.train.log_with == "none" else cfg.train.log_with
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs"))
    # cpu=True makes multi-process CPU runs gloo DDP, but it would also switch a DeepSpeed launch off.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=log_with, project_config=project,
                              cpu=not has_accelerator() and not deepspeed)
    accelerator.print(dump_config(cfg), end="")
    return run(cfg, accelerator, recipe_path=args.config)


if __name__ == "__main__":
    sys.exit(main())
