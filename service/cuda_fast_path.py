"""Sampling on CUDA without per-step launch overhead: a fused kernel, or whole runs replayed as CUDA graphs.

The eager path launches about a dozen small kernels per denoising step, so on a GPU this tiny network is
bound by launches (NOTES.md: 17-20 ms for ddpm@40 at n = 10,000, where the arithmetic takes ~1 ms). Two
ways out, chosen per run:

- "fused": the whole run in one Triton kernel (triton_chain.py), for the folded MLP that training writes and
  the samplers step_coefficients.py describes. Each request is one launch at its own row count: nothing to
  pad or capture.
- "graph": the eager sampler itself captured once per (model, sampler, levels, parameters, precision, row
  bucket) and replayed (graph_cache.py), for any checkpoint. The network runs from the checkpoint's weights
  in plain torch at the configured precision when it is the folded MLP, else the TorchScript module itself.

Randomness stays per request, drawn outside any graph: each request's generator draws one block
[1 + noisy steps, rows, 2] (x_T, then each noisy step's z), in one call whatever its batch-mates, and every
CUDA path (fused, graph, and eager for trajectories, fallbacks and kernel=eager) consumes that block. So a
seed gives the same noise on every path, alone or batched, and the points agree to float rounding
(measured by scripts/cuda_check.py and bench/gpu.py). One draw instead of one per step matters: 40 separate
draws cost more than a whole graph replay. (On CPU the samplers draw per step, as before.)
"""

import dataclasses
import functools
import logging
from collections.abc import Sequence

import torch

from diffusion import step_coefficients
from diffusion.denoiser import Denoiser
from diffusion.folded import FoldedWeights
from diffusion.noise import Sources, Tape
from service import triton_chain
from service.graph_cache import GraphCache

log = logging.getLogger("swissroll")
PRECISIONS = tuple(triton_chain.DOT_PRECISION)  # the service offers fp32, tf32, bf16; fp32_ieee for benchmarks
KERNELS = ("auto", "fused", "graph", "eager")


def draw_noise(sources: Sources, slots: int, device) -> torch.Tensor:
    """[1 + slots, rows, 2]: x_T then one z per noisy step, each source's rows from its own generator."""
    if len(sources) == 1 and sources[0][0] is not None:
        return torch.randn((1 + slots, sources[0][1], 2), generator=sources[0][0], device=device)
    out = torch.zeros((1 + slots, sum(rows for _, rows in sources), 2), device=device)
    start = 0
    for generator, rows in sources:
        if generator is not None:  # None: alignment padding, zeros
            out[:, start : start + rows] = torch.randn((1 + slots, rows, 2), generator=generator, device=device)
        start += rows
    return out


class TorchNet(torch.nn.Module):
    """The folded MLP in plain torch at a chosen precision: capturable, with bf16 weights if asked."""

    def __init__(self, w: FoldedWeights, dtype: torch.dtype):
        super().__init__()
        self.dtype, self.residual = dtype, w.residual
        self.w_x, self.level_bias = w.w_x.to(dtype), w.level_bias.to(dtype)
        self.layers = [(wh.to(dtype), bh.to(dtype)) for wh, bh in zip(w.w_hidden, w.b_hidden, strict=True)]
        self.w_out, self.b_out = w.w_out.to(dtype), w.b_out.to(dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.level_bias[t], x.to(self.dtype), self.w_x)
        for w, b in self.layers:
            y = torch.addmm(b, h, w).relu_()
            h = y.add_(h) if self.residual else y
        return torch.addmm(self.b_out, h, self.w_out).float()


@dataclasses.dataclass
class _GraphRun:
    graph: torch.cuda.CUDAGraph
    xz: torch.Tensor  # static input [1 + slots, bucket, 2]: x_T, then each noisy step's z
    out: torch.Tensor  # static output [bucket, 2]
    nbytes: int


