"""TBCM: hand-derived sCM/TrigFlow maths, JVP agreement, fp32 time embeddings, exact 1-2 step export
for VP and flow students, recipes on tiny architectures, DDP + exact resume."""
import math
from pathlib import Path

import pytest
import torch

from pipelines.schedules import append_dims, flow_velocity_to_trigflow, x0_eps_to_v
from trainers.consistency import (jvp_finite_difference, jvp_forward_ad, keep_time_embeddings_fp32,
                                  normalize_tangent, scm_loss, scm_tangent, tangent_ratio, trigflow_step)
from trainers.tbcm import (black_keep, native_point, reference_route, stratified_angles, velocity_from_output,
                           velocity_regression_loss)
from card_usage import card_call_kwargs
from checkpoint_state import assert_resume_is_exact
from consistency_step import assert_step_trains_student_and_logvar_only
from distributed_launch import assert_ranks_identical, launch_training

ROOT = Path(__file__).resolve().parents[1]
Q = math.pi / 4


# ------------------------------------------------------------------ maths


def test_reference_route_and_stratified_angles_by_hand():
    """Flow route, K = 2, shift 1: sigma = [1, 0.5, 0] -> angles atan(sigma / (1 - sigma)) = [pi/2, pi/4, 0].
    Shift 3 moves the middle point to sigma = 3 * 0.5 / (1 + 2 * 0.5) = 0.75 -> atan(3).
    Stratified: s_j = a_j + u_j (a_{j-1} - a_j), so with u = (u_1, u_2): s_1 = pi/4 + u_1 pi/4, s_2 = u_2 pi/4.
    A VP route starts at the largest angle of the schedule (t = 999) and ends at t = 0's angle."""
    from pipelines.schedules import FlowSchedule, VPSchedule

    flow = FlowSchedule()
    assert torch.allclose(reference_route(flow, 2, 1.0), torch.tensor([2 * Q, Q, 0.0], dtype=torch.float64))
    assert reference_route(flow, 2, 3.0)[1].item() == pytest.approx(math.atan(3.0))
    u = torch.rand(3, 2, generator=torch.Generator().manual_seed(5))
    s = stratified_angles(reference_route(flow, 2, 1.0), 3, torch.Generator().manual_seed(5))
    assert torch.allclose(s, torch.stack([torch.full((3,), 2 * Q), Q + u[:, 0] * Q, u[:, 1] * Q], 1), atol=1e-6)
    vp = VPSchedule(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))
    route = reference_route(vp, 4, 2.5)
    assert len(route) == 5 and (route[1:] < route[:-1]).all()
    assert route[0].item() == pytest.approx(vp.max_angle) and route[-1].item() == pytest.approx(vp.min_angle)


def test_tangent_by_hand():
    """g = -cos^2 s (sigma_d F - dx/ds) - r cos s sin s (x + sigma_d dF/ds) at s = pi/4 (cos^2 = cos sin = 1/2),
    F = 1, dx/ds = 0.5, x = 2, dF/ds = 1:
      sigma_d = 1, r = 1:   -0.5 (1 - 0.5) - 0.5 (2 + 1) = -0.25 - 1.5 = -1.75
      sigma_d = 1, r = 0:   -0.25
      sigma_d = 0.5, r = 1: -0.5 (0.5 - 0.5) - 0.5 (2 + 0.5) = -1.25
    Normalisation, c = 0.1: g = [3, 4] has norm 5 -> [3 / 5.1, 4 / 5.1]."""
    one = lambda v: torch.full((1, 1), float(v))  # noqa: E731
    s = torch.tensor([Q])
    args = (one(1), one(0.5), one(2), one(1), s)
    assert scm_tangent(*args, sigma_d=1.0, r=1.0).item() == pytest.approx(-1.75, rel=1e-6)
    assert scm_tangent(*args, sigma_d=1.0, r=0.0).item() == pytest.approx(-0.25, rel=1e-6)
    assert scm_tangent(*args, sigma_d=0.5, r=1.0).item() == pytest.approx(-1.25, rel=1e-6)
    assert torch.allclose(normalize_tangent(torch.tensor([[3.0, 4.0]]), 0.1), torch.tensor([[3 / 5.1, 4 / 5.1]]))


