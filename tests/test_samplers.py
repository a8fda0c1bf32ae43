"""Samplers against the diffusers scheduler loops they reproduce, on a tiny deterministic model."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from pipelines.conditioning import Conditioning
from pipelines.samplers import guided, sample_ddim, sample_dpmpp_2m, sample_flow_euler
from pipelines.schedules import FlowSchedule, VPSchedule, schedule_from_scheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
DDIM = dict(SD, clip_sample=False, set_alpha_to_one=True)  # set_alpha_to_one: the last step lands on x_0
B, C, H = 2, 3, 4
f64 = torch.float64


def tiny_model(dtype=f64):
    """A fixed channel mix near the identity (so every prediction type keeps samples O(1)), plus t and
    conditioning terms."""
    g = torch.Generator().manual_seed(0)
    W = torch.eye(C, dtype=f64) + 0.2 * torch.randn(C, C, generator=g, dtype=f64)

    def predict(x_t, t, cond):
        emb = cond.kwargs["encoder_hidden_states"]
        tt = t.to(f64)[:, None, None, None] / 1000
        h = torch.einsum("oc,bchw->bohw", W, x_t.to(f64))
        return (h * (1 + 0.2 * tt) + 0.3 * emb.to(f64)[:, :, None, None] * torch.cos(3 * tt)).to(dtype)

    return predict


def inputs(dtype=f64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, H, generator=g, dtype=dtype)
    cond = Conditioning({"encoder_hidden_states": torch.randn(B, C, generator=g, dtype=dtype)})
    uncond = Conditioning({"encoder_hidden_states": torch.zeros(B, C, dtype=dtype)})
    return x, cond, uncond


def diffusers_loop(scheduler, predict, x, cond, uncond, g, model_t=None, **step_kwargs):
    """The loop a diffusers pipeline runs: CFG on the raw output, then scheduler.step."""
    for i, t in enumerate(scheduler.timesteps):
        tm = torch.full((x.shape[0],), float(t if model_t is None else model_t[i]), dtype=x.dtype)
        if g > 1:
            out_u, out_c = predict(torch.cat([x, x]), torch.cat([tm, tm]), Conditioning.cat([uncond, cond])).chunk(2)
            out = out_u + g * (out_c - out_u)
        else:
            out = predict(x, tm, cond)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def _close(a, b, tol=1e-5):
    assert a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=tol), (a - b).abs().max().item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,n", [("trailing", 1), ("trailing", 4), ("trailing", 10), ("leading", 3),
                                       ("leading", 7)])
@pytest.mark.parametrize("g", [1.0, 4.0])
def test_ddim_matches_diffusers(prediction_type, spacing, n, g):
    ref = DDIMScheduler(**DDIM, timestep_spacing=spacing, prediction_type=prediction_type)
    ref.set_timesteps(n)
    schedule = schedule_from_scheduler(ref)
    predict, (x, cond, uncond) = tiny_model(), inputs()
    expected = diffusers_loop(ref, predict, x, cond, uncond, g)
    ours = sample_ddim(guided(predict, cond, uncond, g, prediction_type, schedule), x,
                       schedule.timesteps(n, spacing), schedule)
    _close(ours, expected)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_stochastic_matches_diffusers(eta):
    """Same generator seed, noise drawn once per step in the same order, so trajectories coincide."""
    ref = DDIMScheduler(**DDIM, timestep_spacing="trailing", prediction_type="epsilon")
    ref.set_timesteps(5)
    schedule = schedule_from_scheduler(ref)
    predict, (x, cond, uncond) = tiny_model(), inputs()
    expected = diffusers_loop(ref, predict, x, cond, uncond, 3.0, eta=eta,
                              generator=torch.Generator().manual_seed(7))
    ours = sample_ddim(guided(predict, cond, uncond, 3.0, "epsilon", schedule), x, schedule.timesteps(5), schedule,
                       eta=eta, generator=torch.Generator().manual_seed(7))
    _close(ours, expected)
    with pytest.raises(ValueError, match="Generator"):
        sample_ddim(guided(predict, cond, uncond, 3.0, "epsilon", schedule), x, schedule.timesteps(5), schedule,
                    eta=eta)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("g", [1.0, 5.0])
def test_flow_euler_matches_diffusers(shift, n, g):
    """diffusers feeds the model its float32 grid; we use our float64 grid (equal to float32 rounding)."""
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    schedule = schedule_from_scheduler(ref)
    predict, (x, cond, uncond) = tiny_model(), inputs()
    expected = diffusers_loop(ref, predict, x, cond, uncond, g)
    ours = sample_flow_euler(guided(predict, cond, uncond, g, "flow", schedule), x, schedule.timesteps(n), schedule)
    _close(ours, expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("g", [1.0, 3.0])
def test_dpmpp_2m_matches_diffusers_vp(prediction_type, n, g):
    """diffusers steps in float32 internally, hence the 1e-5 tolerance in float64."""
    ref = DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
                                      prediction_type=prediction_type)
    ref.set_timesteps(n)
    schedule = schedule_from_scheduler(ref)
    predict, (x, cond, uncond) = tiny_model(), inputs()
    expected = diffusers_loop(ref, predict, x, cond, uncond, g)
    ours = sample_dpmpp_2m(guided(predict, cond, uncond, g, prediction_type, schedule), x,
                           schedule.timesteps(n), schedule)
    _close(ours, expected)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_dpmpp_2m_matches_diffusers_flow(n):
    """Sana's diffusers scheduler (use_flow_sigmas). It truncates model timesteps to int64 while stepping with
    the exact sigmas; both loops here evaluate the model at T * sigma so only the solvers are compared."""
    ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                      flow_shift=3.0, prediction_type="flow_prediction")
    ref.set_timesteps(n)
    schedule = schedule_from_scheduler(ref)
    assert isinstance(schedule, FlowSchedule)
    grid = ref.sigmas[:-1].to(f64) * 1000
    predict, (x, cond, uncond) = tiny_model(), inputs()
    expected = diffusers_loop(ref, predict, x, cond, uncond, 4.0, model_t=grid)
    ours = sample_dpmpp_2m(guided(predict, cond, uncond, 4.0, "flow", schedule), x, grid, schedule)
    _close(ours, expected)


def test_float32_ddim_and_dtype_kept():
    ref = DDIMScheduler(**DDIM, timestep_spacing="trailing", prediction_type="v_prediction")
    ref.set_timesteps(4)
    schedule = schedule_from_scheduler(ref)
    predict, (x, cond, uncond) = tiny_model(torch.float32), inputs(torch.float32)
    expected = diffusers_loop(ref, predict, x, cond, uncond, 2.0)
    ours = sample_ddim(guided(predict, cond, uncond, 2.0, "v_prediction", schedule), x, schedule.timesteps(4),
                       schedule)
    _close(ours, expected)


def test_tiny_unet_ddim_matches_diffusers():
    """A real UNet2DConditionModel (tiny, from config) through the same comparison, with CFG."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4).eval()

    def predict(x_t, t, cond):
        return unet(x_t, t, **cond.kwargs).sample

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = Conditioning({"encoder_hidden_states": torch.randn(1, 5, 8, generator=g)})
    uncond = Conditioning({"encoder_hidden_states": torch.zeros(1, 5, 8)})
    ref = DDIMScheduler(**DDIM, timestep_spacing="trailing")
    ref.set_timesteps(2)
    schedule = schedule_from_scheduler(ref)
    with torch.no_grad():
        expected = diffusers_loop(ref, predict, x, cond, uncond, 3.0)
        ours = sample_ddim(guided(predict, cond, uncond, 3.0, "epsilon", schedule), x, schedule.timesteps(2), schedule)
    _close(ours, expected, 1e-4)


