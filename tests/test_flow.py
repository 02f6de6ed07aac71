"""Flow matching: the straight path's identities, the time grid, the ODE samplers, and seeded decoding."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dgaetok import flow
from dgaetok.models import DGAE, DGAE_T, SDVAE, SDVAE_T, images_per_call


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- the path -------------------------------------------------------------------------------------------------


def test_interpolate_endpoints_and_per_sample_times():
    x, eps = randn(3, 3, 8, 8, seed=1), randn(3, 3, 8, 8, seed=2)
    assert torch.equal(flow.interpolate(x, eps, torch.zeros(3)), x)
    assert torch.equal(flow.interpolate(x, eps, torch.ones(3)), eps)
    t = torch.tensor([0.0, 0.5, 1.0])
    x_t = flow.interpolate(x, eps, t)
    assert torch.equal(x_t[0], x[0]) and torch.equal(x_t[2], eps[2])
    torch.testing.assert_close(x_t[1], 0.5 * (x[1] + eps[1]))


def test_velocity_target_is_the_time_derivative_of_the_path():
    x, eps = randn(2, 3, 4, 4, seed=1, dtype=torch.float64), randn(2, 3, 4, 4, seed=2, dtype=torch.float64)
    t, h = torch.tensor([0.3, 0.7], dtype=torch.float64), 1e-6
    fd = (flow.interpolate(x, eps, t + h) - flow.interpolate(x, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, flow.velocity_target(x, eps))


def test_predict_x0_recovers_the_data_from_the_true_velocity():
    x, eps = randn(4, 3, 8, 8, seed=1), randn(4, 3, 8, 8, seed=2)
    t = torch.tensor([0.0, 0.1, 0.6, 1.0])
    x_t = flow.interpolate(x, eps, t)
    torch.testing.assert_close(flow.predict_x0(x_t, t, flow.velocity_target(x, eps)), x)
    # and a wrong velocity is penalised in proportion to t
    x0 = flow.predict_x0(x_t, t, flow.velocity_target(x, eps) + 1)
    torch.testing.assert_close((x - x0).mean(dim=(1, 2, 3)), t)


def test_sample_t_is_uniform_and_seeded():
    a = flow.sample_t(20_000, "cpu", torch.Generator().manual_seed(0))
    b = flow.sample_t(20_000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 1
    assert a.mean().item() == pytest.approx(0.5, abs=0.01)


# --- the time grid --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_time_grid_endpoints_and_monotonic(steps, shift):
    grid = flow.time_grid(steps, shift)
    assert grid.shape == (steps + 1,) and grid.dtype == torch.float32
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert (grid[1:] < grid[:-1]).all()


def test_time_grid_uniform_without_shift_and_shift_spends_steps_at_high_noise():
    torch.testing.assert_close(flow.time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    plain, shifted = flow.time_grid(20), flow.time_grid(20, shift=3.0)
    assert (shifted >= plain).all()
    assert (shifted > 0.5).sum() > (plain > 0.5).sum()
    steps_plain, steps_shifted = plain[:-1] - plain[1:], shifted[:-1] - shifted[1:]
    assert steps_shifted[0] < steps_plain[0] and steps_shifted[-1] > steps_plain[-1]
    # SD3's formula, t' = s t / (1 + (s - 1) t)
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))


def test_time_grid_and_sample_reject_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        flow.time_grid(0)
    with pytest.raises(ValueError, match="unknown sampler"):
        flow.sample(lambda x, t: x, torch.zeros(1, 1), 2, sampler="rk4")


# --- the ODE samplers on problems with known answers ---------------------------------------------------------


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 3])
def test_constant_velocity_is_integrated_exactly(sampler, steps):
    noise, c = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    out = flow.sample(lambda x, t: c, noise, steps, sampler, shift=2.0)
    torch.testing.assert_close(out, noise - c)


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_the_straight_path_is_integrated_exactly_in_one_step(sampler):
    """With the true velocity of a single data point the ODE is a straight line: one step lands on x."""
    x, eps = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    out = flow.sample(lambda x_t, t: flow.velocity_target(x, eps), eps, 1, sampler)
    torch.testing.assert_close(out, x)


def test_time_argument_is_per_sample_and_follows_the_grid():
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    flow.sample(velocity, torch.zeros(3, 1, 2, 2), 4, "euler")
    assert [s.shape for s in seen] == [(3,)] * 4
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), flow.time_grid(4)[:-1])


def test_network_calls_per_sampler():
    calls = {"n": 0}

    def velocity(x, t):
        calls["n"] += 1
        return x

    for sampler, steps, expected in [("euler", 5, 5), ("heun", 5, 9), ("heun", 1, 1)]:
        calls["n"] = 0
        flow.sample(velocity, torch.ones(1, 1), steps, sampler)
        assert calls["n"] == expected, sampler


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_linear_ode_matches_the_closed_form_of_each_scheme(steps):
    """dx/dt = x from t = 1 back to 0 gives x(0) = x(1) / e; each scheme's discrete answer is known too."""
    x1 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    euler = flow.sample(lambda x, t: x, x1, steps, "euler")
    heun = flow.sample(lambda x, t: x, x1, steps, "heun")
    dt = -1.0 / steps
    torch.testing.assert_close(euler, x1 * (1 + dt) ** steps, rtol=1e-5, atol=0)  # grid is float32
    # Heun's factor 1 + dt + dt^2 / 2 on every step but the last, which is Euler
    torch.testing.assert_close(heun, x1 * (1 + dt + dt * dt / 2) ** (steps - 1) * (1 + dt), rtol=1e-5, atol=0)
    exact = x1 / math.e
    err_euler, err_heun = (euler - exact).abs().max(), (heun - exact).abs().max()
    assert err_heun < err_euler / 5