def test_tangent_is_cos_times_total_derivative_of_f():
    """At r = 1, g = cos s * d/ds f(x(s), s) with f = cos s x - sin s sigma_d F (expand the product rule:
    d f/ds = -sin s x + cos s dx/ds - cos s sigma_d F - sin s sigma_d dF/ds; times cos s gives g).
    Checked against autograd on F(x, s) = x^2 sin s along x(s) = 1 + 0.3 s, sigma_d = 0.5."""
    sigma_d = 0.5
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x = 1 + 0.3 * s
    F = x**2 * s.sin()
    f = s.cos() * x - s.sin() * sigma_d * F
    (dfds,) = torch.autograd.grad(f, s)
    with torch.no_grad():
        xv, sv = x.detach(), s.detach()
        dFds = 2 * xv * 0.3 * sv.sin() + xv**2 * sv.cos()
        g = scm_tangent((xv**2 * sv.sin()).view(1, 1), torch.full((1, 1), 0.3, dtype=torch.float64), xv.view(1, 1),
                        dFds.view(1, 1), sv.view(1), sigma_d, 1.0)
    assert g.item() == pytest.approx((sv.cos() * dfds).item(), rel=1e-10)


def test_adaptive_weighting_by_hand():
    """L = (1 / (sigma_d tan s)) e^{-u} mean((F - F^- - g)^2) + u; s = pi/4, sigma_d = 0.5 -> weight 2;
    F - F^- - g = [1, 1] -> mean square 1. u = 0: 2. u = log 2: 2 / 2 + log 2 = 1.6931."""
    F, F_minus, g = torch.tensor([[2.0, 2.0]] * 2), torch.ones(2, 2), torch.zeros(2, 2)
    loss = scm_loss(F, F_minus, g, torch.tensor([Q, Q]), torch.tensor([0.0, math.log(2)]), 0.5)
    assert torch.allclose(loss, torch.tensor([2.0, 1.0 + math.log(2)]), rtol=1e-6)
    # the learned log-variance minimises at u = log(weight * mse): d/du (2 e^{-u} + u) = 0 -> u = log 2
    for u in (math.log(2) - 0.1, math.log(2) + 0.1):
        assert scm_loss(F[:1], F_minus[:1], g[:1], torch.tensor([Q]), torch.tensor([u]), 0.5).item() > loss[1].item()


def test_tangent_ratio_schedule():
    """Warm-up 10: r(5) = 0.5, r(12) = 1; calm-down 20 -> 30 to 0.75: r(25) = 1 - 0.25 * 0.5 = 0.875, r(40) = 0.75."""
    assert tangent_ratio(5, 10) == 0.5 and tangent_ratio(12, 10, 20, 30, 0.75) == 1.0
    assert tangent_ratio(25, 10, 20, 30, 0.75) == pytest.approx(0.875)
    assert tangent_ratio(40, 10, 20, 30, 0.75) == 0.75 and tangent_ratio(0, 0) == 1.0


def test_black_filter_by_hand():
    """MSE m to the black latent: m = 0 (black) -> always dropped; m = 4 >= 1 -> always kept; m = 0.25 -> kept
    exactly when the drawn u < 0.25 (probability m)."""
    black = torch.zeros(1, 1, 2, 2)
    x_0 = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0)] + [torch.full((1, 2, 2), 0.5)] * 6)
    keep = black_keep(x_0, black, 1.0, torch.Generator().manual_seed(3))
    u = torch.rand(8, generator=torch.Generator().manual_seed(3))
    assert keep.tolist() == [False, True] + (u[2:] < 0.25).tolist()


def test_velocity_regression_loss_by_hand():
    """The PF-ODE is dx/ds = sigma_d F, so the teacher's F is dx/ds / sigma_d. sigma_d = 0.5, dx/ds = 1.5:
    F_teacher = 3; a student F of 1 in one element and 3 in the other gives ((1 - 3)^2 + 0) / 2 = 2."""
    loss = velocity_regression_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.5, 1.5]]), 0.5)
    assert loss.tolist() == [2.0]


