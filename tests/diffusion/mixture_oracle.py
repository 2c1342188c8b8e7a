"""A labelled mixture of Gaussians: the optimal conditional and unconditional denoisers in closed form.

Component k (label LABELS[k], weight WEIGHTS[k]) is N(MEANS[k], COV), one covariance for all. At level t,
x_t | k ~ N(alpha mu_k, C_t) with C_t = alpha^2 COV + sigma^2 I, so
    E[eps | x_t, k] = sigma C_t^{-1} (x_t - alpha mu_k)                     (the conditional denoiser)
    E[eps | x_t]    = sum_k r_k(x_t) E[eps | x_t, k],  r_k ∝ w_k N(x_t; alpha mu_k, C_t)   (the unconditional one)
"""

import torch

LABELS = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)  # the condition c of each component
MEANS = torch.tensor([[-2.0, 0.0], [0.0, 1.5], [2.0, 0.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
COV = torch.tensor([[0.09, 0.03], [0.03, 0.06]], dtype=torch.float64)
NULL = -1.0


class MixtureNet(torch.nn.Module):
    """forward(x, t, c) -> E[eps | x_t, c]: c = LABELS[k] gives component k, c = NULL the whole mixture. With
    `null_mean` set, c = NULL gives instead the Gaussian N(null_mean, COV) (an exact reference for guidance)."""

    def __init__(self, alphas_cumprod: torch.Tensor, null_mean: torch.Tensor | None = None):
        super().__init__()
        ab = alphas_cumprod.to(torch.float64)
        self.alpha, self.sigma = ab.sqrt(), (1 - ab).sqrt()
        cov_t = ab[:, None, None] * COV + (1 - ab)[:, None, None] * torch.eye(2, dtype=torch.float64)
        self.cov_inv = torch.linalg.inv(cov_t)
        self.null_mean = null_mean

    def _eps(self, x, t, mean):  # sigma C_t^{-1} (x - alpha mu), per row
        alpha, sigma = self.alpha[t].unsqueeze(1), self.sigma[t].unsqueeze(1)
        return sigma * torch.einsum("bij,bj->bi", self.cov_inv[t], x - alpha * mean)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x64, c64 = x.to(torch.float64), c.to(torch.float64)
        per_k = torch.stack([self._eps(x64, t, m) for m in MEANS])  # [K, B, 2]
        # Responsibilities at level t: log w_k - 1/2 (x - alpha mu_k)^T C_t^{-1} (x - alpha mu_k); C_t is shared.
        alpha = self.alpha[t].unsqueeze(1)
        d = torch.stack([x64 - alpha * m for m in MEANS])  # [K, B, 2]
        logits = WEIGHTS.log()[:, None] - 0.5 * torch.einsum("kbi,bij,kbj->kb", d, self.cov_inv[t], d)
        mixture = (logits.softmax(0).unsqueeze(2) * per_k).sum(0)
        null = (c64 == NULL).unsqueeze(1)
        k = (c64.unsqueeze(1) - LABELS).abs().argmin(1)  # the component a label names
        conditional = per_k[k, torch.arange(x.shape[0])]
        if self.null_mean is not None:
            mixture = self._eps(x64, t, self.null_mean)
        return torch.where(null, mixture, conditional).to(x.dtype)


def mixture_moments() -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the mixture: sum w_k mu_k and COV + sum w_k (mu_k - m)(mu_k - m)^T."""
    mean = WEIGHTS @ MEANS
    d = MEANS - mean
    return mean, COV + (WEIGHTS[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)


def exact_mixture_draws(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points drawn from the mixture itself and their components (for the sampling error of its statistics)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return MEANS[k] + z @ torch.linalg.cholesky(COV).T, k


def nearest_component(points: torch.Tensor) -> torch.Tensor:
    """The component of largest posterior at t = 0 (Mahalanobis distance with the shared COV, plus log weight)."""
    d = points.to(torch.float64).unsqueeze(0) - MEANS.unsqueeze(1)  # [K, B, 2]
    logits = WEIGHTS.log()[:, None] - 0.5 * torch.einsum("kbi,ij,kbj->kb", d, torch.linalg.inv(COV), d)
    return logits.argmax(0)
