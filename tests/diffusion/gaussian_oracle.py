"""Gaussian data N(mu, Sigma): the optimal denoiser is known in closed form, so samplers can be checked exactly."""

import torch

from diffusion.denoiser import Denoiser
from diffusion.noise import forbidden
from diffusion.samplers import timesteps

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)


class OptimalNet(torch.nn.Module):
    """E[eps | x_t] (or E[v | x_t]) for x_0 ~ N(mu, Sigma): x_t ~ N(alpha mu, alpha^2 Sigma + sigma^2 I), and
    Cov(eps, x_t) = sigma I, so E[eps | x_t] = sigma C_t^{-1} (x_t - alpha mu)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", mu=MU, cov=SIGMA):
        super().__init__()
        ab = alphas_cumprod.to(torch.float64)
        self.alpha, self.sigma = ab.sqrt(), (1 - ab).sqrt()
        self.mu, self.prediction_type = mu, prediction_type
        # C_t^{-1} for every level, once: forward is then one batched 2x2 product per point.
        cov_t = ab[:, None, None] * cov + (1 - ab)[:, None, None] * torch.eye(2, dtype=torch.float64)
        self.cov_inv = torch.linalg.inv(cov_t)
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        alpha, sigma = self.alpha[t].unsqueeze(1), self.sigma[t].unsqueeze(1)
        x64 = x.to(torch.float64)
        eps = sigma * torch.einsum("bij,bj->bi", self.cov_inv[t], x64 - alpha * self.mu)
        if self.prediction_type == "epsilon":
            return eps.to(x.dtype)
        x0 = (x64 - sigma * eps) / alpha
        return (alpha * eps - sigma * x0).to(x.dtype)


def oracle(alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> Denoiser:
    return Denoiser(OptimalNet(alphas_cumprod, prediction_type), tuple(alphas_cumprod.tolist()), prediction_type)


def exact_moments(fn, denoiser: Denoiser, steps: int, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a *deterministic* sampler's output for x_T ~ N(0, I), without sampling error.

    With the optimal denoiser of Gaussian data every update is affine in x, so out(x_T) = A x_T + c:
    three evaluations give c and A, hence mean c and covariance A A^T exactly (in float64)."""
    probes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = fn(
        denoiser,
        probes,
        timesteps(denoiser.num_timesteps, steps),
        forbidden("the oracle needs ODE samplers"),
        None,
        **params,
    )
    c = out[0]
    a = torch.stack([out[1] - c, out[2] - c], dim=1)
    return c, a @ a.T


def empirical_moments(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = points.to(torch.float64)
    return x.mean(0), torch.cov(x.T)
