"""python -m training.distill end to end on a tiny teacher: every student written, the best exported as a valid
distilled checkpoint (format_version 2) that names its teacher and serves only what it was made for."""

import pytest
import torch

from diffusion.checkpoint import load_model, read_archive
from diffusion.samplers import SamplerError, sample
from tests.utils.distill import TINY_RUN, distil_on_one_thread, tiny_teacher
from training.distill import parse_args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    tiny_teacher(tmp / "teacher.pt")
    argv = [
        "--teacher", str(tmp / "teacher.pt"), "--out", str(tmp / "fast.pt"), "--students-dir", str(tmp),
        "--first-round-iterations", "2", "--round-iterations", "2", *TINY_RUN,
    ]  # fmt: skip
    metadata = distil_on_one_thread(argv)
    return tmp, metadata


def test_the_best_student_is_exported_naming_its_teacher(run):
    tmp, metadata = run
    teacher = load_model(tmp / "teacher.pt", torch.device("cpu"))
    fast = load_model(tmp / "fast.pt", torch.device("cpu"))
    _, stored = read_archive(tmp / "fast.pt")
    assert stored["format_version"] == 2
    d = fast.metadata["distillation"]
    assert d["teacher"] == teacher.id and d["teacher_file"] == "teacher.pt"
    assert d["method"] in d["comparison"] and set(d["comparison"]) == {"progressive", "consistency"}
    # kept: the lower sliced W2 averaged over step counts and the level search's seeds
    selection = {method: c["selection_sliced_w2"] for method, c in d["comparison"].items()}
    assert selection[d["method"]] == min(selection.values()) > 0
    assert fast.denoiser.distilled and fast.denoiser.default_choice[1] == 2
    assert sample(fast.denoiser, None, 10, torch.Generator().manual_seed(0), steps=2).shape == (10, 2)
    with pytest.raises(SamplerError):
        sample(fast.denoiser, "ddpm", 10, torch.Generator(), 40)
    assert metadata == fast.metadata | {"format_version": 2} or metadata["distillation"] == d


def test_every_student_is_written_one_file_per_progressive_step_count(run):
    tmp, _ = run
    files = sorted(p.name for p in tmp.glob("*.pt") if p.name not in ("teacher.pt", "fast.pt"))
    assert files == ["consistency-1-2-4.pt", "progressive-1.pt", "progressive-2.pt", "progressive-4.pt"]
    consistency = load_model(tmp / "consistency-1-2-4.pt", torch.device("cpu")).denoiser
    assert sorted(consistency.distilled["consistency"]) == [1, 2, 4]
    assert load_model(tmp / "progressive-4.pt", torch.device("cpu")).denoiser.distilled == {
        "ddim": {4: (39, 29, 19, 9)}
    }


def test_bad_methods_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--methods", "reflow"])
    with pytest.raises(SystemExit):
        parse_args(["--hidden-weights", "int8"])
