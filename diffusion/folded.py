"""The folded MLP that training writes (training/export.py, training/student.py), read from a checkpoint's module
as plain tensors, and the fused CPU forward pass it allows.

h0 = x W_x + level_bias[t]; per block y = relu(h W + b), h = h + y (residual) or y; out = h W_out + b_out.

The CUDA paths (service/triton_chain.py, service/cuda_fast_path.py) compute it from these tensors too. On CPU each
hidden layer is one oneDNN call, linear + bias + ReLU fused (the op inductor emits for it): the checkpoint's
TorchScript module runs MKL's GEMM and then separate bias and ReLU passes over [rows, 64], which took as long as the
GEMM itself. One 5,008-row evaluation of the 64 x 4 network on one core: 2.15 ms as the module, 1.15 ms fused,
agreeing to 1e-6; the default's ddpm@40 at n = 10,000 went from ~95 to ~50 ms (bench/results/speed.md). oneDNN pays
~11 us more per call than MKL, so below ~250 rows per call the module is faster (16 rows: 25 vs 74 us): a lone
n = 100 request takes ~0.5 ms longer (bench/results/load.md: 4-6% less throughput for one client). Which path runs
is chosen per model, never per call: a row's result must not depend on what it is batched with.
SWISSROLL_CPU_NETWORK=module keeps the module (CPU_NETWORKS).

A network whose blocks' weight matrices all hold bfloat16 values (a student trained so, training/student.py) runs
its hidden layers in bfloat16 (float32 accumulation) where the CPU has bf16 dot-product units (AVX512-BF16, AMX):
~13% faster again per request (bench/results/distillation_speed.md). No weight is rounded by it: what changes is
that the hidden activations (each layer's input and output, the residual stream) and the block biases are rounded
to bfloat16 (8 significant bits); the first layer and the head stay float32. Measured on the committed student (10
seeds, n = 50,000): sliced W2 at 2 and 4 evaluations equal to the float32 forward's within 0.3%, where rounding the
weights of a float32-trained network cost ~3% (bench/results/distillation.md, notes).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FoldedWeights:
    """The folded network's tensors (all on the model's device, float32)."""

    w_x: torch.Tensor  # [2, W]
    level_bias: torch.Tensor  # [T, W]
    w_hidden: torch.Tensor  # [D, W, W], each block's weight transposed: h @ w_hidden[l]
    b_hidden: torch.Tensor  # [D, W]
    w_out: torch.Tensor  # [W, 2]
    b_out: torch.Tensor  # [2]
    residual: bool

    @property
    def width(self) -> int:
        return self.w_x.shape[1]

    @property
    def depth(self) -> int:
        return self.w_hidden.shape[0]

    @staticmethod
    def from_module(module) -> "FoldedWeights | None":
        """From a loaded checkpoint module, or None when it is not the folded MLP (e.g. a conditional network)."""
        try:
            net = module.net
            blocks = [block for _, block in net.blocks.named_children()]  # scripted Sequential: no iteration
            residual = {bool(b.residual) for b in blocks}
            weights = FoldedWeights(
                w_x=net.w_x.float().contiguous(),
                level_bias=net.level_bias.float().contiguous(),
                w_hidden=torch.stack([b.linear.weight.t() for b in blocks]).float().contiguous(),
                b_hidden=torch.stack([b.linear.bias for b in blocks]).float().contiguous(),
                w_out=net.out.weight.t().float().contiguous(),
                b_out=net.out.bias.float().contiguous(),
                residual=residual == {True},
            )
        except (AttributeError, RuntimeError, TypeError):
            return None
        w = weights.width
        ok = (
            len(residual) == 1
            and weights.w_x.shape == (2, w)
            and weights.w_hidden.shape[1:] == (w, w)
            and weights.w_out.shape == (w, 2)
        )
        return weights if ok and weights._computes(module) else None

    def _computes(self, module) -> bool:
        # Same names need not mean the same function: check the layout's maths against the module itself.
        levels = self.level_bias.shape[0]
        x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).to(self.w_x.device)
        t = torch.arange(64, device=x.device) % levels
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # compare the functions, not two roundings of them
        try:
            with torch.inference_mode():
                expected = module(x, t)
                got = torch.stack([self.forward(x[i : i + 1], int(t[i]))[0] for i in range(64)])
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-4))

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The same function in plain torch (the folded network's maths), for tests and the fallback."""
        h = x @ self.w_x + self.level_bias[t]
        for w, b in zip(self.w_hidden, self.b_hidden, strict=True):
            y = torch.relu(h @ w + b)
            h = h + y if self.residual else y
        return h @ self.w_out + self.b_out

    @property
    def hidden_in_bfloat16(self) -> bool:
        """Whether every hidden weight is a bfloat16 value: casting them loses nothing."""
        return bool(torch.equal(self.w_hidden.bfloat16().float(), self.w_hidden))