class CudaFastPath:
    """One per loaded model on a CUDA device: every CUDA run goes through `sample`."""

    def __init__(self, model_id: str, denoiser: Denoiser, graphs: GraphCache | None, precision: str, kernel: str):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        self.model_id, self.denoiser, self.graphs, self.precision = model_id, denoiser, graphs, precision
        self.weights = FoldedWeights.from_module(denoiser.net)
        fused_ok = self.weights is not None and triton_chain.fits(self.weights) and triton_chain.available()
        if kernel == "fused" and not fused_ok:
            raise ValueError(
                "kernel=fused needs Triton and a folded-MLP checkpoint of a power-of-two width >= 16; "
                "use auto, graph or eager"
            )
        self.kernel = ("fused" if fused_ok else "graph") if kernel == "auto" else kernel
        if self.kernel == "graph" and graphs is None:
            self.kernel = "eager"
        # With kernel=eager the network stays the checkpoint's own module, as before this fast path existed.
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        net = TorchNet(self.weights, dtype) if self.weights is not None and self.kernel != "eager" else denoiser.net
        self._net_denoiser = dataclasses.replace(denoiser, net=net)
        self._capture_stream = None  # created at the first capture (kernel=eager runs on CPU in tests)

    def describe(self) -> dict:
        return {
            "kernel": self.kernel,
            "precision": self.precision,
            "graphs": self.graphs.stats() if self.graphs is not None else None,
        }

    def noise_slots(self, sampler, ts: Sequence[int], params: dict) -> int:
        """How many noise draws a run makes (the eager sampler's count, in its order)."""
        if step_coefficients.supports(sampler.name):
            return step_coefficients.noise_draws(self._table(sampler.name, tuple(ts), tuple(sorted(params.items()))))
        counter = Tape()  # a sampler without a table: count on one row
        sampler.fn(self.denoiser, torch.zeros((1, 2), device=self.denoiser.device), ts, counter, None, **params)
        return counter.calls

    def eager_state(self, sampler, ts: Sequence[int], params: dict, sources: Sources):
        """(noise source, denoiser) for running the sampler eagerly, e.g. with a callback (trajectories): the noise is
        this path's own draws replayed, x_T first."""
        drawn = draw_noise(sources, self.noise_slots(sampler, ts, params), self.denoiser.device)
        return Tape(drawn), self._net_denoiser

    def sample(self, sampler, ts: Sequence[int], params: dict, sources: Sources) -> torch.Tensor:
        """Points [rows, 2] (on the device) for all sources' rows together."""
        rows = sum(r for _, r in sources)
        slots = self.noise_slots(sampler, ts, params)
        drawn = draw_noise(sources, slots, self.denoiser.device)
        if self.kernel == "fused" and step_coefficients.supports(sampler.name):
            return self._fused(sampler.name, ts, params, drawn)
        if self.kernel in ("fused", "graph") and self.graphs is not None:
            key = (self.model_id, sampler.name, tuple(ts), tuple(sorted(params.items())), self.precision)
            acquired = self.graphs.acquire(key, rows, lambda bucket: self._capture(sampler, ts, params, bucket, slots))
            if acquired is not None:
                run, release = acquired
                try:
                    run.xz[:, :rows] = drawn
                    run.xz[0, rows:] = 0.0  # bucket padding
                    run.graph.replay()
                    return run.out[:rows].clone()  # out of the static buffer before another replay reuses it
                finally:
                    release()
        return sampler.fn(self._net_denoiser, drawn[0], ts, Tape(drawn[1:]), None, **params)

    def _fused(self, name: str, ts, params, drawn: torch.Tensor) -> torch.Tensor:
        levels, slots, table = self._tables(name, tuple(ts), tuple(sorted(params.items())))
        noise = drawn[1:] if drawn.shape[0] > 1 else drawn  # a run without noise reads none: any buffer will do
        x = drawn[0]  # contiguous: the kernel writes x_0 over x_T in place
        triton_chain.launch(self.weights, x, noise, levels, slots, table, self.precision)
        return x

    # One fast path per loaded model, living as long as it: caching on the instance is what is wanted (B019).
    @functools.lru_cache(maxsize=256)  # noqa: B019
    def _table(self, name: str, ts: tuple, params: tuple) -> list[tuple[float, ...]]:
        """The run's coefficient rows (step_coefficients), computed once per sampler, levels and parameters."""
        return step_coefficients.coefficient_table(self.denoiser, name, ts, dict(params))

    @functools.lru_cache(maxsize=256)  # noqa: B019
    def _tables(self, name: str, ts: tuple, params: tuple):
        """The kernel's per-step inputs on the device: levels, noise slots, coefficients (step_coefficients)."""
        device = self.denoiser.device
        table = self._table(name, ts, params)
        slots, next_slot = [], 0
        for row in table:
            slots.append(next_slot if row[2] != 0.0 else -1)
            next_slot += row[2] != 0.0
        return (
            torch.tensor(ts, dtype=torch.int32, device=device),
            torch.tensor(slots, dtype=torch.int32, device=device),
            torch.tensor(table, dtype=torch.float32, device=device),
        )

    def _capture(self, sampler, ts, params, bucket: int, slots: int) -> _GraphRun:
        """Warm up on a side stream (first-call allocations and lazy inits must not be captured), then capture
        one whole run over a static input [1 + slots, bucket, 2]."""
        device = self.denoiser.device
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(device)
        xz = torch.zeros((1 + slots, bucket, 2), device=device)
        before = torch.cuda.memory_reserved(device)
        self._capture_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._capture_stream):
            for _ in range(2):
                sampler.fn(self._net_denoiser, xz[0], ts, Tape(xz[1:]), None, **params)
        torch.cuda.current_stream(device).wait_stream(self._capture_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._capture_stream, capture_error_mode="thread_local"):
            out = sampler.fn(self._net_denoiser, xz[0], ts, Tape(xz[1:]), None, **params)
        nbytes = max(torch.cuda.memory_reserved(device) - before, xz.nbytes)
        log.debug("captured %s@%d for %d rows: %.1f MB", sampler.name, len(ts), bucket, nbytes / 2**20)
        return _GraphRun(graph, xz, out, nbytes)
