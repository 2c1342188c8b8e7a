"""A whole sampling run in one CUDA kernel: each program keeps its rows on chip through every step.

Rows never interact, so a program takes BLOCK rows of x_T and runs all steps for them: the network (input
layer folded with the level's bias, residual ReLU blocks as tensor-core dots, the 64 -> 2 output) and the
sampler's linear update from step_coefficients.py. Per step only the noise (8 bytes a row) is read from
memory; the 64-wide activations never leave registers and shared memory. Eager PyTorch instead writes and
reads every [n, 64] activation per layer and launches ~12 kernels per step, which at large n makes the
element-wise work between GEMMs most of the time (NOTES.md).

Only the folded MLP that training/export.py writes is supported (diffusion/folded.py, at a width `fits` takes);
other checkpoints run through the graph-captured eager path. Triton is imported lazily: the CPU service
and its tests do not need it.
"""

import torch

from diffusion.folded import FoldedWeights

# Dot-product precision per service precision: "ieee" is exact fp32 FMA (no tensor cores); "tf32x3" splits
# each fp32 operand into three TF32 parts on the tensor cores, fp32-level accuracy at a fraction of the cost.
DOT_PRECISION = {"fp32": "tf32x3", "fp32_ieee": "ieee", "tf32": "tf32", "bf16": "bf16"}


def fits(weights: FoldedWeights) -> bool:
    """Whether the kernel computes this network: tl.arange needs a power-of-two width, tensor-core dots >= 16."""
    w = weights.width
    return w >= 16 and w & (w - 1) == 0


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sample_chain(
        x_ptr,  # [N, 2] f32: x_T in, x_0 out
        noise_ptr,  # [K, N, 2] f32: the run's noise, one slot per noisy step
        level_ptr,  # [S] i32: the level evaluated at each step
        slot_ptr,  # [S] i32: each step's noise slot, -1 for none
        coef_ptr,  # [S, 6] f32: cx, co, cz, cp, p0x, p0o (step_coefficients.py)
        wx_ptr,
        lb_ptr,
        wh_ptr,
        bh_ptr,
        wo_ptr,
        bo_ptr,
        N,
        S,
        W: tl.constexpr,
        DEPTH: tl.constexpr,
        RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < N
        cols = tl.arange(0, W)
        xa = tl.load(x_ptr + rows * 2, mask=mask, other=0.0)
        xb = tl.load(x_ptr + rows * 2 + 1, mask=mask, other=0.0)
        pa = tl.zeros([BLOCK], dtype=tl.float32)  # x0 of the previous step (multistep samplers)
        pb = tl.zeros([BLOCK], dtype=tl.float32)
        wx0 = tl.load(wx_ptr + cols)
        wx1 = tl.load(wx_ptr + W + cols)
        wo0 = tl.load(wo_ptr + cols * 2)
        wo1 = tl.load(wo_ptr + cols * 2 + 1)
        bo0 = tl.load(bo_ptr)
        bo1 = tl.load(bo_ptr + 1)
        for i in range(S):
            level = tl.load(level_ptr + i)
            # Input layer: x has 2 columns, so x W_x is two broadcast multiply-adds, plus the level's bias.
            h = xa[:, None] * wx0[None, :] + xb[:, None] * wx1[None, :] + tl.load(lb_ptr + level * W + cols)[None, :]
            for layer in tl.static_range(DEPTH):
                w = tl.load(wh_ptr + layer * W * W + cols[:, None] * W + cols[None, :])
                b = tl.load(bh_ptr + layer * W + cols)
                if PRECISION == "bf16":
                    y = tl.dot(h.to(tl.bfloat16), w.to(tl.bfloat16), out_dtype=tl.float32)
                else:
                    y = tl.dot(h, w, input_precision=PRECISION)
                y = tl.maximum(y + b[None, :], 0.0)
                if RESIDUAL:  # noqa: SIM108 (a statement-level constexpr branch is resolved at compile time)
                    h = h + y
                else:
                    h = y
            oa = tl.sum(h * wo0[None, :], axis=1) + bo0
            ob = tl.sum(h * wo1[None, :], axis=1) + bo1
            cx = tl.load(coef_ptr + i * 6)
            co = tl.load(coef_ptr + i * 6 + 1)
            cz = tl.load(coef_ptr + i * 6 + 2)
            cp = tl.load(coef_ptr + i * 6 + 3)
            p0x = tl.load(coef_ptr + i * 6 + 4)
            p0o = tl.load(coef_ptr + i * 6 + 5)
            slot = tl.load(slot_ptr + i)
            noisy = mask & ((rows * 0 + slot) >= 0)  # a step without noise reads nothing
            za = tl.load(noise_ptr + slot * N * 2 + rows * 2, mask=noisy, other=0.0)
            zb = tl.load(noise_ptr + slot * N * 2 + rows * 2 + 1, mask=noisy, other=0.0)
            x0a = p0x * xa + p0o * oa
            x0b = p0x * xb + p0o * ob
            xa = cx * xa + co * oa + cz * za + cp * pa
            xb = cx * xb + co * ob + cz * zb + cp * pb
            pa = x0a
            pb = x0b
        tl.store(x_ptr + rows * 2, xa, mask=mask)
        tl.store(x_ptr + rows * 2 + 1, xb, mask=mask)

    return sample_chain


def block_rows(n: int) -> int:
    # Enough programs to fill the card at small n (132 SMs on an H100/H200), big tiles at large n.
    return 32 if n <= 8192 else 64 if n <= 65536 else 128


def launch(
    weights: FoldedWeights,
    x: torch.Tensor,
    noise: torch.Tensor,
    levels: torch.Tensor,
    slots: torch.Tensor,
    coefficients: torch.Tensor,
    precision: str = "fp32",
) -> torch.Tensor:
    """Runs the chain in place on x [N, 2] (contiguous float32); returns x. No host synchronization."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    n = x.shape[0]
    block = block_rows(n)
    _kernel[((n + block - 1) // block,)](
        x,
        noise,
        levels,
        slots,
        coefficients,
        weights.w_x,
        weights.level_bias,
        weights.w_hidden,
        weights.b_hidden,
        weights.w_out,
        weights.b_out,
        n,
        levels.shape[0],
        W=weights.width,
        DEPTH=weights.depth,
        RESIDUAL=weights.residual,
        BLOCK=block,
        PRECISION=DOT_PRECISION[precision],
        num_warps=4,
    )
    return x
