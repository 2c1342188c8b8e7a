"""Start-up: a bad checkpoint or setting stops the process with one line and a non-zero exit code."""

import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from bench.live_server import REPO
from diffusion.checkpoint import CheckpointError, load_model
from tests.utils.checkpoints import edit_metadata, write_tiny_checkpoint


def run_service(tmp_path, **env):
    # never reaches binding: start-up must fail first. PYTHONPATH: this checkout's code, whatever is installed.
    full_env = {**os.environ, "SWISSROLL_PORT": "1", "PYTHONPATH": str(REPO), **env}
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


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: {k: v for k, v in m.items() if k != "training"}, "lacks training"),
        (lambda m: {**m, "prediction_type": "sample"}, "prediction_type 'sample'"),
        (lambda m: {**m, "num_timesteps": 12}, r"float64 of shape \[12\]"),
        (lambda m: {**m, "format_version": 99}, "format_version 99 unsupported"),
        (lambda m: {**m, "tuned_timesteps": [9, 5]}, r"tuned_timesteps: Input should be an object, got \[9, 5\]"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": [9, 5]}}, "tuned_timesteps.ddim: Input should be an object"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"2": [8, 5]}}}, r"from 9 to >= 0, got \[8, 5\]"),  # not T-1
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"3": [9, 5, 5]}}}, "strictly decreasing"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"3": [9, 5]}}}, "must list 3 levels"),
        (lambda m: {**m, "tuned_timesteps": {"ddim": {"2": [9, -1]}}}, r"got \[9, -1\]"),
        (
            lambda m: {**m, "tuned_timesteps": {"ddim": {"2": [9, 2.5]}}},
            r"tuned_timesteps.ddim.2.1: .*integer, got 2.5",
        ),
        (lambda m: {**m, "num_timesteps": "40"}, "num_timesteps: Input should be a valid integer"),
        (lambda m: {**m, "data": {"mean": [0, 0], "std": [1, 0]}}, r"data.std.1: Input should be greater than 0"),
        (lambda m: {**m, "data": {"mean": [0], "std": [1, 1]}}, "data.mean"),
        (lambda m: {**m, "created_at": 5}, "created_at: Input should be a valid string"),
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


# --- issue 18: hostile or careless checkpoint metadata and settings ------------------------------------------------


def replace_metadata_text(path, text: str) -> None:
    """metadata.json replaced by arbitrary text (not necessarily an object)."""
    with zipfile.ZipFile(path) as z:
        items = {i.filename: z.read(i.filename) for i in z.infolist()}
    name = next(n for n in items if n.endswith("extra/metadata.json"))
    items[name] = text.encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in items.items():
            z.writestr(n, data)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("null", "must be a JSON object, got NoneType"),
        ("3", "must be a JSON object, got int"),
        ('"metadata"', "must be a JSON object, got str"),
        ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
        ('{"a": ' * 1000 + "1" + "}" * 1000, "nests deeper than 64 levels"),
    ],
    ids=["null", "number", "string", "deep-array", "deep-object"],
)
def test_metadata_of_the_wrong_type_is_one_line(tmp_path, text, problem):
    path = write_tiny_checkpoint(tmp_path / "c.pt")
    replace_metadata_text(path, text)
    assert_one_line_failure(run_service(tmp_path, SWISSROLL_CHECKPOINT=str(path)), str(path), problem)


@pytest.mark.parametrize(
    "quality, problem",
    [
        ("good", "quality: Input should be an object"),
        (None, "quality: Input should be an object"),
        ({"samplers": ["ddpm"]}, "quality.samplers: Input should be an object"),
        ({"samplers": {"ddpm": 1.2}}, "quality.samplers.ddpm: Input should be an object"),
        ({"samplers": {"ddpm": {"sliced_w2": "low"}}}, "quality.samplers.ddpm.sliced_w2"),
    ],
)
def test_malformed_quality_is_refused_at_load(tmp_path, quality, problem):
    path = write_tiny_checkpoint(tmp_path / "c.pt", quality=quality)
    with pytest.raises(CheckpointError, match=problem):
        load_model(path, torch.device("cpu"))


def test_unknown_metadata_fields_are_allowed(tmp_path):
    # Newer trainers may add fields, at the top and inside objects (checkpoints/README.md).
    path = write_tiny_checkpoint(
        tmp_path / "c.pt", future_field={"x": 1}, quality={"samplers": {"ddpm": {"new_metric": 3}}, "extra": True}
    )
    model = load_model(path, torch.device("cpu"))
    assert model.metadata["future_field"] == {"x": 1}


def test_readme_contract_matches_the_schema():
    from diffusion.checkpoint_schema import CheckpointMetadata

    readme = (REPO / "checkpoints" / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (yes|no) \| (\w+) \|", readme, re.M)
    documented = {name: (required == "yes", kind) for name, required, kind in rows}
    fields = CheckpointMetadata.model_fields
    assert set(documented) == set(fields), "checkpoints/README.md's table and the schema name different keys"
    for name, (required, _kind) in documented.items():
        assert fields[name].is_required() == required, name
    # Newer trainers may add fields: extra ones are allowed, as the README says.
    assert CheckpointMetadata.model_config["extra"] == "allow" and "newer trainers may add" in readme


def test_api_keys_set_but_empty_refuse_to_start(tmp_path):
    for value in (",", " ", " , ,"):
        assert_one_line_failure(run_service(tmp_path, SWISSROLL_API_KEYS=value), "SWISSROLL_API_KEYS", "holds no key")


def test_mistyped_setting_is_named_with_the_closest_one(tmp_path):
    # Start-up then fails on the missing checkpoint (no port is bound): the warning comes first, on its own line.
    result = run_service(tmp_path, SWISSROLL_MAX_QUEU="4", SWISSROLL_CHECKPOINT=str(tmp_path / "none.pt"))
    assert result.returncode != 0
    assert "unknown setting SWISSROLL_MAX_QUEU ignored; did you mean SWISSROLL_MAX_QUEUE?" in result.stderr
