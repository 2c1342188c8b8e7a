"""A distilled checkpoint (format_version 2, a `distillation` object): validated at load, and served only with the
sampler and step counts it was made for (diffusion/samplers.py's resolve functions)."""

import pytest
import torch

from diffusion.checkpoint import CheckpointError, load_model, read_archive
from diffusion.checkpoint_schema import SUPPORTED_FORMAT_VERSIONS, format_version_for
from diffusion.samplers import SamplerError, sample
from tests.utils.checkpoints import edit_metadata, write_tiny_checkpoint

TEACHER = "ab" * 32  # a sha256


def distillation(**overrides):
    return {
        "teacher": TEACHER,
        "method": "consistency",
        "samplers": {
            "consistency": {
                "1": {"levels": [9], "sliced_w2": 0.02},
                "2": {"levels": [9, 4], "sliced_w2": 0.015},
                "4": {"levels": [9, 6, 3, 1]},
            }
        },
        "default": {"sampler": "consistency", "steps": 2},
        **overrides,
    }


def write(path, **overrides):
    return write_tiny_checkpoint(path, distillation=distillation(**overrides), tuned_timesteps={})


@pytest.fixture
def student(tmp_path):
    return load_model(write(tmp_path / "s.pt"), torch.device("cpu"))


def test_versions_one_and_two_are_read_and_a_file_declares_what_it_uses(tmp_path):
    assert SUPPORTED_FORMAT_VERSIONS == (1, 2)
    assert format_version_for({"quality": {}}) == 1 and format_version_for({"distillation": {}}) == 2
    _, plain = read_archive(write_tiny_checkpoint(tmp_path / "plain.pt"))
    _, distilled = read_archive(write(tmp_path / "s.pt"))
    assert plain["format_version"] == 1 and distilled["format_version"] == 2


def test_a_distilled_file_loads_with_its_settings(student):
    assert student.denoiser.distilled == {"consistency": {1: (9,), 2: (9, 4), 4: (9, 6, 3, 1)}}
    assert student.denoiser.default_choice == ("consistency", 2)
    assert student.metadata["distillation"]["teacher"] == TEACHER


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: {**m, "format_version": 1}, "format_version 1 file carries 'distillation', which needs"),
        (lambda m: {**m, "distillation": {**m["distillation"], "teacher": "abc"}}, "distillation.teacher"),
        (lambda m: {**m, "distillation": {**m["distillation"], "samplers": {}}}, "distillation.samplers"),
        (
            lambda m: {**m, "distillation": distillation(samplers={"consistency": {"2": {"levels": [9, 4, 1]}}})},
            r"\['consistency'\]\['2'\].levels must list 2 levels.*got \[9, 4, 1\]",
        ),
        (
            lambda m: {**m, "distillation": distillation(samplers={"consistency": {"2": {"levels": [12, 4]}}})},
            r"strictly decreasing from 9 to >= 0, got \[12, 4\]",
        ),
        (
            lambda m: {**m, "distillation": distillation(samplers={"ddim": {"2": {"levels": [9, -1]}}})},
            r"got \[9, -1\]",
        ),
        (
            lambda m: {**m, "distillation": distillation(default={"sampler": "consistency", "steps": 3})},
            "distillation.default consistency@3 is not one of the declared settings",
        ),
        (
            lambda m: {**m, "distillation": distillation(samplers={"euler": {"1": {"levels": [9]}}})},
            "declares only samplers this service lacks",
        ),
    ],
)
def test_a_distilled_file_that_contradicts_itself_is_refused_in_one_line(tmp_path, edit, problem):
    path = write(tmp_path / "s.pt")
    edit_metadata(path, edit)
    with pytest.raises(CheckpointError, match=problem) as e:
        load_model(path, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_steps_alone_pick_the_models_own_sampler_and_levels(student):
    seen = []
    points = sample(student.denoiser, None, 100, torch.Generator().manual_seed(0), steps=4, callback=seen.append)
    assert points.shape == (100, 2) and [s.t for s in seen] == [9, 6, 3, 1]
    seen.clear()
    sample(student.denoiser, None, 100, torch.Generator().manual_seed(0), callback=seen.append)
    assert [s.t for s in seen] == [9, 4], "no sampler, no steps: the declared default"


def test_a_seed_gives_the_same_points(student):
    a, b, c = (sample(student.denoiser, None, 500, torch.Generator().manual_seed(s), steps=2) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        (dict(name="ddpm"), "sampler", "serves only consistency at steps 1, 2, 4; not sampler 'ddpm'"),
        (dict(name="consistency", steps=3), "steps", "serves only consistency at steps 1, 2, 4; not 3 steps"),
        (dict(name=None, steps=40), "steps", "not 40 steps"),
        (dict(name="consistency", steps=2, spacing="trailing"), "spacing", "visits only its own levels"),
    ],
)
def test_what_the_model_was_not_made_for_is_refused_naming_what_it_supports(student, kwargs, param, message):
    name = kwargs.pop("name")
    with pytest.raises(SamplerError, match=message) as e:
        sample(student.denoiser, name, 10, torch.Generator(), **kwargs)
    assert e.value.param == param


def test_a_plain_model_has_no_distilled_spacing(tmp_path):
    model = load_model(write_tiny_checkpoint(tmp_path / "plain.pt"), torch.device("cpu"))
    with pytest.raises(SamplerError, match="this model is not distilled") as e:
        sample(model.denoiser, "ddim", 10, torch.Generator(), 2, spacing="distilled")
    assert e.value.param == "spacing"
    assert sample(model.denoiser, None, 10, torch.Generator()).shape == (10, 2)  # DEFAULT_SAMPLER, its steps