def test_convergence_orders_on_a_linear_ode():
    x1 = torch.ones(1, 1, dtype=torch.float64)
    exact = x1 / math.e
    err = {s: [(flow.sample(lambda x, t: x, x1, n, s) - exact).abs().item() for n in (10, 20, 40)]
           for s in flow.SAMPLERS}
    # Euler is first order: doubling the steps halves the error; Heun at least ~second order
    for a, b in zip(err["euler"], err["euler"][1:]):
        assert 1.8 < a / b < 2.2
    for a, b in zip(err["heun"], err["heun"][1:]):
        assert a / b > 3.5
    assert err["heun"][-1] < err["euler"][-1] / 20


def test_time_dependent_field_with_shifted_grid():
    """dx/dt = 2t on uniform and shifted grids: Euler is the left Riemann sum over the grid, Heun the
    trapezoid rule (exact for a velocity linear in t) except its final Euler step."""
    x1 = torch.zeros(1, 1, dtype=torch.float64)
    for shift in (1.0, 3.0):
        grid = flow.time_grid(6, shift).double()
        heun = flow.sample(lambda x, t: (2 * t).double().view(-1, 1).expand_as(x), x1, 6, "heun", shift)
        euler = flow.sample(lambda x, t: (2 * t).double().view(-1, 1).expand_as(x), x1, 6, "euler", shift)
        dts = grid[1:] - grid[:-1]
        # Heun's trapezoids are exact except the final Euler step, which uses 2 t at its start
        expected_heun = (dts[:-1] * (grid[:-2] + grid[1:-1])).sum() + dts[-1] * 2 * grid[-2]
        torch.testing.assert_close(heun.squeeze(), expected_heun, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(euler.squeeze(), (dts * 2 * grid[:-1]).sum(), rtol=1e-6, atol=1e-6)


# --- seeded decoding with a real (tiny) model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DGAE(DGAE_T(resolution=32)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ADM zero-initialises output layers; give them weights so decoding depends on z
        for p in m.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return m


@pytest.fixture(scope="module")
def latent(model):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        return model.encode(x).latent_dist.mode()


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_decode_is_deterministic_given_a_seed(model, latent, sampler):
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = model.decode(latent, steps=3, sampler=sampler, generator=gen(0))
    b = model.decode(latent, steps=3, sampler=sampler, generator=gen(0))
    c = model.decode(latent, steps=3, sampler=sampler, generator=gen(1))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3


def test_explicit_noise_equals_the_generator_path(model, latent):
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    a = model.decode(latent, steps=3, noise=noise)
    b = model.decode(latent, steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_decode_equals_integrating_the_velocity(model, latent):
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = flow.sample(lambda x, t: model.velocity(x, t, latent), noise, 4, "heun", 2.0).clamp(-1, 1)
    torch.testing.assert_close(model.decode(latent, steps=4, sampler="heun", shift=2.0, noise=noise), ref,
                               rtol=1e-5, atol=1e-5)


def test_decode_is_per_image(model, latent):
    """One image's reconstruction does not depend on what else is in the batch: on the CPU bit for bit (each
    image gets its own network calls, see models.images_per_call), in channels_last as load_model sets it."""
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for net in (model, copy.deepcopy(model).to(memory_format=torch.channels_last)):
        both = net.decode(latent, steps=2, noise=noise)
        one = net.decode(latent[1:], steps=2, noise=noise[1:])
        assert torch.equal(both[1:], one)


def test_sample_reports_each_step():
    seen = []
    flow.sample(lambda x, t: x, torch.ones(2, 1), 4, "heun", on_step=seen.append)
    assert seen == [1, 2, 3, 4]


def test_decode_reports_image_steps(model, latent):
    """The progress callback counts images x steps, for both families, so a bar moves within a batch."""
    reports = []
    model.decode(latent, steps=3, sampler="heun", generator=torch.Generator().manual_seed(0), on_step=reports.append)
    assert sum(reports) == len(latent) * 3 and len(reports) == 3 * len(latent) // images_per_call("cpu", len(latent))
    torch.manual_seed(0)
    sdvae = SDVAE(SDVAE_T(resolution=32)).eval()
    reports.clear()
    sdvae.decode(latent, steps=50, on_step=reports.append)
    assert sum(reports) == len(latent)


def test_decode_rejects_an_unknown_sampler(model, latent):
    with pytest.raises(ValueError, match="unknown sampler"):
        model.decode(latent, steps=2, sampler="dpm")
