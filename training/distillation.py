"""The two distillation methods as training loops over any teacher and any v-prediction student.

Levels are integer indices into the teacher's schedule, noisiest = T-1; CLEAN (-1) is the level after 0, the data
itself (alpha = 1, sigma = 0). Every function works row by row, each row at its own level, so one network call
serves a whole batch. Notation (Salimans & Ho 2022): z_t = alpha_t x + sigma_t eps, v = alpha_t eps - sigma_t x,
so x = alpha_t z_t - sigma_t v, and a DDIM (eta = 0) step s -> e is
z_e = alpha_e x + sigma_e (z_s - alpha_s x) / sigma_s.

- progressive_round: Salimans & Ho 2022, Algorithm 2. The student takes one DDIM step where its teacher took k
  (k = 2 in the paper; the first round here distils the 40-level teacher's second-order solve k = 5 levels at a
  time); rounds halve the steps.
- consistency_distillation: Song et al. 2023, Algorithm 2 (consistency distillation), on the teacher's own levels.
- regress_teacher: knowledge distillation of the denoiser itself (Hinton et al. 2015, on the network output): a
  student of another shape is fitted to the teacher's v on the forward process before either method starts from it.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

CLEAN = -1  # the level after 0: alpha_bar = 1, the data

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z [B, 2], levels [B]) -> predicted x [B, 2]


class Levels:
    """alpha, sigma and lambda = log(alpha / sigma) per level, CLEAN included (as the last entry, index -1)."""

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = tuple(float(a) for a in alphas_cumprod)  # the schedule as a Denoiser takes it
        ab = torch.tensor([*self.alphas_cumprod, 1.0], dtype=torch.float64)
        self.num_timesteps = len(ab) - 1
        self.alpha64, self.sigma64 = ab.sqrt(), (1 - ab).sqrt()
        self.alpha, self.sigma = self.alpha64.float(), self.sigma64.float()
        self.lam = (self.alpha64.log() - self.sigma64.log()).float()  # +inf at CLEAN

    def a(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha[t].unsqueeze(1)

    def s(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma[t].unsqueeze(1)

    def noised(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.a(t) * x + self.s(t) * eps  # q(z_t | x)


def x0_predictor(net: nn.Module, prediction_type: str, levels: Levels) -> X0Fn:
    """A network's prediction of the clean point, per row (Denoiser.predict for rows at different levels)."""

    def x0(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = net(z, t)
        if prediction_type == "v":
            return levels.a(t) * z - levels.s(t) * out
        return (z - levels.s(t) * out) / levels.a(t)

    return x0


def ddim_step(levels: Levels, z, x0, s, e):
    # Song et al. 2021, eq. 12 at eta = 0: z_e = alpha_e x0 + sigma_e eps, eps = (z_s - alpha_s x0) / sigma_s.
    return levels.a(e) * x0 + levels.s(e) * (z - levels.a(s) * x0) / levels.s(s)


def ode_step(x0_fn: X0Fn, levels: Levels, z, s, e, order: int = 2):
    """One step s -> e of the probability-flow ODE. order 1: DDIM. order 2: the exponential integrator with x0
    linear in lambda between the two ends (DPM-Solver++ style, Lu et al. 2022):
        z_e = DDIM(z_s; x0_s) + alpha_e (h - 1 + e^-h) / h * (x0_e - x0_s),   h = lambda_e - lambda_s,
    x0_e evaluated at the DDIM prediction of z_e. A step landing on CLEAN is x0_s (as dpmpp_2m's last step)."""
    x0_s = x0_fn(z, s)
    z_e = ddim_step(levels, z, x0_s, s, e)
    if order == 1:
        return z_e
    # Rows landing on CLEAN keep the first-order step: their correction is masked out. Every row is evaluated so
    # that each network call sees the same shape (a TorchScript teacher re-specializes on new shapes).
    real = (e != CLEAN).unsqueeze(1)
    e_r = e.clamp(min=0)
    x0_e = x0_fn(z_e, e_r)
    h = (levels.lam[e_r] - levels.lam[s]).unsqueeze(1)
    c2 = levels.a(e_r) * (h + torch.expm1(-h)) / h
    return torch.where(real, z_e + c2 * (x0_e - x0_s), z_e)


def progressive_target(levels: Levels, z_s, z_e, s, e):
    """Algorithm 2, line 9: the x~ for which one DDIM step from (z_s, s) lands exactly on the teacher's z_e:
    x~ = (z_e - (sigma_e / sigma_s) z_s) / (alpha_e - (sigma_e / sigma_s) alpha_s)   (= z_e when e is CLEAN)."""
    ratio = levels.s(e) / levels.s(s)
    return (z_e - ratio * z_s) / (levels.a(e) - ratio * levels.a(s))


def v_target(levels: Levels, z, x, t):
    # v = alpha eps - sigma x with eps = (z - alpha x) / sigma  =>  v = (alpha z - x) / sigma.
    return (levels.a(t) * z - x) / levels.s(t)


@dataclass(frozen=True)
class Budget:
    iterations: int = 2000
    batch_size: int = 2048
    lr: float = 3e-4
    final_lr_fraction: float = 0.05


def _descend(optimizer, decay, loss: torch.Tensor) -> float:
    """One optimizer step on `loss` and one step of the learning-rate decay; the loss's value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    decay.step()
    return loss.item()


def _optimizer(student: nn.Module, budget: Budget):
    optimizer = torch.optim.Adam(student.parameters(), lr=budget.lr)
    decay = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, budget.final_lr_fraction, total_iters=budget.iterations)
    return optimizer, decay


def regress_teacher(
    student: nn.Module,
    teacher: nn.Module,
    levels: Levels,
    data: torch.Tensor,
    budget: Budget,
    generator: torch.Generator,
) -> list[float]:
    """Fit `student` (in place) to the teacher's network output: z_t = alpha_t x + sigma_t eps from the data at a
    uniform random level, target teacher(z_t, t) (v). The few-step methods assume a student that already is
    (nearly) its teacher's function, which a copy gives for free and a smaller network has to learn; the target
    is deterministic given z_t, so this converges much faster than training on the noisy eps/v targets. Returns
    the loss per iteration."""
    T = levels.num_timesteps
    optimizer, decay = _optimizer(student, budget)
    losses = []
    for _ in range(budget.iterations):
        x = data[torch.randint(0, data.shape[0], (budget.batch_size,), generator=generator)]
        t = torch.randint(0, T, (budget.batch_size,), generator=generator)
        z = levels.noised(x, t, torch.randn(x.shape, generator=generator))
        with torch.no_grad():
            target = teacher(z, t)
        # The same v-space squared error as the methods below, so the phases optimise one consistent measure.
        loss = nn.functional.mse_loss(student(z, t), target)
        losses.append(_descend(optimizer, decay, loss))
    return losses


def progressive_round(
    student: nn.Module,
    teacher_x0: X0Fn,
    levels: Levels,
    teacher_grid: list[int],
    k: int,
    data: torch.Tensor,
    budget: Budget,
    generator: torch.Generator,
    teacher_order: int = 1,
    swap: bool = False,
) -> list[float]:
    """Train `student` (a v-prediction net, in place) to take one DDIM step over every k steps of its teacher's grid
    (levels noisiest first, ending with CLEAN); its grid is teacher_grid[::k]. `teacher_order` 1 is Algorithm 2's
    DDIM teacher, 2 the second-order solver (ode_step). `swap`: the known pitfall, for tests only: the target
    computed for the level of the teacher's last-but-one step instead of its last. Returns the loss per iteration."""
    if (len(teacher_grid) - 1) % k or teacher_grid[-1] != CLEAN:
        raise ValueError(f"teacher grid of {len(teacher_grid) - 1} steps ending at CLEAN cannot be cut in {k}s")
    grid = torch.tensor(teacher_grid)
    n_student = (len(teacher_grid) - 1) // k
    optimizer, decay = _optimizer(student, budget)
    losses = []
    for _ in range(budget.iterations):
        x = data[torch.randint(0, data.shape[0], (budget.batch_size,), generator=generator)]
        i = torch.randint(0, n_student, (budget.batch_size,), generator=generator)  # 3. the student's step
        s = grid[i * k]
        z_s = levels.noised(x, s, torch.randn(x.shape, generator=generator))  # 5. z_t ~ q(z_t | x)
        with torch.no_grad():
            z = z_s
            for m in range(k):  # 6.-8. k teacher steps (two DDIM steps in the paper)
                z = ode_step(teacher_x0, levels, z, grid[i * k + m], grid[i * k + m + 1], teacher_order)
            e = grid[i * k + k - 1] if swap else grid[i * k + k]
            x_tilde = progressive_target(levels, z_s, z, s, e)  # 9.
        # 10. L = max(SNR, 1)-like weighting: v-space MSE is (1 + SNR) |x - x~|^2.
        loss = nn.functional.mse_loss(student(z_s, s), v_target(levels, z_s, x_tilde, s))
        losses.append(_descend(optimizer, decay, loss))
    return losses


def progressive_distillation(
    student: nn.Module,
    teacher_x0: X0Fn,
    levels: Levels,
    first_steps: int,
    data: torch.Tensor,
    budget: Budget,
    generator: torch.Generator,
    on_round: Callable[[int, nn.Module], None] | None = None,
    swap: bool = False,
    first_budget: Budget | None = None,
) -> nn.Module:
    """Rounds first_steps -> first_steps / 2 -> ... -> 1 (Salimans & Ho 2022, Algorithm 2). Round 0 distils the
    teacher's second-order solve over all T levels into `first_steps` DDIM steps on trailing levels (T must be a
    multiple of first_steps, a power of two); each later round's teacher is the previous student, frozen, taking
    DDIM steps on its grid. on_round(steps, student) sees each finished student. `first_budget` (default: `budget`)
    is round 0's: its iterations cost k second-order teacher steps each, the later rounds' two DDIM steps."""
    T = levels.num_timesteps
    if T % first_steps or first_steps & (first_steps - 1):
        raise ValueError(f"first_steps must be a power of two dividing T = {T}, got {first_steps}")
    teacher_grid, k, order = [*range(T - 1, -1, -1), CLEAN], T // first_steps, 2
    round_budget = first_budget or budget
    while True:
        progressive_round(student, teacher_x0, levels, teacher_grid, k, data, round_budget, generator, order, swap)
        round_budget = budget
        teacher_grid = teacher_grid[::k]
        if on_round is not None:
            on_round(len(teacher_grid) - 1, student)
        if len(teacher_grid) == 2:
            return student
        frozen = copy.deepcopy(student).requires_grad_(False)
        teacher_x0, k, order = x0_predictor(frozen, "v", levels), 2, 1


def consistency_distillation(
    student: nn.Module,
    teacher_x0: X0Fn,
    levels: Levels,
    data: torch.Tensor,
    budget: Budget,
    generator: torch.Generator,
    target_ema: float = 0.95,
) -> list[float]:
    """Song et al. 2023, Algorithm 2 on the teacher's T levels: f(z_n, n) = alpha_n z_n - sigma_n v(z_n, n) is
    trained towards the EMA target network's f at the teacher's ODE step n -> n-1 (second order), with the
    boundary f(z, CLEAN) = z. Trains `student` in place; returns the loss per iteration."""
    target = copy.deepcopy(student).requires_grad_(False)
    f_target = x0_predictor(target, "v", levels)
    T = levels.num_timesteps
    optimizer, decay = _optimizer(student, budget)
    losses = []
    for _ in range(budget.iterations):
        x = data[torch.randint(0, data.shape[0], (budget.batch_size,), generator=generator)]
        n = torch.randint(0, T, (budget.batch_size,), generator=generator)  # 3. n ~ U[1, N-1]
        z_n = levels.noised(x, n, torch.randn(x.shape, generator=generator))  # 4. x_{t_{n+1}} ~ N(x, t^2 I)
        with torch.no_grad():
            e = n - 1  # level 0 steps to CLEAN (-1)
            z_e = ode_step(teacher_x0, levels, z_n, n, e, order=2)  # 5. x^_{t_n}: one teacher ODE step
            clean = (e == CLEAN).unsqueeze(1)
            x_target = torch.where(clean, z_e, f_target(z_e, e.clamp(min=0)))  # f(x, eps) = x at the boundary
        # 6. d(f_theta(x_{t_{n+1}}), f_theta-(x^_{t_n})): squared error, in v units (weight 1 + SNR as above).
        loss = nn.functional.mse_loss(student(z_n, n), v_target(levels, z_n, x_target, n))
        losses.append(_descend(optimizer, decay, loss))
        with torch.no_grad():  # 7. theta- <- stopgrad(mu theta- + (1 - mu) theta)
            for p_t, p in zip(target.parameters(), student.parameters(), strict=True):
                p_t.lerp_(p, 1 - target_ema)
    return losses


def ode_map(x0_fn: X0Fn, levels: Levels, z: torch.Tensor, path: list[int], order: int = 2) -> torch.Tensor:
    """The teacher's ODE solve along `path` (levels noisiest first, ending at CLEAN), every row alike."""
    for s, e in zip(path, path[1:], strict=False):
        rows = z.shape[0]
        z = ode_step(x0_fn, levels, z, torch.full((rows,), s), torch.full((rows,), e), order)
    return z