def has_fused_linear() -> bool:
    """Whether this torch build has oneDNN's fused linear (+ bias + ReLU) for CPU tensors."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 dot-product instructions, through which oneDNN runs bfloat16 GEMMs faster than
    float32 ones. Elsewhere torch emulates them, far slower than float32: bfloat16 is never chosen there."""
    if not has_fused_linear():
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


class FusedFoldedNet:
    """(x [B, 2] float32, t: one int level) -> [B, 2] float32: the folded network with each hidden layer one oneDNN
    call (linear, bias and ReLU fused), in float32 or, for bfloat16 hidden weights, in bfloat16 (float32
    accumulation); the first layer and the head in float32. Each row's result depends on that row alone (pinned by
    tests/diffusion/test_folded.py), so batching and block splits stay invariant."""

    def __init__(self, weights: FoldedWeights, module, dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"hidden layers run in float32 or bfloat16, not {dtype}")
        if dtype == torch.bfloat16 and not weights.hidden_in_bfloat16:
            raise ValueError("the network's hidden weights are not bfloat16 values: running them so would round them")
        self.module = module  # the checkpoint module it stands in for (a Denoiser with another net ignores it)
        self.dtype = dtype
        self.w_x, self.level_bias, self.residual = weights.w_x, weights.level_bias, weights.residual
        pairs = zip(weights.w_hidden, weights.b_hidden, strict=True)
        self.hidden = [(w.t().to(dtype).contiguous(), b.to(dtype)) for w, b in pairs]  # [out, in], as nn.Linear
        # [2, W] as nn.Linear holds it: addmm with the [W, 2] matrix took 0.21 ms per 5,008 rows, F.linear 0.055 ms
        self.w_out, self.b_out = weights.w_out.t().contiguous(), weights.b_out

    @property
    def precision(self) -> str:
        """The hidden layers' dtype: "bfloat16" or "float32"."""
        return str(self.dtype).removeprefix("torch.")

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        h = torch.addmm(self.level_bias[t], x, self.w_x).to(self.dtype)  # one level per call: its bias row broadcasts
        for w, b in self.hidden:
            y = _linear_relu(h, w, b)
            h = h.add_(y) if self.residual else y
        return torch.nn.functional.linear(h.float(), self.w_out, self.b_out)


def _linear_relu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # relu(h w^T + b) in one oneDNN call (the op inductor emits for CPU linear + ReLU). As separate matmul, bias and
    # ReLU passes over [rows, 64] (TorchScript's nn.Linear + relu_), the passes took as long as the matmul itself.
    return torch.ops.mkldnn._linear_pointwise(h, w, b, "relu", [], "")


CPU_NETWORKS = {
    "auto": "fused oneDNN layers, in bfloat16 where that rounds no weight and the CPU has bf16 units, else float32",
    "float32": "fused oneDNN layers in float32",
    "module": "the checkpoint's TorchScript module (faster below ~250 rows per call, about half as fast from 1,000)",
}


def cpu_net_for(module, choice: str = "auto") -> FusedFoldedNet | None:
    """What runs a checkpoint module's network on CPU (CPU_NETWORKS): a fused net, or None for the module itself,
    also where fusing does not apply (not the folded MLP, not on CPU, no oneDNN). With "auto" the hidden layers run in
    bfloat16 when no weight would be rounded by it and the CPU has bf16 units; else in float32."""
    if choice not in CPU_NETWORKS:
        raise ValueError(f"unknown CPU network {choice!r}; valid: {', '.join(CPU_NETWORKS)}")
    if choice == "module" or not has_fused_linear():
        return None
    weights = FoldedWeights.from_module(module)
    if weights is None or weights.w_x.device.type != "cpu":
        return None
    use_bf16 = choice == "auto" and weights.hidden_in_bfloat16 and cpu_has_bf16_units()
    net = FusedFoldedNet(weights, module, torch.bfloat16 if use_bf16 else torch.float32)
    return net if _agrees(net, module, weights.level_bias.shape[0]) else None


def _agrees(net: FusedFoldedNet, module, levels: int) -> bool:
    """Whether the fused net computes the module's function on a probe batch: a oneDNN build that lacks or mis-runs
    an op (another platform, another torch) leaves the model on its module instead of failing its requests."""
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    t = [0, levels // 2, levels - 1]
    try:
        with torch.inference_mode():
            got = torch.stack([net(x, level) for level in t])
            expected = torch.stack([module(x, torch.full((256,), level)) for level in t])
    except RuntimeError:
        return False
    # Relative RMS error. float32: the same sums in another order (~1e-7 seen). bfloat16: 8-bit activations through
    # the blocks, 1-2% on the committed student (its sampled distribution unchanged: bench/results/distillation.md).
    # A broken kernel (e.g. a lost ReLU) is off by order 1.
    tolerance = 1e-5 if net.dtype == torch.float32 else 0.1
    return bool((got - expected).norm() <= tolerance * expected.norm())
