"""Time to produce the denoising MP4 (40 steps, 10,000 points, 480 px): ours (points rasterized onto a
pre-rendered background, PyAV/libx264), cold and cached over HTTP, against the original notebook's approach
(matplotlib FuncAnimation redrawing a scatter per frame, saved with the ffmpeg writer), on the same trajectory.

    python -m bench.animation        # needs the ffmpeg binary for the original's row; writes bench/results/animation.md
"""

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib
import torch

from bench.live_server import LiveServer
from diffusion.checkpoint import load_model
from diffusion.cpus import threads_from_env
from diffusion.samplers import SAMPLERS, timesteps
from service.compute import Job
from service.jobs import Plan, run_plan
from service.render import animation_mp4

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.animation import FFMpegWriter, FuncAnimation  # noqa: E402

RESULTS = Path(__file__).parent / "results"
N, STEPS, SIZE, FPS = 10_000, 40, 480, 10


def original_approach(frames, path: Path) -> None:
    """As in the notebook: a scatter artist updated per frame, rendered by matplotlib, piped to ffmpeg."""
    fig, ax = plt.subplots(figsize=(SIZE / 100, SIZE / 100), dpi=100)
    ax.set(xlim=(-2.5, 2.5), ylim=(-2.5, 2.5))
    scat = ax.scatter(frames[0][:, 0], frames[0][:, 1], s=1, alpha=0.5)

    def update(i):
        scat.set_offsets(frames[min(i, len(frames) - 1)])
        ax.set_title(f"step {i}")
        return (scat,)

    anim = FuncAnimation(fig, update, frames=len(frames) + FPS, blit=False)
    anim.save(path, writer=FFMpegWriter(fps=FPS, codec="libx264", extra_args=["-pix_fmt", "yuv420p"]))
    plt.close(fig)


def timed(fn, reps=3):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    torch.set_num_threads(threads_from_env().threads)  # as the server and training choose them
    model = load_model("checkpoints/swissroll.pt", torch.device("cpu"))
    ts = timesteps(model.denoiser.num_timesteps, STEPS)
    plan = Plan(SAMPLERS["ddpm"], N, tuple(ts), "trailing", 0, {})
    import threading

    _, frames, _ = run_plan(model, plan, Job(float("inf"), threading.Event()), record=True)
    rows = {"ours, render + encode (in-process)": timed(lambda: animation_mp4(frames, "ddpm", ts, SIZE, FPS))}
    if shutil.which("ffmpeg"):
        with tempfile.TemporaryDirectory() as tmp:
            rows["original: matplotlib FuncAnimation + ffmpeg writer"] = timed(
                lambda: original_approach(frames, Path(tmp) / "orig.mp4")
            )
    with LiveServer() as server, httpx.Client(timeout=120) as client:
        url = f"{server.url}/animation?n={N}&steps={STEPS}&size={SIZE}&fps={FPS}"
        cold = []
        for seed in (1, 2, 3):
            t0 = time.perf_counter()
            client.get(f"{url}&seed={seed}").raise_for_status()
            cold.append(time.perf_counter() - t0)
        rows["ours over HTTP, cold (sample 40 steps + render + encode)"] = statistics.median(cold)
        rows["ours over HTTP, cached"] = timed(lambda: client.get(f"{url}&seed=1").raise_for_status(), reps=10)
    lines = [
        f"# Animation: {STEPS} steps, {N:,} points, {SIZE} px, {FPS} fps (medians)",
        "",
        "| approach | seconds |",
        "|---|---:|",
    ] + [f"| {k} | {v:.3f} |" for k, v in rows.items()]
    if "original: matplotlib FuncAnimation + ffmpeg writer" not in rows:
        lines.append("\n(ffmpeg not installed: the original's row was not measured)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "animation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
