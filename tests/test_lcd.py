"""LCD: hand-derived maths, a step that trains only the student, exact export, recipes, DDP + resume."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.schedules import FlowSchedule, VPSchedule
from trainers.consistency import (consistency_output, ddim_step, guidance_embedding, lcm_boundary,
                                  lcm_inference_timesteps, pick_inference_steps, pseudo_huber, skip_grid,
                                  solver_grid)
from trainers.lcd import lcd_distance, lcd_timesteps
from card_usage import card_call_kwargs
from checkpoint_state import assert_resume_is_exact
from distributed_launch import assert_ranks_identical, launch_training
from image_folders import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ maths


def test_boundary_conditions_by_hand():
    """u = 10 t, sigma_d = 0.5: c_skip = 0.25 / (u^2 + 0.25), c_out = u / sqrt(u^2 + 0.25).

    t = 0: (1, 0), so f(x, 0) = x (the boundary condition). t = 0.05: u = 0.5, c_skip = 0.25 / 0.5 = 0.5,
    c_out = 0.5 / sqrt(0.5) = 0.70711. t = 999: u = 9990, c_skip = 0.25 / 9990^2 = 2.505e-9, c_out ~ 1.
    """
    c_skip, c_out = lcm_boundary(torch.tensor([0.0, 0.05, 999.0], dtype=torch.float64))
    assert torch.allclose(c_skip, torch.tensor([1.0, 0.5, 0.25 / 9990**2], dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(c_out, torch.tensor([0.0, 0.5 / math.sqrt(0.5), 9990 / math.sqrt(9990**2 + 0.25)],
                                              dtype=torch.float64), rtol=1e-12)
    from diffusers import LCMScheduler

    ref = LCMScheduler().get_scalings_for_boundary_condition_discrete(torch.tensor(259))
    mine = lcm_boundary(torch.tensor([259.0]))
    assert torch.allclose(torch.stack(mine).flatten(), torch.stack(ref).float().flatten(), rtol=1e-6)
    # f = c_skip x + c_out x0: with c_skip = 0.5, c_out = 0.70711, x = 2, x0 = 4 -> 1 + 2.8284 = 3.8284
    f = consistency_output(torch.full((1, 1), 2.0), torch.full((1, 1), 4.0), torch.tensor([0.5]),
                           torch.tensor([0.5 / math.sqrt(0.5)]))
    assert f.item() == pytest.approx(1 + 4 * 0.5 / math.sqrt(0.5), rel=1e-6)


def test_pseudo_huber_by_hand():
    """sqrt(d^2 + c^2) - c with c = 1, per element: d = 0 -> 0, d = sqrt(3) -> 2 - 1 = 1, d = -sqrt(8) -> 3 - 1 = 2;
    sample mean (0 + 1 + 2) / 3 = 1. The second sample has d = 0 everywhere -> 0. The squared error of the
    first sample is (0 + 3 + 8) / 3 = 11/3; the sign of a difference never matters.
    """
    a = torch.tensor([[0.0, 3.0**0.5, -(8.0**0.5)], [1.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(pseudo_huber(a, b, 1.0), torch.tensor([1.0, 0.0]))
    assert torch.allclose(lcd_distance(a, b, "l2", 1.0), torch.tensor([11.0 / 3.0, 0.0]))
    assert torch.allclose(lcd_distance(a, b, "huber", 1.0), torch.tensor([1.0, 0.0]))


def test_skip_grid_and_ddim_solver_step_by_hand():
    """N = 50 on T = 1000: k = 20, t_{n+k} = 20 (n+1) - 1 = 19, 39, ..., 999 (LCMScheduler's origin grid).

    DDIM step with (alpha', sigma') = (0.8, 0.6), x0 = 1, eps = 2: 0.8 + 1.2 = 2.0.
    LCMScheduler(original_inference_steps=50).set_timesteps(n) picks floor(linspace(0, 50, n, endpoint=False))
    from the descending grid: n = 2 -> indices 0, 25 -> t = 999, 499; n = 4 -> 999, 759, 499, 259.
    """
    grid = skip_grid(1000, 50)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1].item() == 999 and len(grid) == 50
    assert ddim_step(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.8), torch.tensor(0.6)).item() == \
        pytest.approx(2.0)
    assert lcm_inference_timesteps(1000, 50, 2).tolist() == [999, 499]
    assert lcm_inference_timesteps(1000, 50, 4).tolist() == [999, 759, 499, 259]
    from diffusers import LCMScheduler

    for n in (1, 3, 8):
        ref = LCMScheduler(original_inference_steps=50)
        ref.set_timesteps(n)
        assert lcm_inference_timesteps(1000, 50, n).long().tolist() == ref.timesteps.tolist()


def test_solver_grids_and_flow_euler_step_by_hand():
    """N = 4, T = 1000.

    VP: [0] + LCM's grid (n + 1) 250 - 1 = [0, 249, 499, 749, 999]; a step from 249 lands on 0 = max(-1, 0).
    Flow, shift 1: t_n = 1000 n / 4 = [0, 250, 500, 750, 1000]. Shift 3, shift(u) = 3u / (1 + 2u):
    u = 1/4 -> 0.75 / 1.5 = 0.5; u = 1/2 -> 1.5 / 2 = 0.75; u = 3/4 -> 2.25 / 2.5 = 0.9: [0, 500, 750, 900, 1000].
    Two steps pick indices floor(linspace(0, 4, 3))[:-1] = 0, 2 of [1000, 750, 500, 250]: 1000, 500.

    The DDIM step on a flow teacher is its Euler step: with x0 = x - sigma v, eps = x + (1 - sigma) v,
    (1 - sigma') x0 + sigma' eps = x + v (-sigma + sigma sigma' + sigma' - sigma sigma') = x + (sigma' - sigma) v.
    Numbers: x = 1, v = 2, sigma = 0.75 -> sigma' = 0.5: x0 = -0.5, eps = 1.5; 0.5 (-0.5) + 0.5 (1.5) = 0.5
    = 1 + (0.5 - 0.75) 2.
    """
    vp = VPSchedule(torch.linspace(0.99, 0.01, 1000, dtype=torch.float64))
    assert solver_grid(vp, 4).tolist() == [0, 249, 499, 749, 999]
    assert solver_grid(FlowSchedule(1000, 1.0), 4).tolist() == [0, 250, 500, 750, 1000]
    assert solver_grid(FlowSchedule(1000, 3.0), 4).tolist() == pytest.approx([0, 500, 750, 900, 1000])
    assert pick_inference_steps(solver_grid(FlowSchedule(1000, 1.0), 4), 2).tolist() == [1000, 500]
    assert lcd_timesteps(FlowSchedule(1000, 1.0), 20, 4).tolist() == [1000, 750, 500, 250]
    assert lcd_timesteps(vp, 50, 4).tolist() == lcm_inference_timesteps(1000, 50, 4).tolist()
    x0, eps = torch.tensor(1.0 - 0.75 * 2.0), torch.tensor(1.0 + 0.25 * 2.0)
    assert ddim_step(x0, eps, torch.tensor(0.5), torch.tensor(0.5)).item() == pytest.approx(0.5)


def test_guidance_embedding_by_hand():
    """dim 4: half = 2, f_k = 10000^(-k / (half - 1)) = [1, 1e-4]; w = 0.001 -> w' = 1000 w = 1.

    emb = [sin 1, sin 1e-4, cos 1, cos 1e-4]; w = 0 -> [0, 0, 1, 1]. Odd dims get a zero pad.
    """
    emb = guidance_embedding(torch.tensor([0.001, 0.0]), 4)
    expected = torch.tensor([[math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4)], [0, 0, 1, 1]])
    assert torch.allclose(emb, expected, atol=1e-6)
    assert guidance_embedding(torch.tensor([0.5]), 5)[0, -1].item() == 0.0


# ------------------------------------------------------------------ one step + export


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("lcd_sd") / "pipe")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lcd_images")
    write_image_folder(folder, caption="shape {i}")
    return folder


def make_method(tmp_path, source, images, resolution=16, **lcd):
    from trainers.config import load_config
    from trainers.lcd import LCD
    from trainers.run import load_run_bundle

    options = ", ".join(f"{k}: {v}" for k, v in {"sample_steps": 2, "guidance": 3.0, **lcd}.items())
    recipe = tmp_path / "lcd.yaml"
    recipe.write_text(f"method: lcd\noutput_dir: {tmp_path / 'run'}\nmodel: {{source: {source}}}\n"
                      f"data: {{kind: imagefolder, path: {images}, resolution: {resolution}}}\nlcd: {{{options}}}\n")
    cfg = load_config(recipe)
    return cfg, LCD(cfg, load_run_bundle(cfg, torch.device("cpu")))


def test_step_trains_student_only_and_export_reproduces_sampler(tmp_path, tiny_sd, images):
    """One optimizer step moves the student (incl. the new guidance layer), not the teacher; the exported
    folder (LCMScheduler) gives the in-suite sampler's latents at 1, 2, 4 and 8 steps."""
    from diffusers import DiffusionPipeline

    from trainers.ema import make_average
    from trainers.lcd import sample_lcd_latents
    from trainers.run import export_run

    cfg, method = make_method(tmp_path, tiny_sd, images)
    assert method.student.config.time_cond_proj_dim == 256
    method.bind({"student": method.student}, {"target": make_average(method.student)})
    teacher0 = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in method.student.state_dict().items()}
    batch = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "prompt": ["a cat", "a dog"]}
    out = method.loss(batch, 0, ["student"], torch.Generator().manual_seed(0))
    assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()
    optimizer = torch.optim.SGD(method.student.parameters(), lr=1.0)
    out.loss.mean().backward()
    optimizer.step()
    after = method.student.state_dict()
    changed = [k for k in student0 if not torch.equal(student0[k], after[k])]
    assert any("cond_proj" in k for k in changed) and len(changed) > len(student0) // 2
    assert all(torch.equal(teacher0[k], v) for k, v in method.teacher.state_dict().items())
    folder = export_run(cfg, method, "")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    for steps in (1, 2, 4, 8):
        ref = pipe(["a cat"], num_inference_steps=steps, guidance_scale=3.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(1), output_type="latent").images
        mine = sample_lcd_latents(method.bundle, method.student, ["a cat"], steps, 3.0,
                                  torch.Generator().manual_seed(1), (16, 16), 50, 10.0, 256)
        assert torch.allclose(ref, mine, atol=1e-4 * ref.abs().max().item()), (steps, (ref - mine).abs().max())


