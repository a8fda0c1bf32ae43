"""f-distill: loss terms against hand values, the gradient direction, group alternation and isolation,
a few real loop steps, the one-step export through plain diffusers, and 2-process DDP + exact resume via the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_state import assert_resume_is_exact, checkpoint_tensors
from distributed_launch import assert_ranks_identical, launch_training
from image_folders import write_image_folder
from trainers.dmd import (approximate_r1, distribution_matching_loss, dmd_normaliser, fake_score_loss,
                          gan_discriminator_loss, gan_generator_loss)

ROOT = Path(__file__).resolve().parents[1]
LOG2 = float(np.log(2.0))


# ------------------------------------------------------------------ loss terms


def test_dmd_loss_hand_values():
    """One sample, two latent elements. G = [1, 3], x0_teacher = [0, 0], x0_fake = [2, 2], h-weight 2.
    w_dmd = 1 / mean|G - teacher| = 1 / 2.  grad = (fake - teacher) w_dmd h = [2, 2] * 0.5 * 2 = [2, 2].
    L = 1/2 mean((G - sg(G - grad))^2) = 1/2 mean([4, 4]) = 2;  dL/dG = grad / 2 = [1, 1]."""
    G = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1).requires_grad_(True)
    teacher = torch.zeros(1, 2, 1, 1)
    fake = torch.full((1, 2, 1, 1), 2.0)
    assert dmd_normaliser(G, teacher).flatten().tolist() == [0.5]
    loss, grad = distribution_matching_loss(G, teacher, fake, torch.tensor([2.0]))
    assert loss.tolist() == [2.0] and grad.flatten().tolist() == [2.0, 2.0]
    loss.sum().backward()
    assert G.grad.flatten().tolist() == [1.0, 1.0]


def test_generator_step_moves_towards_teacher_and_away_from_fake():
    """dL/dG = (x0_fake - x0_teacher) w / N, so a descent step moves G along x0_teacher - x0_fake.
    (a) fake == G (the fake score tracks the generator): G gets closer to the teacher's x_0.
    (b) any fake != teacher: the step is parallel (cosine 1) to x0_teacher - x0_fake."""
    g = torch.Generator().manual_seed(0)
    G0 = torch.randn(3, 4, 2, 2, generator=g)
    teacher = torch.randn(3, 4, 2, 2, generator=g)
    for fake in (G0.clone(), torch.randn(3, 4, 2, 2, generator=g)):
        G = G0.clone().requires_grad_(True)
        loss, _ = distribution_matching_loss(G, teacher, fake)
        loss.sum().backward()
        step = -G.grad
        cos = torch.nn.functional.cosine_similarity(step.flatten(1), (teacher - fake).flatten(1), dim=1)
        torch.testing.assert_close(cos, torch.ones(3))
    G = G0.clone().requires_grad_(True)
    distribution_matching_loss(G, teacher, G0.clone())[0].sum().backward()
    moved = G0 - 0.5 * G.grad
    assert ((moved - teacher).flatten(1).norm(dim=1) < (G0 - teacher).flatten(1).norm(dim=1)).all()


def test_gan_terms_hand_values():
    """softplus(x) = log(1 + e^x).  l = 0: L_G = log 2, L_D = 2 log 2.
    l_fake = l_real = log 3: L_D = log(1 + 3) + log(1 + 1/3) = log 4 + log(4/3); L_G = log(4/3).
    Direction: raising l_real or lowering l_fake lowers L_D; raising l_fake lowers L_G."""
    zero, l3 = torch.tensor([0.0]), torch.tensor([float(np.log(3.0))])
    assert float(gan_generator_loss(zero)) == pytest.approx(LOG2)
    assert float(gan_discriminator_loss(zero, zero)) == pytest.approx(2 * LOG2)
    assert float(gan_discriminator_loss(l3, l3)) == pytest.approx(np.log(4.0) + np.log(4.0 / 3.0))
    assert float(gan_generator_loss(l3)) == pytest.approx(np.log(4.0 / 3.0))
    assert gan_discriminator_loss(zero, l3) < gan_discriminator_loss(zero, zero)
    assert gan_discriminator_loss(-l3, zero) < gan_discriminator_loss(zero, zero)
    assert gan_generator_loss(l3) < gan_generator_loss(zero)


def test_approximate_r1_hand_value_and_r1_limit():
    """Hand: (2 - 0.5)^2 = 2.25. For a linear head l(x) = a.x the term is (s a.n)^2 with E over n ~ N(0, I)
    = s^2 |a|^2 = s^2 |grad_x l|^2, the R1 penalty: a = [3, 4], s = 0.1 -> 0.25 (Monte Carlo, 20k draws)."""
    assert approximate_r1(torch.tensor([2.0]), torch.tensor([0.5])).tolist() == [2.25]
    a = torch.tensor([3.0, 4.0], dtype=torch.float64)
    x = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert float(approximate_r1(x @ a, (x + 0.1 * n) @ a).mean()) == pytest.approx(0.25, rel=0.05)


def test_fake_score_loss_hand_value_and_stop_gradient():
    """mean([1, 2]^2) = 2.5 per sample; the generator sample receives no gradient."""
    x0_fake = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1).requires_grad_(True)
    G = torch.zeros(1, 2, 1, 1, requires_grad=True)
    loss = fake_score_loss(x0_fake, G)
    assert loss.tolist() == [2.5]
    loss.sum().backward()
    assert G.grad is None and x0_fake.grad.flatten().tolist() == [1.0, 2.0]


# ------------------------------------------------------------------ the method on a tiny SD


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny_sd") / "pipe")


def make_method(source, tmp_path=None, **options):
    from pipelines.backbones import load_bundle
    from trainers.config import resolve
    from trainers.fdistill import FDistill

    tree = {"method": "fdistill", "model": {"source": str(source)}, "output_dir": str(tmp_path or "unused"),
            "data": {"kind": "imagefolder", "path": "unused", "resolution": 16}, "fdistill": options,
            "train": {"batch_size": 2, "log_with": "none", "max_grad_norm": 0.0},
            "optim": {"lr": 1e-3, "weight_decay": 0.0}, "export": {"enabled": False}}
    cfg = resolve(tree, "<test>")
    return FDistill(cfg, load_bundle(str(source))), cfg


def batch_of(n=2):
    g = torch.Generator().manual_seed(3)
    return {"prompt": [f"shape {i}" for i in range(n)], "pixel_values": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1}


def test_groups_alternate_generator_every_k(tiny_sd):
    method, _ = make_method(tiny_sd, student_update_every=3)
    method.bind(method.trainable(), {})
    critic = ["fake_score", "discriminator"]
    assert [method.groups_for_step(s) for s in range(5)] == [["student"], critic, critic, ["student"], critic]
    method.options.student_update_every = 1
    assert method.groups_for_step(7) == ["student", *critic]
    image_free, _ = make_method(tiny_sd, real_data="none", student_update_every=2)
    assert list(image_free.trainable()) == ["student", "fake_score"]  # no ratio without real samples


def _grads(module):
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_student_source_continues_an_export_with_fresh_critics(tiny_sd, tmp_path):
    """fdistill.student_source: the student takes that folder's denoiser (another seed here), the fake score
    stays the teacher's copy, and a missing folder or one of another family is refused in one line before training."""
    from safetensors.torch import load_file

    from pipelines.tiny import save_tiny_pipeline

    other = save_tiny_pipeline("sd", tmp_path / "other", seed=1)
    method, _ = make_method(tiny_sd, student_source=str(other), real_data="none")
    want = load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(p, want[n]) for n, p in method.student.state_dict().items())
    teacher = method.teacher.state_dict()
    assert all(torch.equal(p, teacher[n]) for n, p in method.fake_score.state_dict().items())
    assert not torch.equal(method.student.conv_in.weight, method.teacher.conv_in.weight)
    with pytest.raises(FileNotFoundError, match="fdistill.student_source"):
        make_method(tiny_sd, student_source=str(tmp_path / "missing dir"))
    with pytest.raises(FileNotFoundError, match="no unet/ folder"):
        make_method(tiny_sd, student_source=str(save_tiny_pipeline("sd3", tmp_path / "flow")))