def test_trigflow_teacher_step_and_velocity_conversions():
    """With x_s = cos s x0 + sin s z and the exact F = (cos s z - sin s x0) / sigma_d, the DDIM step
    cos(s - s') x - sin(s - s') sigma_d F lands on cos s' x0 + sin s' z (angle-difference identities).
    VP: an eps output maps to F = v = alpha eps - sigma x0; flow: F = flow_velocity_to_trigflow(u)."""
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64), torch.randn(2, 1, 2, 2, generator=g,
                                                                                      dtype=torch.float64)
    s, s_next = torch.tensor([1.2, 0.9], dtype=torch.float64), torch.tensor([0.4, 0.0], dtype=torch.float64)
    sigma_d = 0.5
    c, sn = append_dims(s.cos(), 4), append_dims(s.sin(), 4)
    x = c * x0 + sn * sigma_d * z
    F = (c * sigma_d * z - sn * x0) / sigma_d
    expected = append_dims(s_next.cos(), 4) * x0 + append_dims(s_next.sin(), 4) * sigma_d * z
    assert torch.allclose(trigflow_step(x, F, s, s_next, sigma_d), expected, atol=1e-12)
    eps = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    x_vp = c * x0 + sn * eps
    F_vp = velocity_from_output(eps, x_vp, s, c, sn, "epsilon")
    assert torch.allclose(F_vp, x0_eps_to_v(x0, eps, c, sn), atol=1e-12)
    from pipelines.schedules import FlowSchedule

    _, alpha, sigma, scale = native_point(FlowSchedule(), s)
    a4, s4 = append_dims(alpha, 4), append_dims(sigma, 4)
    x_flow, u = a4 * x0 + s4 * eps, eps - x0
    assert torch.allclose(velocity_from_output(u, x_flow, s, a4, s4, "flow"), flow_velocity_to_trigflow(u, x_flow, s4),
                          atol=1e-12)
    assert torch.allclose(scale, 1 / (s.sin() + s.cos()))


def test_jvp_forward_ad_and_finite_difference_agree():
    """Analytic: F = x^2 sin s along (dx, 1) has dF/ds = 2 x dx sin s + x^2 cos s. Tiny SD UNet with math
    attention (v-parameterised TrigFlow velocity, as the student): both agree to < 1% (h = 1e-4 rad)."""
    from pipelines.backbones import set_attention
    from pipelines.tiny import tiny_bundle

    g = torch.Generator().manual_seed(0)
    x, dx, s = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.tensor([0.3, 0.9, 1.4])
    fn = lambda xx, ss: xx**2 * append_dims(ss.sin(), 2)  # noqa: E731
    exact = 2 * x * dx * append_dims(s.sin(), 2) + x**2 * append_dims(s.cos(), 2)
    assert torch.allclose(jvp_forward_ad(fn, x, s, dx), exact, atol=1e-5)
    assert torch.allclose(jvp_finite_difference(fn, x, s, dx, 1e-3, 0.0, 1.5), exact, atol=1e-3)
    bundle = tiny_bundle("sd")
    set_attention(bundle.denoiser, "math")
    cond = bundle.encode_prompt(["a", "b", "c"], image_size=(16, 16))

    def velocity(xx, ss):
        t, alpha, sigma, _ = native_point(bundle.schedule, ss)
        out = bundle.predict(bundle.denoiser, xx, t, cond)
        return velocity_from_output(out, xx, ss, append_dims(alpha, 4), append_dims(sigma, 4), "v_prediction")

    x, dx = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    with torch.no_grad():
        ad = jvp_forward_ad(velocity, x, s, dx)
        fd = jvp_finite_difference(velocity, x, s, dx, 1e-4, bundle.schedule.min_angle, bundle.schedule.max_angle)
    rel = (ad - fd).flatten(1).norm(dim=1) / ad.flatten(1).norm(dim=1)
    assert (rel < 1e-2).all(), rel