def test_flow_teacher_step_trains_student_and_export_reproduces_sampler(tmp_path, images):
    """A flow (Sana, shift 3) teacher: f = x0_hat is x_t itself at sigma 0; one step moves the student only;
    the exported FlowMatchEuler(stochastic_sampling) folder, called as its model card says (at 2 and 4 steps
    the grid's unshifted sigmas n / N), gives the in-suite sampler's latents at 1, 2 and 4 steps. (Sana's pipeline passes `generator` to the
    scheduler; SD3's does not, so its re-noising could not be seeded for an exact comparison.)"""
    import dataclasses

    from diffusers import DiffusionPipeline

    from pipelines.tiny import save_tiny_pipeline
    from trainers.lcd import sample_lcd_latents
    from trainers.run import export_run

    source = save_tiny_pipeline("sana", tmp_path / "sana")
    (tmp_path / "embedded").mkdir()
    with pytest.raises(ValueError, match="set lcd.guidance_embedding: false"):
        make_method(tmp_path / "embedded", source, images, resolution=32)
    cfg, method = make_method(tmp_path, source, images, resolution=32, guidance_embedding="false",
                              target_decay=0.0, num_ddim_timesteps=4)
    size = method.image_size
    assert method.bundle.schedule.shift == 3.0 and method.boundary is None
    assert method.grid.tolist() == pytest.approx([0, 500, 750, 900, 1000])
    method.bind({"student": method.student}, {})
    cond = method.bundle.encode_prompt(["a cat"], image_size=size)
    x = torch.randn(method.bundle.latent_shape(1, size))
    with torch.no_grad():
        assert torch.equal(method.consistency(method.student, x, torch.zeros(1), cond), x)
    teacher0 = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in method.student.state_dict().items()}
    out = method.loss({"pixel_values": torch.rand(2, 3, *size) * 2 - 1, "prompt": ["a cat", "a dog"]}, 0,
                      ["student"], torch.Generator().manual_seed(0))
    out.loss.mean().backward()
    torch.optim.SGD(method.student.parameters(), lr=1.0).step()
    after = method.student.state_dict()
    assert sum(not torch.equal(student0[k], after[k]) for k in student0) > len(student0) // 2
    assert all(torch.equal(teacher0[k], v) for k, v in method.teacher.state_dict().items())
    for steps in (1, 2, 4):  # the card gives the unshifted u = n / N; the scheduler applies shift 3
        folder = export_run(dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, steps=steps)), method, "")
        pipe = DiffusionPipeline.from_pretrained(folder)
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert pipe.scheduler.config.stochastic_sampling
        usage = card_call_kwargs(folder)
        # LCMScheduler's picks floor(linspace(0, 4, steps + 1))[:-1] of the top-down grid 1, 3/4, 1/2, 1/4
        assert usage.get("sigmas") == {1: None, 2: [1.0, 0.5], 4: [1.0, 0.75, 0.5, 0.25]}[steps]
        assert usage.get("num_inference_steps") == (1 if steps == 1 else None)
        ref = pipe(["a cat"], height=size[0], width=size[1], output_type="latent", use_resolution_binning=False,
                   generator=torch.Generator().manual_seed(1), **usage).images
        mine = sample_lcd_latents(method.bundle, method.student, ["a cat"], steps, 1.0,
                                  torch.Generator().manual_seed(1), size, 4, 10.0, None)
        assert torch.allclose(ref, mine, atol=1e-5 * ref.abs().max().item()), (steps, (ref - mine).abs().max())