@pytest.mark.parametrize("features", ["fake_score", "teacher"])
def test_each_update_reaches_only_its_groups(tiny_sd, features):
    """Student step: gradients on the student only (fake score and head run with detached weights), the
    ratio EMA buffer updates. Critic step: fake score and head only. The teacher never gets a gradient."""
    method, _ = make_method(tiny_sd, discriminator_features=features, ratio_ema_rate=0.5)
    method.bind(method.trainable(), {})
    nets = {"student": method.student, "fake_score": method.fake_score, "discriminator": method.head,
            "teacher": method.teacher}
    g = torch.Generator().manual_seed(0)
    method.loss(batch_of(), 0, ["student"], g).loss.mean().backward()
    assert {k for k, m in nets.items() if _grads(m)} == {"student"}
    assert not torch.equal(method.head.ratio_ema, torch.ones(10)), "the ratio EMA is updated on student steps"
    for m in nets.values():
        m.zero_grad(set_to_none=True)
    out = method.loss(batch_of(), 1, ["fake_score", "discriminator"], g)
    out.loss.mean().backward()
    assert {k for k, m in nets.items() if _grads(m)} == {"fake_score", "discriminator"}
    assert {"loss_fake_score", "loss_d", "loss_r1"} <= set(out.logs)


def test_loop_steps_change_trained_networks_not_the_teacher(tiny_sd, tmp_path):
    """Three real loop steps (student, critic, student) in process: all trained networks move, the teacher
    and the frozen VAE / text encoder do not."""
    from accelerate import Accelerator

    from trainers.loop import train

    method, cfg = make_method(tiny_sd, tmp_path, student_update_every=2)
    cfg.train.max_steps, cfg.train.checkpoint_every = 3, 0
    frozen = {n: p.clone() for n, p in method.teacher.named_parameters()}
    frozen_vae = {n: p.clone() for n, p in method.bundle.vae.named_parameters()}
    before = {k: {n: p.clone() for n, p in m.named_parameters()} for k, m in method.trainable().items()}
    items = [{"prompt": p, "pixel_values": x, "skipped": 0} for p, x in zip(batch_of(4)["prompt"],
                                                                           batch_of(4)["pixel_values"])]
    train(cfg, Accelerator(cpu=True), method, items)
    for group, module in method.trainable().items():
        changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[group][n])]
        assert changed, f"{group} did not change"
    assert all(torch.equal(p, frozen[n]) for n, p in method.teacher.named_parameters())
    assert all(torch.equal(p, frozen_vae[n]) for n, p in method.bundle.vae.named_parameters())


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_export_samples_in_one_step_with_plain_diffusers(family, tiny_sd, tmp_path):
    """The exported folder's scheduler runs the student once at the generator time and returns its x_0:
    VP (tiny SD): DDIM, trailing spacing -> t = 999, final alpha 1; flow (tiny SD3): Euler from sigma 1 to 0.
    diffusers' 1-step latents equal the in-suite generator G(x_T) used in training."""
    from diffusers import DiffusionPipeline

    from pipelines.tiny import save_tiny_pipeline
    from trainers.run import export_run

    source = tiny_sd if family == "sd" else save_tiny_pipeline(family, tmp_path / "pipe")
    method, cfg = make_method(source, tmp_path)
    method.bind(method.trainable(), {})
    with torch.no_grad():  # make the student differ from the teacher
        for p in method.student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = export_run(cfg, method, "# recipe\n")
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.scheduler.set_timesteps(1)
    expected = {"sd": ("DDIMScheduler", [999.0]), "sd3": ("FlowMatchEulerDiscreteScheduler", [1000.0])}[family]
    assert (type(pipe.scheduler).__name__, pipe.scheduler.timesteps.float().tolist()) == expected
    prompts = ["a red circle", "a blue square"]
    x_T = torch.randn(method.bundle.latent_shape(2, (16, 16)), generator=torch.Generator().manual_seed(5))
    cond = method.bundle.encode_prompt(prompts, image_size=(16, 16))
    ours = method.generate_x0(method.student.eval(), x_T, cond).detach()
    theirs = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=x_T.clone(), height=16, width=16,
                  output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(method.sample_latents(prompts, x_T), ours, rtol=1e-5, atol=1e-5)
    assert "num_inference_steps=1" in (out / "README.md").read_text()


