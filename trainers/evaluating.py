"""In-training evaluation: the same prompts and seeds every time, numbers logged beside the loss.

Built once before step 0 (so a missing metric weight fails before any training),
then called every `eval.every` steps on every process (generation is sharded).
"""
from __future__ import annotations

from trainers.config import RunConfig


class InTrainingEval:
    def __init__(self, cfg: RunConfig, method, accelerator):
        from evaluation.prompts import load_prompts
        from evaluation.scoring import ScoringOptions, build_scoring

        self.cfg, self.method, self.acc = cfg.eval, method, accelerator
        self.prompts = load_prompts(self.cfg.prompts, n=self.cfg.num_prompts).prompts
        options = ScoringOptions(feature_model=self.cfg.feature_model)
        self.scoring = build_scoring(list(self.cfg.metrics), self.prompts, images_per_prompt=self.cfg.images_per_prompt,
                                     device=accelerator.device, options=options)

    def __call__(self) -> dict[str, float]:
        from evaluation.harness import evaluate_in_training

        rec = self.method.recommended()
        steps = self.cfg.steps or rec.steps
        guidance = self.cfg.guidance if self.cfg.guidance is not None else rec.guidance
        sample = lambda prompts, seeds: self.method.sample(list(prompts), list(seeds), steps, guidance)  # noqa: E731
        values = evaluate_in_training(sample, self.prompts, self.scoring, seed=self.cfg.seed,
                                      images_per_prompt=self.cfg.images_per_prompt, batch_size=self.cfg.batch_size,
                                      accelerator=self.acc)
        return {f"eval/{k}": float(v) for k, v in values.items()}
