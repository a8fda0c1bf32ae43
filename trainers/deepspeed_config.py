"""DeepSpeed's engine settings come from the recipe, so the two can never disagree.

DeepSpeed runs its own micro-batch bookkeeping, clipping and optimizer step inside `backward` (accelerate
calls `engine.step()` there), so its config must carry the recipe's `train.batch_size` (per process),
`train.gradient_accumulation` and `train.max_grad_norm`. A value left out of the accelerate config (or
set to "auto") is filled from the recipe; a number that differs is an error naming both, because
training with either one silently would not be the run the recipe describes.
"""
from __future__ import annotations

RECIPE_KEYS = {  # DeepSpeed key -> recipe key
    "train_micro_batch_size_per_gpu": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "gradient_clipping": "max_grad_norm",
}


def fill_deepspeed_config(config: dict, train) -> dict:
    """Fill DeepSpeed `config` in place from the recipe's `train` section; returns it."""
    for key, recipe_key in RECIPE_KEYS.items():
        want = getattr(train, recipe_key)
        have = config.get(key, "auto")
        if have == "auto":
            config[key] = want
        elif float(have) != float(want):
            raise ValueError(f"DeepSpeed config {key}={have} but the recipe has train.{recipe_key}={want}; remove "
                             f"{key} from the accelerate config (it is filled from the recipe) or make them equal")
    return config