def test_time_embeddings_stay_fp32_under_autocast():
    """Under bf16 autocast the wrapped time embedding returns float32 while the rest of the UNet runs bf16."""
    from pipelines.tiny import tiny_bundle

    bundle = tiny_bundle("sd")
    unet = bundle.denoiser
    assert keep_time_embeddings_fp32(unet) == ["time_embedding"]
    seen = {}
    unet.time_embedding.register_forward_hook(lambda m, i, o: seen.update(time=o.dtype) and None)
    unet.conv_in.register_forward_hook(lambda m, i, o: seen.update(conv=o.dtype) and None)
    cond = bundle.encode_prompt(["a"], image_size=(16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bundle.predict(unet, torch.randn(1, 4, 4, 4), torch.tensor([500.5]), cond)
    assert seen == {"time": torch.float32, "conv": torch.bfloat16}


@pytest.mark.parametrize("family, embedding", [("sd3", "time_text_embed"), ("sana", "time_embed"),
                                               ("pixart", "adaln_single")])
def test_dit_time_embeddings_stay_fp32_under_autocast(family, embedding):
    """The DiTs' embeddings run in fp32 under bf16 autocast too. Sana's and PixArt's AdaLayerNormSingle are
    handed `hidden_dtype=bfloat16` by the transformer; it must become float32 inside the wrapper, or the
    fp32 Linear meets bf16 features ("mat1 and mat2 must have the same dtype")."""
    from pipelines.tiny import tiny_bundle

    bundle = tiny_bundle(family)
    net = bundle.denoiser
    assert keep_time_embeddings_fp32(net) == [embedding]
    seen = {}
    getattr(net, embedding).register_forward_hook(
        lambda m, i, o: seen.update(time=(o[0] if isinstance(o, tuple) else o).dtype) and None)
    cond = bundle.encode_prompt(["a"], image_size=(16, 16))
    x = torch.randn(1, net.config.in_channels, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bundle.predict(net, x, torch.tensor([500.5]), cond)
    assert seen == {"time": torch.float32} and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------ one step + exact export


def make_method(tmp_path, family: str, resolution: int, **tbcm):
    from pipelines.tiny import save_tiny_pipeline
    from trainers.config import load_config
    from trainers.run import load_run_bundle
    from trainers.tbcm import TBCM

    source = save_tiny_pipeline(family, tmp_path / family)
    options = ", ".join(f"{k}: {v}" for k, v in {"route_steps": 2, "tangent_warmup_steps": 2, **tbcm}.items())
    recipe = tmp_path / "tbcm.yaml"
    recipe.write_text(f"method: tbcm\noutput_dir: {tmp_path / 'run'}\nmodel: {{source: {source}, attention: math}}\n"
                      f"data: {{kind: prompts, path: p.txt, resolution: {resolution}}}\ntbcm: {{{options}}}\n")
    cfg = load_config(recipe)
    method = TBCM(cfg, load_run_bundle(cfg, torch.device("cpu")))
    method.bind(method.trainable(), {})
    return cfg, method


def exported_latents(cfg, method, steps: int, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported folder sampled as its model card says for `steps` steps (num_inference_steps, or the
    sigmas of a flow student's 2-step grid), against the in-suite sampler."""
    import dataclasses

    from diffusers import DiffusionPipeline

    from trainers.run import export_run

    cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, steps=steps))
    folder = export_run(cfg, method, "")
    pipe = DiffusionPipeline.from_pretrained(folder)
    kwargs = card_call_kwargs(folder)
    assert ("sigmas" in kwargs) == (flow and steps > 1), kwargs
    if flow:
        kwargs["use_resolution_binning"] = False
    h, w = method.image_size
    ref = pipe(["a cat"], height=h, width=w, output_type="latent", generator=torch.Generator().manual_seed(1),
               **kwargs).images
    mine = method.sample_latents(method.student, ["a cat"], steps, torch.Generator().manual_seed(1))
    return ref, mine


@pytest.mark.parametrize("student_prediction", ["teacher", "v_prediction"])
def test_vp_step_trains_student_and_logvar_only_and_export_is_exact(student_prediction, tmp_path):
    cfg, method = make_method(tmp_path, "sd", 16, student_prediction=student_prediction)
    expected = "epsilon" if student_prediction == "teacher" else "v_prediction"
    assert method.student_prediction == expected and method.sigma_d == 1.0
    if student_prediction == "teacher":  # the student starts as the teacher: same F (guidance 1) at any state
        x, s = torch.randn(2, 4, 2, 2), torch.tensor([0.4, 1.3])
        cond = method.bundle.encode_prompt(["a cat", "a dog"], image_size=method.image_size)
        with torch.no_grad():
            F_teacher = method.teacher_velocity(x, s, cond, torch.ones(2))
            F_student = method.student_velocity(method.student, x, s, cond)
        assert torch.allclose(F_student, F_teacher, atol=1e-5)
    assert_step_trains_student_and_logvar_only(method, {"prompt": ["a cat", "a dog"]}, states=4)  # 2 prompts x 2
    for steps in (1, 2):
        ref, mine = exported_latents(cfg, method, steps, flow=False)
        assert torch.allclose(ref, mine, atol=1e-5 * ref.abs().max().item()), (steps, (ref - mine).abs().max())


def test_velocity_warmup_regresses_a_v_student_onto_the_teacher_then_hands_over(tmp_path):
    """With velocity_warmup_steps = 3 a v student (an eps teacher's weights read as v) trains on
    (F_theta - F_teacher)^2 at the stored guided teacher F, which falls over a few steps on one batch;
    from step 3 on the step is the sCM loss (its logs carry r)."""
    cfg, method = make_method(tmp_path, "sd", 16, student_prediction="v_prediction", velocity_warmup_steps=3)
    optimizer = torch.optim.Adam([p for m in method.trainable().values() for p in m.parameters()], lr=1e-3)
    mse = []
    for step in range(3):
        out = method.loss({"prompt": ["a cat", "a dog"]}, step, ["student", "logvar"], torch.Generator().manual_seed(0))
        assert "r" not in out.logs
        mse.append(out.logs["velocity_mse"].item())
        optimizer.zero_grad()
        out.loss.mean().backward()
        optimizer.step()
    assert mse[2] < mse[0], mse
    out = method.loss({"prompt": ["a cat", "a dog"]}, 3, ["student", "logvar"], torch.Generator().manual_seed(0))
    assert "r" in out.logs and "velocity_mse" not in out.logs


def test_flow_student_export_is_exact_at_one_and_two_steps(tmp_path):
    cfg, method = make_method(tmp_path, "sana", 32, jvp="forward_ad")
    assert method.student_prediction == "flow" and method.sigma_d == 0.5
    with pytest.raises(ValueError, match="student_prediction=v_prediction is for VP"):
        make_method(tmp_path / "v", "sana", 32, student_prediction="v_prediction")
    out = method.loss({"prompt": ["a cat"]}, 0, ["student", "logvar"], torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss).all()
    for steps in (1, 2):
        ref, mine = exported_latents(cfg, method, steps, flow=True)
        assert torch.allclose(ref, mine, atol=1e-5 * ref.abs().max().item()), (steps, (ref - mine).abs().max())


# ------------------------------------------------------------------ recipes on tiny architectures


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("tbcm_prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\na green triangle\na yellow star\n")
    return path


@pytest.mark.parametrize("recipe,family,resolution", [("configs/sd15_tbcm.yaml", "sd", 16),
                                                       ("configs/sdxl_tbcm.yaml", "sdxl", 16),
                                                       ("configs/sana_tbcm.yaml", "sana", 32)])
def test_recipe_runs_on_tiny_architecture(tmp_path, prompts, recipe, family, resolution):
    from accelerate import Accelerator

    from pipelines.tiny import save_tiny_pipeline
    from trainers.config import load_config
    from trainers.run import run

    source = save_tiny_pipeline(family, tmp_path / family)
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.source={source}", "model.weight_dtype=float32",
                 "train.mixed_precision=no", "train.max_steps=2", "train.checkpoint_every=0", "train.validate_every=0",
                 "train.log_with=none", f"data.path={prompts}", f"data.resolution={resolution}", "tbcm.route_steps=2"]
    cfg = load_config(ROOT / recipe, overrides)
    assert run(cfg, Accelerator(cpu=True), recipe_path=str(ROOT / recipe)) == 0
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


# ------------------------------------------------------------------ 2-process DDP + exact resume (real CLI)


def test_two_process_ddp_ranks_agree_and_resume_is_exact(tmp_path, prompts, capsys):
    """4 DDP steps on prompts only through the CLI: both ranks end identical. The same recipe on one process,
    with the step-4 checkpoint deleted and the command re-run, resumes at 2 and rebuilds the same student,
    log-variance head and optimizer states bit for bit."""
    from pipelines.tiny import save_tiny_pipeline

    source = save_tiny_pipeline("sd", tmp_path / "sd")
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text("\n".join([
        "# python scripts/distill.py --config ddp.yaml", "method: tbcm", f"output_dir: {tmp_path / 'run'}",
        f"model: {{source: {source}}}", f"data: {{kind: prompts, path: {prompts}, resolution: 16}}",
        "train: {max_steps: 4, batch_size: 1, checkpoint_every: 2, keep_checkpoints: 3, log_every: 1, "
        "log_with: none}", "optim: {lr: 1.0e-3}", "export: {enabled: false}",
        "tbcm: {route_steps: 2, tangent_warmup_steps: 2}"]) + "\n")
    launch_training(recipe)
    assert_ranks_identical(tmp_path / "run")
    first = assert_resume_is_exact(recipe, tmp_path / "single", 4, capsys)
    assert any(k.startswith("model_1.") for k in first), "the log-variance head is checkpointed"


