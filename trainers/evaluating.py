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
        c = self.cfg
        options = ScoringOptions(feature_model=c.feature_model, inception_weights=c.inception_weights,
                                 clip_model=c.clip_model, fid_ref=c.fid_ref, stats_cache=c.stats_cache,
                                 reward_options=c.reward_options)
        self.scoring = build_scoring(list(self.cfg.metrics), self.prompts, images_per_prompt=self.cfg.images_per_prompt,
                                     device=accelerator.device, options=options)

    def sampling(self) -> tuple[int, float]:
        """(steps, guidance) of the evaluation: eval.steps / eval.guidance, else the method's recommendation."""
        rec = self.method.recommended()
        return self.cfg.steps or rec.steps, self.cfg.guidance if self.cfg.guidance is not None else rec.guidance

    def protocol(self, step: int) -> str:
        """One sentence saying what the numbers measure (written on the exported model card)."""
        steps, guidance = self.sampling()
        return (f"In-training evaluation at training step {step}: {len(self.prompts)} prompts of "
                f"`{self.cfg.prompts}` x {self.cfg.images_per_prompt} images, seeds from {self.cfg.seed}, "
                f"{steps} sampling steps, guidance {guidance}; docs/evaluation.md defines each metric.")

    def __call__(self) -> dict[str, float]:
        from evaluation.harness import evaluate_in_training

        steps, guidance = self.sampling()
        sample = lambda prompts, seeds: self.method.sample(list(prompts), list(seeds), steps, guidance)  # noqa: E731
        values = evaluate_in_training(sample, self.prompts, self.scoring, seed=self.cfg.seed,
                                      images_per_prompt=self.cfg.images_per_prompt, batch_size=self.cfg.batch_size,
                                      accelerator=self.acc)
        return {f"eval/{k}": float(v) for k, v in values.items()}
