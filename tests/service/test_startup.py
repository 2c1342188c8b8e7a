"""Start-up: a bad checkpoint or setting stops the process with one line and a non-zero exit code."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from bench.live_server import REPO
from diffusion.checkpoint import CheckpointError, load_model
from tests.utils.checkpoints import write_tiny_checkpoint


def run_service(tmp_path, **env):
    full_env = {**os.environ, "SWISSROLL_PORT": "1", **env}  # never reaches binding: start-up must fail first
    return subprocess.run(
        [sys.executable, "-m", "service"], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60
    )


def assert_one_line_failure(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope.pt"
    assert_one_line_failure(run_service(tmp_path, SWISSROLL_CHECKPOINT=str(missing)), str(missing), "file not found")


def test_truncated_checkpoint(tmp_path, tiny_checkpoint):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(tiny_checkpoint.read_bytes()[:2000])
    assert_one_line_failure(run_service(tmp_path, SWISSROLL_CHECKPOINT=str(bad)), str(bad), "truncated or corrupt")


def test_garbage_checkpoint(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a model" * 100)
    assert_one_line_failure(run_service(tmp_path, SWISSROLL_CHECKPOINT=str(bad)), str(bad))


def test_invalid_setting(tmp_path):
    assert_one_line_failure(run_service(tmp_path, SWISSROLL_DEVICE="tpu"), "SWISSROLL_DEVICE")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    ckpt = REPO / "checkpoints" / "swissroll.pt"
    assert_one_line_failure(
        run_service(tmp_path, SWISSROLL_CHECKPOINT=str(ckpt), SWISSROLL_DEVICE="cuda"), "CUDA is not available"
    )


# --- the contract checks themselves, in-process ----------------------------------------------------------------


def edit_metadata(path, edit) -> None:
    """Rewrite metadata.json inside a checkpoint archive: edit(dict) -> dict."""
    with zipfile.ZipFile(path) as z:
        items = {i.filename: z.read(i.filename) for i in z.infolist()}
    name = next(n for n in items if n.endswith("extra/metadata.json"))
    items[name] = json.dumps(edit(json.loads(items[name]))).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in items.items():
            z.writestr(n, data)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: {k: v for k, v in m.items() if k != "training"}, "lacks training"),
        (lambda m: {**m, "prediction_type": "sample"}, "prediction_type 'sample'"),
        (lambda m: {**m, "num_timesteps": 12}, r"float64 of shape \[12\]"),
        (lambda m: {**m, "format_version": 99}, "format_version 99 unsupported"),
        (lambda m: {**m, "tuned_timesteps": [9, 5]}, "tuned_timesteps must be an object"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": [9, 5]}}, r"tuned_timesteps\['ddim'\] must be an object"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"2": [8, 5]}}}, r"from 9 to >= 0, got \[8, 5\]"),  # not T-1
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"3": [9, 5, 5]}}}, "strictly decreasing"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"3": [9, 5]}}}, "must list 3 levels"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"2": [9, -1]}}}, r"got \[9, -1\]"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"2": [9, 2.5]}}}, r"got \[9, 2.5\]"),
    ],
)
def test_contract_violations_are_named(tmp_path, edit, problem):
    path = write_tiny_checkpoint(tmp_path / "c.pt")
    edit_metadata(path, edit)
    with pytest.raises(CheckpointError, match=problem):
        load_model(path, torch.device("cpu"))


def test_tuned_timesteps_of_unknown_samplers_are_skipped(tmp_path):
    # A newer trainer may tune samplers this service lacks: the checkpoint still loads, with what it can use.
    path = write_tiny_checkpoint(tmp_path / "c.pt", tuned_timesteps={"euler": {"2": [9, 0]}, "ddim": {"2": [9, 3]}})
    assert load_model(path, torch.device("cpu")).denoiser.tuned_timesteps == {"ddim": {2: (9, 3)}}


def test_committed_checkpoint_loads(tmp_path):
    model = load_model(REPO / "checkpoints" / "swissroll.pt", torch.device("cpu"))
    assert model.denoiser.num_timesteps == 40
    assert model.metadata["prediction_type"] in ("epsilon", "v")
    assert len(model.id) == 64
    # Training tunes the few-step schedules: the default fast setting (dpmpp_2m, 10 steps) uses one.
    assert 10 in model.denoiser.tuned_timesteps["dpmpp_2m"]
