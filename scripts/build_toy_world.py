#!/usr/bin/env python
"""Rebuild the toy world's shipped models from scratch, seeded: tokenizer, VAE, CLIP, both teachers.

    OMP_NUM_THREADS=1 ./with-venv python scripts/build_toy_world.py                 # into pipelines/toy
    ./with-venv python scripts/build_toy_world.py --smoke --out /tmp/toy --work /tmp/toy_work   # seconds
    ./with-venv python scripts/build_toy_world.py --stages report                   # FID floor + VAE-recon FID

Stages, in order (each reads what the earlier ones wrote to --out):
  vae           AutoencoderKL on renders; scaling_factor = 1 / std(latents); recon pass rate and PSNR
  clip          CLIPModel + tokenizer (every world word one token), contrastive with hard negatives
  attributes    the attribute net (reward toy_attribute_net) on train-split renders, a share of them decoded by
                the VAE; per-head and exact-decode accuracy, one-attribute-off ranking, per split
  init          untrained StableDiffusion / SD3 pipeline folders (random denoiser + VAE + CLIP text tower)
  teacher, teacher_flow   scripts/distill.py with configs/toy/teacher_sft.yaml / teacher_flow_sft.yaml
                (run side by side, one process each), the last EMA export copied to --out. Each teacher
                trains in the stages its card's "Stages" table lists (Plan.unet_stages, Plan.flow_stages):
                each starts from the previous stage's export with a fresh optimizer, EMA and warm-up, and
                draws its own seed
  report        toy FID floors: real vs real renders, and VAE reconstructions vs real renders
  cards         measured-quality table in each teacher's README.md, from scripts/evaluate.py results
                (--results DIR/<teacher|teacher_flow>/{heldin,heldout}/eval.json, labelled by folder name)
Numbers go to <work>/build_report.json. docs/toy_world.md records the measured build time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipelines.toy.assemble import FlowSpec, UNetSpec, save_flow_teacher_init, save_teacher_init  # noqa: E402
from pipelines.toy.attribute_net import AttributeNetSpec  # noqa: E402
from pipelines.toy.clip_training import CLIPSpec, build_clip, one_off_retrieval, save_clip, train_clip  # noqa: E402
from pipelines.toy.tokenizer import build_tokenizer  # noqa: E402
from pipelines.toy.vae_training import (VAESpec, build_vae, latent_std, reconstruction_report,  # noqa: E402
                                        render_pool, train_vae)

STAGES = ("vae", "clip", "attributes", "init", "teacher", "teacher_flow", "report", "cards")
TEACHERS = {"teacher": ("configs/toy/teacher_sft.yaml", "teacher_init"),
            "teacher_flow": ("configs/toy/teacher_flow_sft.yaml", "teacher_flow_init")}


CONSTANT_RATE = ("optim.schedule=constant", "optim.decay_steps=0")


@dataclass(frozen=True)
class Stage:
    """One training run of a teacher, from the previous stage's EMA export (the first from the untrained folder)."""

    steps: int                        # train.max_steps
    seed_offset: int                  # train.seed and data.seed are the build's seed plus this
    overrides: tuple[str, ...] = ()   # recipe overrides of this stage alone


@dataclass(frozen=True)
class Plan:
    """Sizes of one build: the shipped one, or the seconds-long smoke test of the same code path."""

    vae: VAESpec = VAESpec(channels=(16, 32), norm_groups=8)
    vae_pool: int = 8192
    vae_steps: int = 1000
    vae_batch: int = 16
    clip: CLIPSpec = CLIPSpec()
    clip_pool: int = 16384
    clip_steps: int = 1000
    clip_batch: int = 64
    attributes: AttributeNetSpec = AttributeNetSpec()
    attributes_steps: int = 1000
    attributes_batch: int = 64
    attributes_decoded: int = 4096   # train-split renders decoded by the VAE, a quarter of every batch
    attributes_checks: int = 1000    # fresh renders per split for the accuracy and ranking report
    unet: UNetSpec = UNetSpec(channels=(32, 64, 64), attention=(False, True, True), heads=4, norm_groups=8)
    flow: FlowSpec = FlowSpec(layers=4, heads=4, head_dim=16, patch=2)
    teacher_overrides: tuple[str, ...] = ()   # both teachers, every stage
    # The stages of each teacher, as the shipped one was trained (its README.md, "Stages").
    # UNet: all but the last hold the rate constant; the last runs the recipe's own schedule, its final decay
    # included.
    unet_stages: tuple[Stage, ...] = (*(Stage(n, k, CONSTANT_RATE) for n, k in ((6489, 0), (8009, 0), (6268, 2),
                                                                                (5363, 3), (1924, 4), (11147, 5))),
                                      Stage(8800, 6))
    # Flow: the recipe as it is (cosine rate), then a constant-rate stage that draws t nearer the noise end
    # (logit-normal shifted by 3), where the layout is decided.
    flow_stages: tuple[Stage, ...] = (Stage(4000, 0), Stage(20000, 1, CONSTANT_RATE + ("sft.timestep_shift=3",)))
    check_images: int = 1000      # held-in renders for the VAE's recon pass rate / PSNR
    retrieval_images: int = 300   # per split, for the CLIP's one-attribute-off retrieval
    report_prompts: int = 64
    report_images: int = 4
    log_every: int = 100


