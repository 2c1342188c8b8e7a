"""A student of another shape than its teacher: fresh, fitted to the teacher's output (regress_teacher), and the
checkpoint describing the student's own network, not the teacher's."""

import pytest
import torch

from diffusion.checkpoint import load_model
from diffusion.schedules import make_alphas_cumprod
from tests.utils.distill import TINY_RUN, distil_on_one_thread, tiny_teacher
from training.distillation import Budget, Levels, regress_teacher
from training.student import FoldedStudent, flops_per_sample, teacher_shape


def gap(student, teacher, levels, data, generator) -> float:
    """Mean squared difference of the two networks' outputs on the forward process (the regression's objective)."""
    x = data[torch.randint(0, data.shape[0], (4096,), generator=generator)]
    t = torch.randint(0, levels.num_timesteps, (4096,), generator=generator)
    z = levels.noised(x, t, torch.randn(x.shape, generator=generator))
    with torch.no_grad():
        return torch.nn.functional.mse_loss(student(z, t), teacher(z, t)).item()


def test_regression_on_the_teacher_closes_most_of_the_gap():
    torch.manual_seed(0)
    T = 10
    levels = Levels(make_alphas_cumprod("cosine", T).tolist())
    teacher = FoldedStudent.fresh(16, 2, T).requires_grad_(False)
    with torch.no_grad():  # a teacher whose output depends on the level, as a trained one's does
        teacher.level_bias.normal_()
    data = torch.randn(2000, 2) * torch.tensor([1.0, 0.5])
    student = FoldedStudent.fresh(8, 1, T)
    before = gap(student, teacher, levels, data, torch.Generator().manual_seed(1))
    losses = regress_teacher(student, teacher, levels, data, Budget(300, 256, 1e-2), torch.Generator().manual_seed(2))
    after = gap(student, teacher, levels, data, torch.Generator().manual_seed(1))
    assert len(losses) == 300 and after < 0.2 * before


def test_a_fresh_student_has_the_asked_shape_and_counts_its_own_cost():
    student = FoldedStudent.fresh(32, 3, 40)
    d = student.describe()
    assert (d["width"], d["blocks"], d["architecture"]) == (32, 3, "FoldedStudent")
    assert d["parameters"] == 2 * 32 + 40 * 32 + 3 * (32 * 32 + 32) + 32 * 2 + 2
    assert d["flops_per_sample"] == flops_per_sample(32, 3) == 2 * (2 * 32 + 3 * 32 * 32 + 32 * 2)
    assert not torch.equal(student.w_x, torch.zeros_like(student.w_x))
    assert torch.equal(student.level_bias[0], student.level_bias[-1])  # no level information before training


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    tiny_teacher(tmp / "teacher.pt")
    argv = [
        "--teacher", str(tmp / "teacher.pt"), "--out", str(tmp / "small.pt"), "--methods", "consistency",
        "--student-width", "16", "--student-blocks", "2", "--init-iterations", "3", *TINY_RUN,
    ]  # fmt: skip
    metadata = distil_on_one_thread(argv)
    return tmp, metadata


def test_the_metadata_describes_the_student_not_the_teacher(run):
    tmp, _ = run
    teacher = load_model(tmp / "teacher.pt", torch.device("cpu"))
    small = load_model(tmp / "small.pt", torch.device("cpu"))
    model = small.metadata["model"]
    assert teacher_shape(teacher.denoiser.net) == (64, 4) and teacher_shape(small.denoiser.net) == (16, 2)
    assert (model["width"], model["blocks"]) == (16, 2) and model["preset"] == "default-distilled"
    buffers = {k: v for k, v in small.denoiser.net.state_dict().items() if k != "alphas_cumprod"}
    assert model["parameters"] == sum(v.numel() for v in buffers.values())
    assert model["flops_per_sample"] == flops_per_sample(16, 2) < teacher.metadata["model"]["flops_per_sample"]
    init = model["initialisation"]
    assert init["iterations"] == 3 and (init["teacher_width"], init["teacher_blocks"]) == (64, 4)
    assert small.metadata["training"]["config"]["student_width"] == 16
    assert sorted(small.denoiser.distilled["consistency"]) == [1, 2, 4]
    # make distill's default: the blocks' weights were trained and exported as bfloat16 values
    assert model["hidden_weights"] == "bfloat16"
    hidden = [v for k, v in buffers.items() if k.startswith("net.blocks.") and k.endswith("linear.weight")]
    assert hidden and all(torch.equal(w.bfloat16().float(), w) for w in hidden)
    others = [v for k, v in buffers.items() if not k.startswith("net.blocks.")]
    assert not all(torch.equal(w.bfloat16().float(), w) for w in others)  # only the hidden weights are rounded


def test_a_student_rounding_its_hidden_weights_trains_float32_masters_and_exports_the_rounded_function():
    torch.manual_seed(0)
    student = FoldedStudent.fresh(16, 2, 10).rounding_hidden_weights("bfloat16")
    master = [b.linear.weight for b in student.blocks]
    assert not all(torch.equal(w.bfloat16().float(), w) for w in master)  # float32 values, as initialised
    x, t = torch.randn(256, 2), torch.randint(0, 10, (256,))
    rounded = FoldedStudent.fresh(16, 2, 10)
    rounded.load_state_dict(student.state_dict())
    with torch.no_grad():
        for b in rounded.blocks:
            b.linear.weight.copy_(b.linear.weight.bfloat16().float())
    assert torch.equal(student(x, t), rounded(x, t))  # the forward pass uses the rounded weights
    student(x, t).square().mean().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in master)  # straight through to the masters
    exported = student.inference()
    assert torch.equal(exported(x, t), rounded(x, t))
    assert all(torch.equal(b.linear.weight.bfloat16().float(), b.linear.weight) for b in exported.blocks)
    assert not all(torch.equal(w.bfloat16().float(), w) for w in master)  # the student itself is unchanged
    with pytest.raises(ValueError, match="valid: float32, bfloat16"):
        student.rounding_hidden_weights("int8")


def test_a_student_of_the_teachers_shape_is_still_its_copy(tmp_path):
    from tests.utils.checkpoints import write_tiny_checkpoint
    from training.distill import DistillConfig, initial_student

    net = load_model(write_tiny_checkpoint(tmp_path / "t.pt"), torch.device("cpu")).denoiser.net
    teacher = FoldedStudent.from_teacher(net).requires_grad_(False)
    levels = Levels(make_alphas_cumprod("cosine", teacher.level_bias.shape[0]).tolist())
    for config in (DistillConfig(), DistillConfig(student_width=8, student_blocks=1)):
        initial = initial_student(config, teacher, levels, torch.randn(100, 2), True, lambda m: None)
        student = initial.student()
        assert initial.how == {"from": "a copy of the teacher"} and initial.seconds == 0
        assert all(
            torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values(), strict=True)
        )
        assert all(p.requires_grad for p in student.parameters())
