"""Denoising animation: points rasterized onto a pre-rendered background, encoded to H.264 MP4 with PyAV.

The axes never change, so they are drawn once per size (PIL) and every frame is a copy of that background
plus a vectorized splat of the points and a one-line caption: a few milliseconds per frame, no per-frame
figure redraw.
"""

import os
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

LIMIT = 2.5  # fixed axes [-2.5, 2.5] in normalized coordinates: the roll never jumps between frames
BACKGROUND = (255, 255, 255)
POINT = np.array([214, 72, 18], dtype=np.float32)  # the web page's sample colour
POINT_ALPHA = 0.45
HOLD_SECONDS = 1.0


def even(size: int) -> int:
    return size - size % 2  # yuv420p needs even width and height


@lru_cache(maxsize=8)
def background(size: int) -> np.ndarray:
    """[size, size, 3] uint8: frame, grid at integer coordinates, tick labels."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(10, size // 40))
    for v in range(-2, 3):
        p = to_pixels(np.array([[v, v]], dtype=np.float32), size)[0]
        draw.line([(p[0], 0), (p[0], size)], fill=(235, 235, 235) if v else (215, 215, 215))
        draw.line([(0, p[1]), (size, p[1])], fill=(235, 235, 235) if v else (215, 215, 215))
        if v:
            draw.text((p[0] + 3, size - size // 40 - 8), str(v), fill=(150, 150, 150), font=font)
            draw.text((4, p[1] + 2), str(v), fill=(150, 150, 150), font=font)
    draw.rectangle([0, 0, size - 1, size - 1], outline=(190, 190, 190))
    return np.asarray(img).copy()


def to_pixels(points: np.ndarray, size: int) -> np.ndarray:
    """[n, 2] normalized coordinates -> [n, 2] integer (col, row); y grows upwards."""
    scaled = (points + LIMIT) / (2 * LIMIT) * (size - 1)
    cols = np.rint(scaled[:, 0])
    rows = np.rint((size - 1) - scaled[:, 1])
    return np.stack([cols, rows], axis=1).astype(np.int64)


def draw_points(points: np.ndarray, size: int) -> np.ndarray:
    """Background plus points, alpha-composited by how many points land on each pixel (density shows)."""
    radius = max(2, size // 240)
    px = to_pixels(points, size)
    inside = (px[:, 0] >= 0) & (px[:, 0] < size) & (px[:, 1] >= 0) & (px[:, 1] < size)
    px = px[inside]
    counts = np.zeros(size * size, dtype=np.float32)
    for dc in range(radius):
        for dr in range(radius):
            c = np.clip(px[:, 0] + dc, 0, size - 1)
            r = np.clip(px[:, 1] + dr, 0, size - 1)
            counts += np.bincount(r * size + c, minlength=size * size).astype(np.float32)
    alpha = (1 - (1 - POINT_ALPHA) ** counts).reshape(size, size, 1)
    frame = background(size).astype(np.float32) * (1 - alpha) + POINT * alpha
    return frame.astype(np.uint8)


def caption(frame: np.ndarray, text: str) -> np.ndarray:
    img = Image.fromarray(frame)
    size = frame.shape[0]
    font = ImageFont.load_default(size=max(11, size // 30))
    ImageDraw.Draw(img).text((size // 40, size // 60), text, fill=(40, 40, 40), font=font)
    return np.asarray(img)


def frame_captions(sampler: str, timesteps: Sequence[int]) -> list[str]:
    steps = len(timesteps)
    head = [f"{sampler}  ·  noise x_T"]
    return head + [f"{sampler}  ·  step {i + 1}/{steps}  ·  t={t}" for i, t in enumerate(timesteps)]


def _no_check() -> None:
    pass


def render_frames(
    frames: np.ndarray, texts: Sequence[str], size: int, check: Callable[[], None] = _no_check
) -> list[np.ndarray]:
    """check(): called before each frame (deadline, disconnect, shutdown: it raises to stop)."""
    size = even(size)
    images = []
    for f, text in zip(frames, texts, strict=True):
        check()
        images.append(caption(draw_points(f, size), text))
    return images


def encode_mp4(images: list[np.ndarray], fps: int, hold_frames: int, check: Callable[[], None] = _no_check) -> bytes:
    """H.264 yuv420p with the moov atom first (faststart), so browsers can start playing and seek at once.

    faststart rewrites the file after encoding, which PyAV can only do on a real file, not a BytesIO."""
    height, width = images[0].shape[:2]
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        with av.open(path, "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast", "tune": "animation"}
            for image in [*images, *([images[-1]] * hold_frames)]:
                check()
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def animation_mp4(
    frames: np.ndarray,
    sampler: str,
    timesteps: Sequence[int],
    size: int,
    fps: int,
    check: Callable[[], None] = _no_check,
) -> bytes:
    """frames: [steps + 1, n, 2] trajectory; one video frame each, then a hold on the final samples."""
    return captioned_mp4(frames, frame_captions(sampler, timesteps), size, fps, check)


def captioned_mp4(
    frames: np.ndarray, texts: Sequence[str], size: int, fps: int, check: Callable[[], None] = _no_check
) -> bytes:
    """Any sequence of point clouds (denoising or noising), one caption per frame, then a hold on the last.
    check() runs before every frame drawn or encoded: rendering stops there like sampling stops at a step."""
    return encode_mp4(render_frames(frames, texts, size, check), fps, max(1, round(HOLD_SECONDS * fps)), check)