FULL = Plan()
SMOKE = Plan(vae=VAESpec(channels=(8, 16), norm_groups=4), vae_pool=32, vae_steps=2, vae_batch=4,
             clip=CLIPSpec(width=16, layers=1, heads=2), clip_pool=16, clip_steps=2, clip_batch=4,
             attributes=AttributeNetSpec(channels=(4, 4, 4), colour_width=4, hidden=4, norm_groups=2),
             attributes_steps=2, attributes_batch=8, attributes_decoded=8, attributes_checks=8,
             unet=UNetSpec(channels=(16, 16), attention=(False, True), heads=2, norm_groups=4),
             flow=FlowSpec(layers=1, heads=2, head_dim=8, patch=2),
             teacher_overrides=("train.batch_size=2", "train.checkpoint_every=0",
                                "data.toy_size=8", "train.ema_decay=0.5", "train.log_every=1"),
             unet_stages=(Stage(2, 0, CONSTANT_RATE), Stage(2, 1)), flow_stages=(Stage(2, 0), Stage(2, 1)),
             check_images=8, retrieval_images=4, report_prompts=2, report_images=2, log_every=1)


@dataclass
class Build:
    out: Path
    work: Path
    plan: Plan
    seed: int
    threads: int
    results: Path = ROOT / "docs" / "results" / "toy_teachers"
    report: dict = field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def save_report(self) -> None:
        path = self.work / "build_report.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        seconds = {**old.get("seconds", {}), **self.report.get("seconds", {})}  # stages may run as separate calls
        path.write_text(json.dumps({**old, **self.report, "seconds": seconds}, indent=2) + "\n")


# ------------------------------------------------------------------ stages


def stage_vae(b: Build) -> None:
    p = b.plan
    images, _ = render_pool("train", p.vae_pool, b.seed)
    vae = build_vae(p.vae, seed=b.seed)
    b.log(f"VAE {p.vae} ({sum(t.numel() for t in vae.parameters()) / 1e6:.2f}M params), "
          f"{p.vae_steps} steps x {p.vae_batch} on {p.vae_pool} renders")
    train_vae(vae, images, p.vae_steps, p.vae_batch, seed=b.seed, log=b.log, log_every=p.log_every)
    std = latent_std(vae, images[:1024])
    vae.register_to_config(scaling_factor=1.0 / std)
    check, captions = render_pool("train", p.check_images, b.seed + 1)
    held, held_captions = render_pool("heldout", p.check_images, b.seed + 1)
    b.report["vae"] = {"spec": asdict(p.vae), "latent_std": std, "scaling_factor": 1.0 / std,
                       "heldin": reconstruction_report(vae, check, captions),
                       "heldout": reconstruction_report(vae, held, held_captions)}
    b.log(f"VAE: {json.dumps(b.report['vae'])}")
    vae.save_pretrained(b.out / "vae", safe_serialization=True)


def stage_clip(b: Build) -> None:
    from pipelines.toy.world import ToyDataset

    p = b.plan
    tokenizer = build_tokenizer()
    data = ToyDataset("train", p.clip_pool, b.seed + 2)
    images, _ = render_pool("train", p.clip_pool, b.seed + 2)
    clip = build_clip(tokenizer, p.clip, seed=b.seed)
    b.log(f"CLIP {p.clip} ({sum(t.numel() for t in clip.parameters()) / 1e6:.2f}M params), vocabulary "
          f"{len(tokenizer)}, {p.clip_steps} steps x {p.clip_batch}")
    train_clip(clip, tokenizer, data, images, p.clip_steps, p.clip_batch, seed=b.seed, log=b.log,
               log_every=p.log_every)
    b.report["clip"] = {"spec": asdict(p.clip),
                        **{f"retrieval_{s}": one_off_retrieval(clip, tokenizer, s, p.retrieval_images)
                           for s in ("train", "heldout")}}
    b.log(f"CLIP one-attribute-off retrieval: {json.dumps(b.report['clip'])}")
    save_clip(clip, tokenizer, b.out / "clip")


