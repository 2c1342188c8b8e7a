"""gzip of the service's JSON bodies: zlib (Starlette's GZipMiddleware) against ISA-L (service/compression.py), level
1 both, on one core: milliseconds to compress, bytes out, and milliseconds for the stdlib to inflate the result.
Bodies: /sample's JSON at n = 10,000 and 100,000 (full float32 points, as the route writes them) and /trajectory's
at n = 5,000 over 40 steps (3 decimals).

    python -m bench.compression   # writes bench/results/compression.{json,md}
"""

import json
import platform
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from isal import isal_zlib

from bench.live_server import REPO
from diffusion.checkpoint import load_model
from diffusion.samplers import sample
from service.encoding import compact, json_response

RESULTS = Path(__file__).parent / "results"
REPS = 50


def bodies() -> dict[str, bytes]:
    model = load_model(REPO / "checkpoints/swissroll.pt", torch.device("cpu"))
    out = {}
    for n in (10_000, 100_000):
        points = sample(model.denoiser, "ddpm", n, torch.Generator().manual_seed(0), 40).numpy()
        out[f"/sample n={n:,}"] = json_response({"points": points}).body
    frames = []
    sample(model.denoiser, "ddpm", 5_000, torch.Generator().manual_seed(0), 40, callback=lambda s: frames.append(s.x))
    trajectory = compact(np.stack([f.numpy() for f in frames]))
    out["/trajectory n=5,000, 40 steps"] = json_response({"frames": trajectory}).body
    return out


def gzip_with(module, body: bytes) -> bytes:
    compressor = module.compressobj(1, module.DEFLATED, 16 + module.MAX_WBITS)  # as the middleware makes it
    return compressor.compress(body) + compressor.flush()


def median_ms(fn, body: bytes) -> float:
    fn(body)
    times = []
    for _ in range(REPS):
        began = time.perf_counter()
        fn(body)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, body in bodies().items():
        row = {"body": name, "bytes": len(body)}
        for label, module in (("zlib", zlib), ("isal", isal_zlib)):
            packed = gzip_with(module, body)
            assert zlib.decompress(packed, 16 + zlib.MAX_WBITS) == body  # a gzip stream the stdlib inflates
            row[label] = {
                "compress_ms": median_ms(lambda b, m=module: gzip_with(m, b), body),
                "bytes": len(packed),
                "inflate_ms": median_ms(lambda _b, p=packed: zlib.decompress(p, 16 + zlib.MAX_WBITS), body),
            }
        rows.append(row)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "reps": REPS, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# gzip level 1 of the service's JSON bodies: zlib vs ISA-L (service/compression.py), one core",
        "",
        f"Measured {results['date']} UTC on {results['machine']}, median of {REPS}; inflating is the stdlib's zlib "
        "(what a Python client does; curl and browsers use zlib too).",
        "",
        "| body | JSON | zlib: ms, out (ratio), inflate ms | ISA-L: ms, out (ratio), inflate ms | ISA-L speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            f"{r[k]['compress_ms']:.2f} ms, {r[k]['bytes'] / 1e3:,.0f} kB ({r['bytes'] / r[k]['bytes']:.2f}x), "
            f"{r[k]['inflate_ms']:.2f} ms"
            for k in ("zlib", "isal")
        ]
        speedup = r["zlib"]["compress_ms"] / r["isal"]["compress_ms"]
        lines.append(f"| {r['body']} | {r['bytes'] / 1e3:,.0f} kB | {cells[0]} | {cells[1]} | {speedup:.1f}x |")
    (RESULTS / "compression.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