# ------------------------------------------------------------------ CLI: 2-process DDP and exact resume


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_image_folder(folder, n=8)
    return folder




def test_two_process_ddp_then_resume_is_exact(tmp_path, tiny_sd, image_folder, capsys):
    """4 steps (student, critic, student, critic) on 2 processes through the CLI: both ranks end with the
    same student. The same recipe on one process, with the step-4 checkpoint deleted and the command re-run,
    resumes from step 2: every tensor of the final checkpoint - student, fake score, head (with its ratio
    EMA), the three optimizers and the student EMA - is bitwise equal."""
    run = tmp_path / "run"
    recipe = tmp_path / "fdistill.yaml"
    recipe.write_text("\n".join([
        "# python scripts/distill.py --config fdistill.yaml", "method: fdistill", f"output_dir: {run}",
        "model:", f"  source: {tiny_sd}", "data:", "  kind: imagefolder", f"  path: {image_folder}",
        "  resolution: 16", "train:", "  max_steps: 4", "  batch_size: 2", "  checkpoint_every: 2",
        "  keep_checkpoints: 3", "  log_every: 1", "  log_with: none", "  ema_decay: 0.9", "optim:", "  lr: 1.0e-3",
        "export:", "  enabled: false", "fdistill:", "  student_update_every: 2", "  ratio_ema_rate: 0.5", ""]))
    launch_training(recipe)
    assert_ranks_identical(run)
    final = run / "checkpoints" / "step-0000004"
    unbroken = checkpoint_tensors(final)
    assert {"model_2.ratio_ema", "model_1.conv_in.weight", "model.conv_in.weight"} <= set(unbroken)
    assert not torch.equal(unbroken["model_2.ratio_ema"], torch.ones(10)), "ratio EMA never updated"
    assert any(k.startswith("optimizer_2.") for k in unbroken) and "average_ema.conv_in.weight" in unbroken
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ["loss_dm" in m for m in metrics] == [True, False, True, False]
    assert_resume_is_exact(recipe, tmp_path / "single", 4, capsys)


