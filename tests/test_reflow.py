"""Rectified Diffusion (reflow): the maths by hand, the method's direction, and runs through the real CLI."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from card_usage import card_call_kwargs
from distributed_launch import assert_ranks_identical, launch_training
from image_folders import write_image_folder
from pipelines.schedules import FlowSchedule, VPSchedule
from trainers.reflow import (
    end_alpha_sigma, first_order_point, phase_boundaries, pair_noise, phase_pair, phased_loss, pseudo_huber,
    reflow_loss,
    teacher_segment,
)

ROOT = Path(__file__).resolve().parents[1]
f64 = torch.float64
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


# ------------------------------------------------------------------ maths, by hand


def test_pseudo_huber_by_hand():
    """c = 3: an error of 4 costs sqrt(16 + 9) - 3 = 2, an error of 0 costs 0. Sample 0 has errors [4, 0]
    -> mean 1; sample 1 errors [0, -4] -> 1; sample 2 none -> 0. For c -> 0 it tends to |error|:
    c = 1e-3, error 0.5 -> sqrt(0.25 + 1e-6) - 1e-3 = 0.499001."""
    x = torch.tensor([[4.0, 0.0], [0.0, -4.0], [1.0, 2.0]])
    y = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    torch.testing.assert_close(pseudo_huber(x, y, 3.0), torch.tensor([1.0, 1.0, 0.0]))
    assert pseudo_huber(torch.tensor([[0.5]]), torch.zeros(1, 1), 1e-3).item() == pytest.approx(math.sqrt(0.250001) - 1e-3)


def test_first_order_point_by_hand():
    """alpha = 0.6, sigma = 0.8, x_0 = 1, eps = -1: x_t = 0.6 - 0.8 = -0.2; flow s = 0.25: 0.75 - 0.25 = 0.5."""
    one = torch.ones(1)
    assert first_order_point(one, -one, torch.tensor(0.6), torch.tensor(0.8)).item() == pytest.approx(-0.2)
    assert first_order_point(one, -one, torch.tensor(0.75), torch.tensor(0.25)).item() == pytest.approx(0.5)


def test_effective_pair_noise_puts_x_T_on_the_path():
    """A 2-step VP schedule with abar = [0.9, 0.36]: the sampler's one-step grid is t = 1, alpha = 0.6,
    sigma = 0.8. Pair x_T = 1, x_0 = 2: eps = (x_T - alpha x_0)/sigma = (1 - 1.2)/0.8 = -0.25, so the
    training point at t = 1 is 0.6*2 + 0.8*(-0.25) = 1 = x_T: the one-step sample is what is trained.
    "initial" keeps eps = x_T (the paper). On flow, alpha = 0 at t = T and both are x_T."""
    vp = VPSchedule(torch.tensor([0.9, 0.36], dtype=f64))
    x_T, x_0 = torch.ones(1, 1), 2 * torch.ones(1, 1)
    assert pair_noise(x_T, x_0, vp, "effective").item() == pytest.approx(-0.25)
    assert pair_noise(x_T, x_0, vp, "initial").item() == 1.0
    assert pair_noise(x_T, x_0, FlowSchedule(shift=3.0), "effective").item() == pytest.approx(1.0)


def test_reflow_loss_same_code_for_eps_and_flow_teachers():
    """x_0 = 1, eps = -1. Exact outputs give x0_hat = x_0 and loss 0 in both parameterizations.
    eps-model (alpha 0.6, sigma 0.8): output eps + 0.3 -> x0_hat = x_0 - (sigma/alpha) 0.3 = x_0 - 0.4.
    flow model (s = 0.25): output u = eps - x_0 + 1.6 -> x0_hat = x_t - s u = x_0 - 0.25 * 1.6 = x_0 - 0.4.
    With c = 0.3 an x_0 error of 0.4 costs sqrt(0.16 + 0.09) - 0.3 = 0.2 for both."""
    x_0, eps = torch.ones(1, 1), -torch.ones(1, 1)
    for kind, alpha, sigma, exact, delta in (("epsilon", 0.6, 0.8, eps, 0.3), ("flow", 0.75, 0.25, eps - x_0, 1.6)):
        a, s = torch.tensor(alpha), torch.tensor(sigma)
        x_t = first_order_point(x_0, eps, a, s)
        assert reflow_loss(exact, x_t, x_0, a, s, kind, 0.3)[0].item() == pytest.approx(0.0, abs=1e-7)
        loss, logs = reflow_loss(exact + delta, x_t, x_0, a, s, kind, 0.3)
        assert loss.item() == pytest.approx(0.2, abs=1e-6) and logs["mse_x0"].item() == pytest.approx(0.16)


def test_phase_pair_by_hand():
    """alpha_s = 0.6, sigma_s = 0.8 (nsr_s = 4/3); alpha_e = 0.8, sigma_e = 0.6 (nsr_e = 3/4); x_s = 1, x_e = 2.
    Paper: eps* = (x_e/alpha_e - x_s/alpha_s)/(nsr_e - nsr_s) = (5/2 - 5/3)/(3/4 - 4/3) = (5/6)/(-7/12) = -10/7.
    Pair form: det = 0.6*0.6 - 0.8*0.8 = -0.28; eps* = (0.6*2 - 0.8*1)/det = -10/7; x0* = (0.6*1 - 0.8*2)/det = 25/7.
    At alpha_t = sigma_t = r = sqrt(1/2) the paper's point r (x_s/alpha_s + (1 - 4/3) eps*) = r (5/3 + 10/21)
    = r 15/7, and alpha_t x0* + sigma_t eps* = r (25 - 10)/7 = r 15/7."""
    x0_star, eps_star = phase_pair(torch.tensor(1.0, dtype=f64), torch.tensor(2.0, dtype=f64), 0.6, 0.8, 0.8, 0.6)
    assert eps_star.item() == pytest.approx(-10 / 7) and x0_star.item() == pytest.approx(25 / 7)
    r = math.sqrt(0.5)
    assert first_order_point(x0_star, eps_star, r, r).item() == pytest.approx(r * 15 / 7)


@pytest.mark.parametrize("schedule,t_s,t_e", [
    (VPSchedule.from_scheduler_config(SD_BETAS), [999.0, 499.0, 249.0], [749.0, 249.0, 0.0]),
    (FlowSchedule(shift=3.0), [1000.0, 500.0, 300.0], [750.0, 0.0, 100.0]),  # alpha_s = 0 and sigma_e = 0 included
])
def test_effective_noise_reproduces_x_end_from_x_s(schedule, t_s, t_e):
    """One DDIM step with eps* from x_s lands exactly on x_e: alpha_e (x_s/alpha_s + (nsr_e - nsr_s) eps*) = x_e
    where alpha_s > 0 (the paper's form, VP); in the pair form alpha_e x0* + sigma_e eps* = x_e everywhere,
    including the flow ends alpha_s = 0 (t = T) and sigma_e = 0 (t = 0) where the paper's form divides by 0."""
    g = torch.Generator().manual_seed(0)
    x_s, x_e = torch.randn(3, 2, 2, 2, generator=g, dtype=f64), torch.randn(3, 2, 2, 2, generator=g, dtype=f64)
    a_s, s_s = (a.view(-1, 1, 1, 1) for a in schedule.alpha_sigma(torch.tensor(t_s, dtype=f64)))
    a_e, s_e = (a.view(-1, 1, 1, 1) for a in end_alpha_sigma(schedule, torch.tensor(t_e, dtype=f64)))
    x0_star, eps_star = phase_pair(x_s, x_e, a_s, s_s, a_e, s_e)
    torch.testing.assert_close(first_order_point(x0_star, eps_star, a_e, s_e), x_e, rtol=0, atol=1e-12)
    torch.testing.assert_close(first_order_point(x0_star, eps_star, a_s, s_s), x_s, rtol=0, atol=1e-12)
    if schedule.kind == "vp":
        paper = a_e * (x_s / a_s + (s_e / a_e - s_s / a_s) * eps_star)
        torch.testing.assert_close(paper, x_e, rtol=0, atol=1e-10)


def test_phased_loss_is_zero_for_the_effective_noise_and_counts_the_jump_error():
    """At the first-order point x_t of the phase, an eps-model answering eps* jumps exactly to x_e: loss 0.
    Answering eps* + d moves x_e_hat by alpha_e (nsr_e - nsr_t) d; alpha_t = sigma_t = r (nsr_t = 1) and
    the clean end (alpha_e, sigma_e) = (1, 0) give x_e_hat - x_e = -d; with d = 0.4, c = 0.3: 0.5 - 0.3 = 0.2."""
    x_s, x_e = torch.tensor([[1.0]], dtype=f64), torch.tensor([[2.0]], dtype=f64)
    x0_star, eps_star = phase_pair(x_s, x_e, 0.6, 0.8, 1.0, 0.0)
    r = torch.tensor(math.sqrt(0.5), dtype=f64)
    x_t = first_order_point(x0_star, eps_star, r, r)
    one, zero = torch.tensor(1.0, dtype=f64), torch.tensor(0.0, dtype=f64)
    assert phased_loss(eps_star, x_t, x_e, r, r, one, zero, "epsilon", 0.3)[0].item() == pytest.approx(0, abs=1e-7)
    assert phased_loss(eps_star + 0.4, x_t, x_e, r, r, one, zero, "epsilon", 0.3)[0].item() == pytest.approx(0.2)


def test_phase_boundaries_are_the_samplers_grid():
    """VP trailing at 4 steps: the paper's phase starts {999, 749, 499, 249}, ending at the clean point.
    Flow at shift 3: sigmas u = 1, 1/2 shifted to 3u / (1 + 2u) = 1, 0.75, so t = 1000, 750, then 0 (diffusers'
    default 2-step grid would put the second start at t ~ 9, an almost empty last phase)."""
    vp = VPSchedule.from_scheduler_config(SD_BETAS)
    assert phase_boundaries(vp, 4).tolist() == [999.0, 749.0, 499.0, 249.0, 0.0]
    flow = FlowSchedule(shift=3.0)
    assert phase_boundaries(flow, 2).tolist() == pytest.approx([1000.0, 750.0, 0.0])
    assert end_alpha_sigma(vp, torch.tensor([0.0, 249.0]))[1].tolist()[0] == 0.0


def test_teacher_segment_follows_a_first_order_model_exactly():
    """A model whose x0_hat is one fixed X (eps_hat = (x - alpha X)/sigma) is first-order: 3 DDIM steps from
    x_s = alpha_s X + sigma_s E land on alpha_e X + sigma_e E, per sample (t_e = 0 is the clean point: X)."""
    vp = VPSchedule.from_scheduler_config(SD_BETAS)
    g = torch.Generator().manual_seed(1)
    X, E = torch.randn(2, 3, 2, 2, generator=g, dtype=f64), torch.randn(2, 3, 2, 2, generator=g, dtype=f64)

    def model_fn(x, t):
        alpha, sigma = (a.view(-1, 1, 1, 1) for a in vp.alpha_sigma(t))
        return X, (x - alpha * X) / sigma

    t_s, t_e = torch.tensor([999.0, 249.0], dtype=f64), torch.tensor([749.0, 0.0], dtype=f64)
    a_s, s_s = (a.view(-1, 1, 1, 1) for a in vp.alpha_sigma(t_s))
    a_e, s_e = (a.view(-1, 1, 1, 1) for a in end_alpha_sigma(vp, t_e))
    x_e = teacher_segment(model_fn, a_s * X + s_s * E, t_s, t_e, 3, vp)
    torch.testing.assert_close(x_e, a_e * X + s_e * E, rtol=0, atol=1e-10)
    torch.testing.assert_close(x_e[1], X[1], rtol=0, atol=1e-10)


# ------------------------------------------------------------------ the method on tiny models


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD pipeline, 6 teacher pairs made by make_pairs.py, and a folder of 4 images (16 px)."""
    import make_pairs
    from pipelines.tiny import save_tiny_pipeline

    tmp = tmp_path_factory.mktemp("reflow")
    sd = save_tiny_pipeline("sd", tmp / "sd")
    (tmp / "prompts.txt").write_text("a red circle\na blue square\na green triangle\n")
    assert make_pairs.main(["--model", str(sd), "--prompts", str(tmp / "prompts.txt"), "--out", str(tmp / "pairs"),
                            "--pairs-per-prompt", "2", "--steps", "3", "--guidance", "2.0", "--resolution", "16",
                            "--batch-size", "2", "--shard-size", "2"]) == 0
    images = tmp / "images"
    images.mkdir()
    write_image_folder(images)
    return {"sd": sd, "pairs": tmp / "pairs", "images": images, "tmp": tmp}


def test_config_checks_name_the_data_kind(world):
    from trainers.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="plain reflow trains on teacher pairs; set data.kind: pairs"):
        load_config(None, ["method=reflow", "data.kind=imagefolder"])
    with pytest.raises(ConfigError, match="phased reflow trains on images; 'pairs' has none"):
        load_config(None, ["method=reflow", "reflow.variant=phased", "data.kind=pairs"])
    with pytest.raises(ValueError, match="made at 16 px but data.resolution is 32; set data.resolution: 16"):
        from trainers.data import build_dataset
        build_dataset(load_config(None, ["method=reflow", "data.kind=pairs", f"data.path={world['pairs']}",
                                         "data.resolution=32"]).data)


def method_on(source: Path, *overrides: str):
    from trainers.config import load_config, method_class
    from trainers.run import load_run_bundle

    cfg = load_config(None, ["method=reflow", "data.resolution=16", f"model.source={source}", *overrides])
    bundle = load_run_bundle(cfg, torch.device("cpu"))
    method = method_class("reflow")(cfg, bundle)
    method.bind({"student": method.student}, {})
    return method


@pytest.mark.parametrize("lora", [0, 4])
def test_phased_step_trains_the_student_and_never_the_teacher(world, lora):
    """One optimizer step of the phased loss changes the trained weights; the teacher's predictions and
    weights stay (full fine-tune: a frozen copy; LoRA: the same denoiser with its adapters switched off)."""
    method = method_on(world["sd"], "reflow.variant=phased", "data.kind=imagefolder", "reflow.phase_steps=2",
                       f"model.lora.rank={lora}")
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([999.0, 300.0]), method.bundle.encode_prompt(["a", "b"], image_size=(16, 16))

    def teacher_out():
        with torch.no_grad(), method._teacher() as teacher:
            return method.bundle.predict(teacher, x, t, cond)

    trained = {n: p.detach().clone() for n, p in method.student.named_parameters() if p.requires_grad}
    before = teacher_out()
    batch = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "prompt": ["a red circle", "a blue square"]}
    out = method.loss(batch, 0, ["student"], torch.Generator().manual_seed(0))
    assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()
    optimizer = torch.optim.SGD([p for p in method.student.parameters() if p.requires_grad], lr=0.1)
    out.loss.mean().backward()
    optimizer.step()
    changed = sum(not torch.equal(p, trained[n]) for n, p in method.student.named_parameters() if p.requires_grad)
    assert changed >= len(trained) // 2  # LoRA's A gets no gradient while B is still 0: half of them move
    assert torch.equal(teacher_out(), before)
    if lora:
        assert all("lora_" in n for n in trained)
    else:
        assert not any(p.requires_grad for p in method.teacher.parameters())


def reflow_cli(world, out: Path, *overrides: str) -> int:
    import distill

    recipe = world["tmp"] / "reflow.yaml"
    recipe.write_text("# python scripts/distill.py --config reflow.yaml\nmethod: reflow\n")
    return distill.main(["--config", str(recipe), f"output_dir={out}", f"model.source={world['sd']}",
                         "data.kind=pairs", f"data.path={world['pairs']}", "data.resolution=16",
                         "train.batch_size=2", "train.log_with=none", "train.log_every=1", "train.ema_decay=0.9",
                         "train.checkpoint_every=2", "train.keep_checkpoints=3", "optim.lr=1e-3", *overrides])


@pytest.fixture(scope="module")
def unbroken(world):
    out = world["tmp"] / "unbroken"
    assert reflow_cli(world, out, "train.max_steps=4") == 0
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_cli_trains_the_student_only_and_exports_ddim_trailing(world, unbroken):
    before, after = tensors(world["sd"] / "unet"), tensors(unbroken / "pipeline" / "unet")
    assert before.keys() == after.keys() and sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    for frozen in ("vae", "text_encoder"):
        a, b = tensors(world["sd"] / frozen), tensors(unbroken / "pipeline" / frozen)
        assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(line) for line in (unbroken / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and all(np.isfinite(e["loss"]) and "huber_x0" in e for e in logs)
    card = (unbroken / "pipeline" / "README.md").read_text()
    assert "num_inference_steps=2, guidance_scale=1.5" in card


def assert_in_suite_sampler_matches_diffusers(folder: Path, steps: list[int], guidance: float, **load) -> None:
    """The exported folder through plain diffusers, called as its model card says (flow students: the card's
    sigmas), equals the in-suite sampler on the same x_T."""
    from diffusers import DiffusionPipeline

    from pipelines.backbones import load_bundle
    from trainers.method import initial_noise
    from trainers.pairs import default_solver, solve
    from trainers.reflow import sampling_grid

    pipe = DiffusionPipeline.from_pretrained(str(folder), **load)
    bundle = load_bundle(str(folder))
    prompts = ["a red circle", "a blue square"]
    x_T = initial_noise(bundle.latent_shape(1, (16, 16))[1:], [3, 4], torch.device("cpu"))
    cond = bundle.encode_prompt(prompts, image_size=(16, 16))
    uncond = bundle.encode_unconditional(1, image_size=(16, 16))
    card = card_call_kwargs(folder)
    for n in steps:
        ours = solve(bundle, bundle.denoiser, cond, uncond, x_T, n, guidance, default_solver(bundle.schedule),
                     timesteps=sampling_grid(bundle.schedule, n))
        if bundle.schedule.kind == "flow" and n > 1:
            assert len(card["sigmas"]) == n, "the card gives the sigmas of its own step count only"
            call = {"sigmas": card["sigmas"]}
        else:
            call = {"num_inference_steps": n}
        theirs = pipe(prompt=prompts, guidance_scale=guidance, latents=x_T.clone(), height=16, width=16,
                      output_type="latent", **call).images
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_export_samples_in_diffusers_like_the_in_suite_sampler(unbroken):
    config = json.loads((unbroken / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler" and config["timestep_spacing"] == "trailing"
    assert_in_suite_sampler_matches_diffusers(unbroken / "pipeline", [1, 2, 4], 1.5)


def test_resumed_run_equals_unbroken(world, unbroken):
    """2 steps, then the same command with max_steps 4 resumes from the step-2 checkpoint: model, EMA and
    optimizer state at step 4 equal the unbroken run's bit for bit."""
    out = world["tmp"] / "resumed"
    assert reflow_cli(world, out, "train.max_steps=2", "export.enabled=false") == 0
    assert reflow_cli(world, out, "train.max_steps=4", "export.enabled=false") == 0
    for name in ("model.safetensors", "average_ema.safetensors"):
        a, b = load_file(unbroken / "checkpoints" / "step-0000004" / name), load_file(out / "checkpoints" / "step-0000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    opt_a, opt_b = (torch.load(d / "checkpoints" / "step-0000004" / "optimizer.bin", weights_only=True)
                    for d in (unbroken, out))
    for i, slots in opt_a["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["state"][i][k])) for k, v in slots.items())


def test_phased_flow_teacher_runs_and_exports_flow_euler(world):
    """The phased variant on a flow-matching transformer (SD3): same code, FlowMatchEuler export that
    plain diffusers samples exactly like the in-suite Euler sampler."""
    import distill
    from pipelines.tiny import save_tiny_pipeline

    source = save_tiny_pipeline("sd3-no-t5", world["tmp"] / "sd3")
    out = world["tmp"] / "flow"
    recipe = world["tmp"] / "flow.yaml"
    recipe.write_text("# python scripts/distill.py --config flow.yaml\nmethod: reflow\n")
    assert distill.main(["--config", str(recipe), f"output_dir={out}", f"model.source={source}",
                         "data.kind=imagefolder", f"data.path={world['images']}", "data.resolution=16",
                         "reflow.variant=phased", "reflow.phases=2", "reflow.phase_steps=2", "train.max_steps=2",
                         "train.batch_size=2", "train.log_with=none", "optim.lr=1e-3"]) == 0
    config = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["shift"] == 3.0
    assert_in_suite_sampler_matches_diffusers(out / "pipeline", [1, 2], 1.5, text_encoder_3=None, tokenizer_3=None)


@pytest.mark.parametrize("recipe,family", [("sd15_reflow.yaml", "sd"), ("sd15_reflow_phased.yaml", "sd"),
                                           ("sdxl_reflow_phased.yaml", "sdxl"), ("sd3_reflow.yaml", "sd3-no-t5")])
def test_real_recipe_runs_on_its_tiny_architecture(world, recipe, family):
    """The real recipe, unchanged but for model/data/size/steps, runs one step through the same code path
    (a DiT's pairs are made from its own tiny teacher: the latents differ in shape)."""
    import distill
    import make_pairs
    from pipelines.tiny import save_tiny_pipeline

    source = world["sd"] if family == "sd" else save_tiny_pipeline(family, world["tmp"] / family)
    data = world["pairs"] if "phased" not in recipe else world["images"]
    if family.startswith("sd3"):
        data = world["tmp"] / f"pairs_{family}"
        assert make_pairs.main(["--model", str(source), "--prompts", str(world["tmp"] / "prompts.txt"), "--out",
                                str(data), "--steps", "2", "--guidance", "2.0", "--resolution", "16",
                                "--batch-size", "2", "--solver", "euler"]) == 0
    out = world["tmp"] / recipe
    assert distill.main(["--config", str(ROOT / "configs" / recipe), f"output_dir={out}", f"model.source={source}",
                         "model.weight_dtype=float32", f"data.path={data}", "data.resolution=16",
                         "train.max_steps=1", "train.batch_size=1", "train.mixed_precision=no",
                         "train.log_with=none", "train.validate_every=0", "export.enabled=false",
                         "reflow.phase_steps=2"]) == 0
    assert (out / "checkpoints" / "step-0000001").is_dir()


def test_two_process_ddp_ranks_end_identical(world):
    """Phased reflow under 2-process DDP (gloo): both ranks hold the same trained weights after 2 steps."""
    recipe = world["tmp"] / "ddp.yaml"
    out = world["tmp"] / "ddp"
    recipe.write_text("\n".join([
        "# python scripts/distill.py --config ddp.yaml", "method: reflow", f"output_dir: {out}",
        "model:", f"  source: {world['sd']}", "data:", "  kind: imagefolder", f"  path: {world['images']}",
        "  resolution: 16", "train:", "  max_steps: 2", "  batch_size: 1", "  checkpoint_every: 0",
        "  log_with: none", "optim:", "  lr: 1.0e-3", "export:", "  enabled: false", "reflow:",
        "  variant: phased", "  phase_steps: 2"]) + "\n")
    launch_training(recipe)
    assert_ranks_identical(out)
    assert (out / "checkpoints" / "step-0000002").is_dir()