# ------------------------------------------------------------------ recipes on tiny architectures


def run_recipe(recipe: str, tmp_path: Path, source: Path, extra: list[str]) -> Path:
    from accelerate import Accelerator

    from trainers.config import load_config
    from trainers.run import run

    overrides = [f"output_dir={tmp_path / 'run'}", f"model.source={source}", "model.weight_dtype=float32",
                 "train.mixed_precision=no", "train.max_steps=2", "train.batch_size=1", "train.checkpoint_every=0",
                 "train.validate_every=0", "train.log_with=none", "data.resolution=16", *extra]
    cfg = load_config(ROOT / recipe, overrides)
    assert run(cfg, Accelerator(cpu=True), recipe_path=str(ROOT / recipe)) == 0
    return tmp_path / "run" / "pipeline"


def test_pixart_recipe_runs_on_tiny_pixart_from_cached_latents(tmp_path, images):
    """configs/pixart_lcd.yaml (a DiT: no guidance embedding, fixed teacher w) trains on a latent cache made by
    scripts/cache_latents.py, as the recipe's second line says, and exports LCMScheduler."""
    import cache_latents

    from pipelines.tiny import save_tiny_pipeline

    source = save_tiny_pipeline("pixart", tmp_path / "pixart")
    assert cache_latents.main(["--config", str(ROOT / "configs" / "pixart_lcd.yaml"), "--out", str(tmp_path / "latents"),
                               f"model.source={source}", "data.kind=imagefolder", f"data.path={images}",
                               "data.resolution=16"]) == 0
    folder = run_recipe("configs/pixart_lcd.yaml", tmp_path, source, [f"data.path={tmp_path / 'latents'}"])
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50