# ------------------------------------------------------------------ real recipes on tiny architectures


@pytest.mark.parametrize("recipe, family", [("sd15_fdistill_js.yaml", "sd"), ("sdxl_fdistill_js.yaml", "sdxl"),
                                            ("sd3_fdistill_rkl.yaml", "sd3")])
def test_real_recipes_run_two_steps_on_tiny_architectures(recipe, family, tmp_path, image_folder):
    """The SD1.5 / SDXL / SD3 recipes as written (bf16 autocast, bf16 frozen weights, gradient checkpointing,
    k = 10 or 5) with only the model swapped for a tiny one of the same family: a student step then a critic
    step, logged once at step 2: the line carries the student's keys from step 1 beside the critic's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pipelines.tiny import save_tiny_pipeline
    from trainers.config import load_config
    from trainers.data import build_dataset
    from trainers.fdistill import FDistill
    from trainers.loop import train
    from trainers.run import load_run_bundle

    folder = save_tiny_pipeline(family, tmp_path / "pipe")
    cfg = load_config(ROOT / "configs" / recipe, [
        f"model.source={folder}", f"data.path={image_folder}", "data.resolution=16", "train.batch_size=2",
        "train.gradient_accumulation=1", "train.max_steps=2", "train.checkpoint_every=0", "train.validate_every=0",
        "train.log_with=none", "train.log_every=2", f"output_dir={tmp_path / 'run'}"])
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision=cfg.train.mixed_precision)
    method = FDistill(cfg, load_run_bundle(cfg, accelerator.device))
    train(cfg, accelerator, method, build_dataset(cfg.data))
    AcceleratorState._reset_state(reset_partial_state=True)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["step"] == 2
    assert "loss_dm" in metrics[0] and "loss_d" in metrics[0]
    assert all(np.isfinite(m["loss"]) for m in metrics)