def stage_attributes(b: Build) -> None:
    from diffusers import AutoencoderKL

    from pipelines.toy.attribute_net import build_attribute_net, save_attribute_net
    from pipelines.toy.attribute_training import decoded_pool, measure, train_attribute_net
    from pipelines.toy.vae_training import reconstruct

    p = b.plan
    vae = AutoencoderKL.from_pretrained(b.out / "vae")
    net = build_attribute_net(p.attributes, seed=b.seed)
    params = sum(t.numel() for t in net.parameters())
    b.log(f"attribute net {p.attributes} ({params / 1e6:.3f}M params), {p.attributes_steps} steps x "
          f"{p.attributes_batch}, a quarter from {p.attributes_decoded} VAE-decoded renders")
    start = time.perf_counter()
    decoded = decoded_pool(lambda x: reconstruct(vae, x), p.attributes_decoded, b.seed + 3)
    train_attribute_net(net, p.attributes_steps, p.attributes_batch, seed=b.seed, decoded=decoded, log=b.log,
                        log_every=p.log_every)
    seconds = round(time.perf_counter() - start, 1)
    b.report["attributes"] = {"spec": asdict(p.attributes), "params": params, "train_seconds": seconds,
                              **measure(net, p.attributes_checks, b.seed + 1, lambda x: reconstruct(vae, x))}
    b.log(f"attribute net: {json.dumps(b.report['attributes'])}")
    measured = {k: v for k, v in b.report["attributes"].items() if k != "spec"}  # the spec is config.json's own
    save_attribute_net(net, b.out / "attributes", measured)


def _load_parts(b: Build):
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    return (AutoencoderKL.from_pretrained(b.out / "vae"), CLIPModel.from_pretrained(b.out / "clip"),
            CLIPTokenizer.from_pretrained(b.out / "clip"))


def stage_init(b: Build) -> None:
    vae, clip, tokenizer = _load_parts(b)
    for name, save, spec in (("teacher_init", save_teacher_init, b.plan.unet),
                             ("teacher_flow_init", save_flow_teacher_init, b.plan.flow)):
        folder = b.work / name
        shutil.rmtree(folder, ignore_errors=True)
        save(folder, vae, clip, tokenizer, spec, seed=b.seed)
        b.log(f"wrote untrained {name} ({spec})")


def stages_of(plan: Plan, name: str) -> tuple[Stage, ...]:
    return plan.unet_stages if name == "teacher" else plan.flow_stages


def _stage_overrides(b: Build, name: str, stage: int) -> list[str]:
    """Overrides of one run: stage k (0-based) starts from stage k-1's export, stage 0 from the untrained folder."""
    this = stages_of(b.plan, name)[stage]
    source = b.work / TEACHERS[name][1] if stage == 0 else b.work / f"{name}_stage{stage}_export"
    seed = b.seed + this.seed_offset
    return [f"model.source={source}", f"train.max_steps={this.steps}", f"train.seed={seed}", f"data.seed={seed}",
            *this.overrides]


def _run_folders(b: Build, name: str, stage: int) -> tuple[Path, Path]:
    """(run, export) folders of one run; the last stage's export is the teacher's."""
    last = stage == len(stages_of(b.plan, name)) - 1
    tag = f"{name}_stage{stage + 1}"
    return b.work / f"{tag}_run", b.work / (f"{name}_export" if last else f"{tag}_export")


def _tag(run: Path) -> str:
    """A run's name in logs and progress lines; its log is <work>/<tag>.log."""
    return run.name.removesuffix("_run")