# ---------------------------------------------------------------------------------------------- hand-derived


def test_guided_fuses_and_combines():
    """Stub outputs: uncond rows give 1, cond rows give 3; with g = 2.5, out = 1 + 2.5 (3 - 1) = 6.
    prediction_type "sample" means x0_hat = out. g = 1 runs one conditional pass of batch B and gives 3.
    Per-sample g = [1, 2] gives [1 + 1*2, 1 + 2*2] = [3, 5]. An uncond of batch 1 is repeated to B."""
    calls = []

    def predict(x_t, t, cond):
        calls.append(x_t.shape[0])
        return cond.kwargs["encoder_hidden_states"][:, :, None, None].expand_as(x_t).clone()

    schedule = VPSchedule.from_scheduler_config(SD)
    x, t = torch.zeros(B, C, H, H, dtype=f64), torch.full((B,), 500.0, dtype=f64)
    cond = Conditioning({"encoder_hidden_states": torch.full((B, C), 3.0, dtype=f64)})
    uncond = Conditioning({"encoder_hidden_states": torch.full((1, C), 1.0, dtype=f64)})
    x0_hat, _ = guided(predict, cond, uncond, 2.5, "sample", schedule)(x, t)
    assert calls == [2 * B] and torch.all(x0_hat == 6.0)
    x0_hat, _ = guided(predict, cond, None, 1.0, "sample", schedule)(x, t)
    assert calls == [2 * B, B] and torch.all(x0_hat == 3.0)
    x0_hat, _ = guided(predict, cond, uncond, torch.tensor([1.0, 2.0], dtype=f64), "sample", schedule)(x, t)
    assert x0_hat[:, 0, 0, 0].tolist() == [3.0, 5.0]
    with pytest.raises(ValueError, match="unconditional"):
        guided(predict, cond, None, 2.0, "sample", schedule)