def test_sd15_recipe_runs_on_tiny_sd(tmp_path, tiny_sd, images):
    folder = run_recipe("configs/sd15_lcd.yaml", tmp_path, tiny_sd, [f"data.path={images}"])
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50
    assert json.loads((folder / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 256


def test_sdxl_lora_recipe_runs_on_tiny_sdxl_and_trains_adapters_only(tmp_path, images):
    from pipelines.tiny import save_tiny_pipeline

    source = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    folder = run_recipe("configs/sdxl_lcd_lora.yaml", tmp_path, source, [f"data.path={images}"])
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    lora = load_file(folder / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k), "adapters trained"
    base = load_file(next((source / "unet").glob("*.safetensors")))
    merged = load_file(next((folder / "unet").glob("*.safetensors")))
    untouched = [k for k in base if "conv_in" in k or "time_embedding" in k]
    assert untouched and all(torch.equal(base[k], merged[k]) for k in untouched), "non-adapted weights stay frozen"


# ------------------------------------------------------------------ 2-process DDP + exact resume (real CLI)


def test_two_process_ddp_ranks_agree_and_resume_is_exact(tmp_path, tiny_sd, images, capsys):
    """4 DDP steps through the CLI: both ranks end identical. The same recipe on one process, with the step-4
    checkpoint deleted and the command re-run, resumes at 2 and rebuilds the same student, target network and
    optimizer state bit for bit."""
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text("\n".join([
        "# python scripts/distill.py --config ddp.yaml", "method: lcd", f"output_dir: {tmp_path / 'run'}",
        f"model: {{source: {tiny_sd}}}", f"data: {{kind: imagefolder, path: {images}, resolution: 16}}",
        "train: {max_steps: 4, batch_size: 1, checkpoint_every: 2, keep_checkpoints: 3, log_every: 1, "
        "log_with: none}", "optim: {lr: 1.0e-3}", "export: {enabled: false}",
        "lcd: {num_ddim_timesteps: 10, sample_steps: 2}"]) + "\n")
    launch_training(recipe)
    assert_ranks_identical(tmp_path / "run")
    first = assert_resume_is_exact(recipe, tmp_path / "single", 4, capsys)
    assert any(k.startswith("average_target") for k in first), "the target network is checkpointed"