def _launch(b: Build, name: str, stage: int = 0) -> tuple[subprocess.Popen, Path]:
    config = TEACHERS[name][0]
    run, export = _run_folders(b, name, stage)
    shutil.rmtree(run, ignore_errors=True)  # a leftover run folder would be resumed, not rebuilt
    shutil.rmtree(export, ignore_errors=True)  # a run stopped by SIGTERM exits 0 but exports nothing
    cmd = [sys.executable, str(ROOT / "scripts" / "distill.py"), "--config", str(ROOT / config),
           f"output_dir={run}", f"export.dir={export}", *_stage_overrides(b, name, stage), *b.plan.teacher_overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(b.threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log_path = b.work / f"{_tag(run)}.log"
    b.log(f"{_tag(run)}: {' '.join(cmd[1:])} (log {log_path})")
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT), run


def _last_metrics(run: Path) -> str:
    path = run / "metrics.jsonl"
    if not path.is_file() or not path.read_text().strip():
        return "starting"
    row = json.loads(path.read_text().strip().splitlines()[-1])
    return f"step {row['step']} loss {row['loss']:.4f} ({row['step_time_s']:.2f} s/step)"


def _check(b: Build, proc: subprocess.Popen, run: Path, export: Path) -> None:
    if proc.returncode != 0 or not (export / "model_index.json").is_file():
        tail = (b.work / f"{_tag(run)}.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{run.name} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def stage_teachers(b: Build, names: list[str]) -> None:
    """Train the named teachers side by side (one process each, a teacher's stages one after another),
    then copy their exports to --out."""
    stage = {name: 0 for name in names}
    jobs = {name: _launch(b, name) for name in names}
    shown = ""
    while jobs:
        time.sleep(0.5 if b.plan is SMOKE else 30)
        for name, (proc, run) in list(jobs.items()):
            if proc.poll() is None:
                continue
            _check(b, proc, run, _run_folders(b, name, stage[name])[1])
            del jobs[name]
            if stage[name] + 1 < len(stages_of(b.plan, name)):
                stage[name] += 1
                jobs[name] = _launch(b, name, stage[name])
                continue
            dest = b.out / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(b.work / f"{name}_export", dest)
            b.report[name] = {"final": _last_metrics(run)}
            b.log(f"{name}: trained, exported to {dest}")
        status = " | ".join(f"{_tag(run)}: {_last_metrics(run)}" for _, run in jobs.values())
        if status and status != shown:
            b.log("  " + status)
            shown = status


def stage_report(b: Build) -> None:
    from pipelines.toy.fid_floors import fid_floors

    vae, clip, _ = _load_parts(b)
    b.report["fid_floors"] = {
        split: fid_floors(clip, vae, split, b.plan.report_prompts, b.plan.report_images, name=f"clip:{b.out.name}")
        for split in ("heldin", "heldout")}
    b.log(f"toy FID floors ({b.plan.report_prompts} prompts x {b.plan.report_images} images): "
          f"{json.dumps(b.report['fid_floors'])}")


def stage_cards(b: Build) -> None:
    from pipelines.toy.cards import quality_section, write_quality_section

    path = b.work / "build_report.json"
    floors = json.loads(path.read_text()).get("fid_floors") if path.is_file() else None
    for name in TEACHERS:
        if not (b.results / name).is_dir():
            b.log(f"{name}: no results under {b.results / name}; card left as it was")
            continue
        write_quality_section(b.out / name, quality_section(b.results, name, floors))
        b.log(f"{name}: quality table written to {b.out / name / 'README.md'}")


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


# ------------------------------------------------------------------ driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default=str(ROOT / "pipelines" / "toy"), help="where the shipped folders go")
    p.add_argument("--work", default=str(ROOT / "outputs" / "toy_build"), help="run folders, logs, build_report.json")
    p.add_argument("--stages", default=",".join(STAGES[:-1]),
                   help=f"comma list from {', '.join(STAGES)} (default: all but cards)")
    p.add_argument("--smoke", action="store_true", help="tiny models and a few steps per stage (a test, not a build)")
    p.add_argument("--results", default=str(ROOT / "docs" / "results" / "toy_teachers"),
                   help="stage cards: folder with <teacher>/{heldin,heldout}/eval.json from scripts/evaluate.py")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process; 1 is fastest on a shared 2-core CPU (docs/toy_world.md)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"build_toy_world.py: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    if args.smoke and out == (ROOT / "pipelines" / "toy").resolve():
        print("build_toy_world.py: --smoke must not overwrite the shipped models; pass --out DIR", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    b = Build(out, work, SMOKE if args.smoke else FULL, args.seed, args.threads, Path(args.results))
    start = time.perf_counter()
    for stage in [s for s in STAGES if s in stages]:
        if stage == "teacher_flow" and "teacher" in stages:
            continue  # trained side by side with the UNet teacher
        t0 = time.perf_counter()
        b.log(f"== {stage}")
        if stage in TEACHERS:
            stage_teachers(b, [n for n in TEACHERS if n in stages])
        else:
            {"vae": stage_vae, "clip": stage_clip, "attributes": stage_attributes, "init": stage_init,
             "report": stage_report, "cards": stage_cards}[stage](b)
        b.report.setdefault("seconds", {})[stage] = round(time.perf_counter() - t0, 1)
        b.save_report()
    b.report["total_seconds"] = round(time.perf_counter() - start, 1)
    b.report["safetensors_mb"] = round(safetensors_bytes(out) / 2**20, 2)
    b.save_report()
    b.log(f"done in {b.report['total_seconds'] / 60:.1f} min; safetensors under {out}: {b.report['safetensors_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