def test_flow_euler_equals_ddim_on_vp():
    """With y = x/(alpha+sigma), s = sigma/(alpha+sigma): y = (1-s) x0_hat + s eps_hat, and the Euler step
    y' = y + (s'-s)(eps_hat - x0_hat) = (1-s') x0_hat + s' eps_hat, i.e. x' = alpha' x0_hat + sigma' eps_hat:
    the DDIM eta = 0 update. Equal up to float64 rounding on any schedule."""
    schedule = VPSchedule.from_scheduler_config(SD)
    predict, (x, cond, uncond) = tiny_model(), inputs()
    model_fn = guided(predict, cond, uncond, 3.0, "epsilon", schedule)
    grid = schedule.timesteps(6, "linspace")
    torch.testing.assert_close(sample_flow_euler(model_fn, x, grid, schedule),
                               sample_ddim(model_fn, x, grid, schedule), rtol=0, atol=1e-10)


def test_one_step_returns_x0_hat_and_callback_records():
    """One step to (alpha, sigma) = (1, 0): DDIM gives 1*x0_hat + 0*eps_hat, flow Euler gives x - s u = x0_hat,
    DPM++ gives (0/sigma) x + 1*(1 - 0) x0_hat. The callback sees (i, t, x_t, x0_hat) once per evaluation."""
    schedule = FlowSchedule(shift=3.0)
    predict, (x, cond, uncond) = tiny_model(), inputs()
    model_fn = guided(predict, cond, uncond, 2.0, "flow", schedule)
    grid = schedule.timesteps(1)
    x0_hat, _ = model_fn(x, grid.expand(B))
    for sampler in (sample_ddim, sample_flow_euler, sample_dpmpp_2m):
        torch.testing.assert_close(sampler(model_fn, x, grid, schedule), x0_hat, rtol=0, atol=1e-12)
    seen = []
    sample_dpmpp_2m(model_fn, x, schedule.timesteps(4), schedule,
                    callback=lambda i, t, x_t, x0: seen.append((i, t.item(), x_t.shape, x0.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == schedule.timesteps(4).tolist() and seen[0][2] == x.shape
    with pytest.raises(ValueError, match="descending"):
        sample_ddim(model_fn, x, schedule.timesteps(4).flip(0), schedule)
