"""Flow matching on the straight path x_t = (1 - t) x + t eps: training targets, time grids and ODE samplers.

t = 0 is the data and t = 1 pure noise; the network predicts the velocity v = eps - x, so the one-step estimate
of the clean image is x0' = x_t - t v.
"""
from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("euler", "heun")


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))) * v


def sample_t(n: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times, uniform on [0, 1] as in plain rectified-flow training."""
    return torch.rand(n, device=device, generator=generator)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``steps + 1`` times from 1 down to 0.

    ``shift > 1`` spends more of the budget at high noise (t' = s t / (1 + (s - 1) t), as SD3); 1 is uniform.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.float()


@torch.no_grad()
def sample(velocity: Velocity, noise: torch.Tensor, steps: int, sampler: str = "euler", shift: float = 1.0,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (``noise``) to t = 0 and return x at t = 0.

    Euler costs ``steps`` network calls; Heun (2nd order) costs ``2 * steps - 1``, its last step being Euler
    because the correction would evaluate the network at t = 0 exactly. ``on_step(i)`` is called after step i
    (1 to ``steps``), for progress bars.
    """
    return integrate(velocity, noise, time_grid(steps, shift).tolist(), sampler, on_step)


def integrate(velocity: Velocity, noise: torch.Tensor, grid: list[float], sampler: str = "euler",
              on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """`sample` on an explicit time ``grid`` (host floats from 1 down to 0), with autograd left as the caller has
    it: a distilled student (`dgaetok.distill`) is trained through its few steps."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    x = noise
    n = noise.shape[0]

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new replay of a compiled, CUDA-graphed network
        return velocity(x, noise.new_full((n,), t))

    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:]), 1):
        dt = t_next - t
        d = v(x, t)
        x_next = x + dt * d
        if sampler == "heun" and t_next > 0:
            x_next = x + dt * 0.5 * (d + v(x_next, t_next))
        x = x_next
        if on_step is not None:
            on_step(i)
    return x
