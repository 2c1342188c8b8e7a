"""python -m training.distill: few-step students of a teacher checkpoint, compared, the best one exported.

    python -m training.distill --teacher checkpoints/swissroll.pt --out checkpoints/swissroll-fast.pt   # make distill

Both methods of training/distillation.py start from a copy of the teacher (training/student.py) and train on the
teacher's own data recipe (its metadata): progressive distillation (rounds 8 -> 4 -> 2 -> 1 steps; the 4-, 2- and
1-step students are different networks) and consistency distillation (one network for any number of steps, with the
consistency multistep sampler; its levels for 2 and 4 steps are then searched, greedily as Song et al. 2023 do and
then by coordinate descent, on sliced W2 averaged over several seeds). Each student is measured (sliced W2 against
fresh real data, k-NN precision and recall) next to the teacher's default; the method with the lower sliced W2,
averaged over the step counts both serve and over the level search's seeds, is exported, with its settings and their
quality in the checkpoint's `distillation` object (checkpoints/README.md).

--student-width / --student-blocks choose a student of another shape than its teacher (fewer FLOPs per evaluation;
distilling into a smaller student, Hinton et al. 2015). It cannot copy the teacher, so it starts fresh and is first
fitted to the teacher's output for --init-iterations (training/distillation.py: regress_teacher); both methods then
start from that network, with the original teacher as their teacher. The checkpoint's `model` describes the student.
"""

import argparse
import copy
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from diffusion.checkpoint import load_model
from diffusion.cpus import threads_from_env
from diffusion.denoiser import Denoiser
from diffusion.samplers import sample
from training.data import load_swiss_roll
from training.distances import SlicedW2To, precision_recall, sliced_w2
from training.distillation import (
    Budget,
    Levels,
    consistency_distillation,
    progressive_distillation,
    regress_teacher,
    x0_predictor,
)
from training.evaluate import fresh_real
from training.export import export_checkpoint
from training.student import HIDDEN_WEIGHTS, FoldedStudent, teacher_shape
from training.timestep_search import TUNING_SEED

METHODS = ("progressive", "consistency")
STEPS = (1, 2, 4)  # what each method is measured at, and what a consistency student declares
EVAL_SEED = 12_345  # quality_summary's reference seed: the metadata's quality figures are comparable


@dataclass
class DistillConfig:
    teacher: str = "checkpoints/swissroll.pt"
    out: str = "checkpoints/swissroll-fast.pt"
    methods: str = ",".join(METHODS)
    first_steps: int = 8  # progressive distillation's first round: the teacher's T levels in this many steps
    first_round_iterations: int = 1000  # progressive round 0: T levels -> first_steps (k second-order steps each)
    round_iterations: int = 1000  # each later progressive round (8 -> 4 -> 2 -> 1: two DDIM steps each)
    # 12,000: at 4,000 the student was short of converged (its 2- and 4-step sliced W2 fell ~5% by 12,000); at
    # 24,000 the loss rose again and the 1- and 2-step samples got worse (mean of 6 seeds, n = 50,000).
    consistency_iterations: int = 12_000
    batch_size: int = 2048
    lr: float = 3e-4
    target_ema: float = 0.95
    # The student's shape; 0 = the teacher's (a copy of it, no initialisation phase): today's students.
    student_width: int = 0
    student_blocks: int = 0
    init_iterations: int = 2000  # another shape: the regression on the teacher's output before either method
    init_lr: float = 1e-3  # a fresh network, not a copy to nudge: the teacher's own training rate
    # The students' hidden weight matrices, as trained and exported (training/student.py): bfloat16 values let a CPU
    # with bf16 units run the hidden layers in bfloat16 (diffusion/folded.py; ~13% faster per request). Quality:
    # 1.07x / 1.15x the default's sliced W2 at 4 / 2 evaluations against 1.06x / 1.12x trained in float32, within
    # the seed noise (bench/results/distillation.md).
    hidden_weights: str = "bfloat16"
    seed: int = 0
    eval_points: int = 20_000
    search_seeds: int = 4  # the consistency level search averages sliced W2 over this many seeds ...
    search_points: int = 50_000  # ... of this many points each
    students_dir: str = ""  # also write every student (one file per progressive step count) here
    progress: bool = True
    notes: dict = field(default_factory=dict)

    def method_list(self) -> list[str]:
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"methods must be a comma-separated subset of {', '.join(METHODS)}, got {self.methods!r}")
        return methods


@dataclass
class Student:
    method: str
    sampler: str
    nets: dict[int, torch.nn.Module]  # steps -> network (one network for all steps, or one per step count)
    levels: dict[int, list[int]]
    seconds: float
    quality: dict[int, dict] = field(default_factory=dict)
    selection: float | None = None  # selection_w2: what the kept method minimizes


@dataclass
class Initial:
    """What every method's student starts from: a copy of the teacher, or a network of another shape fitted to it."""

    net: FoldedStudent
    how: dict  # the checkpoint's model.initialisation
    seconds: float = 0.0

    def student(self) -> FoldedStudent:
        return copy.deepcopy(self.net).requires_grad_(True)


def initial_student(config, teacher_net: FoldedStudent, levels, data, residual: bool, log) -> Initial:
    """The teacher's copy when the student has its shape (Salimans & Ho 2022); otherwise a fresh network of the
    asked shape regressed on the teacher's output (regress_teacher), once, shared by every method."""
    width, blocks = teacher_shape(teacher_net)
    shape = (config.student_width or width, config.student_blocks or blocks)
    if shape == (width, blocks):
        return Initial(teacher_net, {"from": "a copy of the teacher"})
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    net = FoldedStudent.fresh(*shape, levels.num_timesteps, residual)
    budget = Budget(config.init_iterations, config.batch_size, config.init_lr)
    losses = regress_teacher(net, teacher_net, levels, data, budget, torch.Generator().manual_seed(config.seed))
    seconds = time.perf_counter() - start
    final = float(np.mean(losses[-100:])) if losses else None
    log(f"student {shape[0]} x {shape[1]}: regressed on the teacher ({seconds:.0f} s, final loss {final})")
    how = {
        "from": "regression on the teacher's output (v) on the forward process",
        "iterations": config.init_iterations,
        "final_loss": None if final is None else round(final, 6),
        "teacher_width": width,
        "teacher_blocks": blocks,
    }
    return Initial(net, how, seconds)


def denoiser_of(net, alphas_cumprod, sampler: str, levels: dict[int, list[int]]) -> Denoiser:
    distilled = {sampler: {steps: tuple(ls) for steps, ls in levels.items()}}
    return Denoiser(net.eval(), tuple(alphas_cumprod), "v", distilled=distilled)


def measure(denoiser: Denoiser, sampler: str, steps: int, real: np.ndarray, seed: int) -> dict:
    points = sample(denoiser, sampler, len(real), torch.Generator().manual_seed(seed), steps).numpy()
    precision, recall = precision_recall(real, points)
    w2 = sliced_w2(real, points)
    return {"sliced_w2": round(w2, 5), "precision": round(precision, 4), "recall": round(recall, 4)}


class LevelObjective:
    """What a level search minimizes: a student's sliced W2 against fresh real data, averaged over several seeds
    (each seed its own real points and sampling noise). One seed's sliced W2 moves by about 0.002 at n = 50,000,
    as much as the gaps between good level choices: levels picked on one seed fit its noise. Results are memoized
    (a coordinate search revisits settings). distances: per seed, the distance to that seed's real points (made once
    per run: the level search and the choice of method share them)."""

    def __init__(self, net, alphas_cumprod, sampler: str, distances: dict[int, SlicedW2To]):
        self.net, self.alphas_cumprod, self.sampler = net, tuple(alphas_cumprod), sampler
        self.distances = distances
        self.seen: dict[tuple[int, ...], float] = {}

    def __call__(self, levels) -> float:
        levels = tuple(levels)
        if levels not in self.seen:
            den = Denoiser(self.net, self.alphas_cumprod, "v", distilled={self.sampler: {len(levels): levels}})
            w2s = []
            for seed, w2 in self.distances.items():
                points = sample(den, self.sampler, w2.points, torch.Generator().manual_seed(seed), len(levels))
                w2s.append(w2(points.numpy()))
            self.seen[levels] = float(np.mean(w2s))
        return self.seen[levels]


def greedy_levels(objective: LevelObjective, steps: int, start: list[int], highest: int) -> list[int]:
    """Extend `start` one level at a time to `steps` levels (Song et al. 2023, sec. 6: greedy search), each the
    best of every level below the last (and at most `highest`)."""
    levels = list(start)
    while len(levels) < steps:
        levels.append(min(range(min(levels[-1] - 1, highest), -1, -1), key=lambda c: objective([*levels, c])))
    return levels


def coordinate_levels(objective: LevelObjective, start: list[int], highest: int) -> list[int]:
    """Coordinate descent from `start`: each level after the first (T-1, fixed) in turn moves to the best value
    between its neighbours (at most `highest`), until a sweep changes nothing. Greedy search alone fixes the early
    levels for the sampler that stops after them: a 4-step sampler's second level is the 2-step one's last."""
    levels = list(start)
    changed = True
    while changed:
        changed = False
        for i in range(1, len(levels)):
            low = levels[i + 1] + 1 if i + 1 < len(levels) else 0
            high = min(levels[i - 1] - 1, highest)
            best = min(range(low, high + 1), key=lambda c: objective([*levels[:i], c, *levels[i + 1 :]]))
            if objective([*levels[:i], best, *levels[i + 1 :]]) < objective(levels):
                levels[i], changed = best, True
    return levels


def search_levels(objective: LevelObjective, num_timesteps: int, steps: list[int]) -> dict[int, list[int]]:
    """Levels for each step count: greedy from T-1, then coordinate descent. Later levels stay in the lower half of
    the schedule: noising the first step's clean point afresh to a level above T/2 keeps less than half of it
    (alpha_bar < 0.5 there), and every measured setting that did so was worse."""
    chosen = {}
    for k in steps:
        start = greedy_levels(objective, k, [num_timesteps - 1], num_timesteps // 2)
        chosen[k] = coordinate_levels(objective, start, num_timesteps // 2)
    return chosen


def distil_progressive(config, net0, teacher_x0, levels, data, generator, log) -> Student:
    start = time.perf_counter()
    nets = {}

    def keep(steps, student):
        log(f"progressive: {steps}-step student done ({time.perf_counter() - start:.0f} s)")
        if steps in STEPS:
            nets[steps] = copy.deepcopy(student).requires_grad_(False)

    budget = Budget(config.round_iterations, config.batch_size, config.lr)
    first = Budget(config.first_round_iterations, config.batch_size, config.lr)
    progressive_distillation(
        net0, teacher_x0, levels, config.first_steps, data, budget, generator, keep, first_budget=first
    )
    T = levels.num_timesteps
    grids = {steps: [*range(T - 1, -1, -T // steps)] for steps in nets}
    return Student("progressive", "ddim", nets, grids, time.perf_counter() - start)


def distil_consistency(config, net0, teacher_x0, levels, data, generator, log, search) -> Student:
    start = time.perf_counter()
    budget = Budget(config.consistency_iterations, config.batch_size, config.lr)
    losses = consistency_distillation(net0, teacher_x0, levels, data, budget, generator, config.target_ema)
    net = net0.requires_grad_(False)
    log(f"consistency: trained ({time.perf_counter() - start:.0f} s, final loss {np.mean(losses[-100:]):.5f})")
    T = levels.num_timesteps
    objective = LevelObjective(net.eval(), levels.alphas_cumprod, "consistency", search)
    chosen = {1: [T - 1], **search_levels(objective, T, [k for k in STEPS if k > 1])}
    for steps in STEPS[1:]:
        log(
            f"consistency: {steps} steps at levels {chosen[steps]} (search: {objective(chosen[steps]):.5f} mean "
            f"sliced W2 over {len(search)} seeds, {len(objective.seen)} settings tried)"
        )
    log(f"consistency: levels chosen ({time.perf_counter() - start:.0f} s)")
    return Student("consistency", "consistency", {s: net for s in STEPS}, chosen, time.perf_counter() - start)


def distil(config: DistillConfig) -> dict:
    """Train every method, measure, export the best; returns the exported metadata."""
    methods = config.method_list()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if config.progress else (lambda m: None)
    torch.set_num_threads(threads_from_env().threads)
    teacher = load_model(config.teacher, torch.device("cpu"))
    meta = teacher.metadata
    if meta["prediction_type"] != "v" or teacher.denoiser.distilled:
        raise ValueError(f"{config.teacher}: the teacher must be a v-prediction model that is not itself distilled")
    d = meta["data"]
    roll = load_swiss_roll(d["n_samples"], d["noise"], d["seed"], d["n_val"] / d["n_samples"])
    if not np.allclose(roll.mean, d["mean"]) or not np.allclose(roll.std, d["std"]):
        raise ValueError(f"{config.teacher}: its data recipe does not reproduce its recorded mean and std")
    ab = teacher.denoiser.alphas_cumprod
    levels = Levels(ab)
    residual = meta.get("model", {}).get("residual", True)
    # The teacher runs as a Python copy of its weights (the same function, bit for bit): TorchScript's profiling
    # executor is much slower for the many small calls of a distillation run.
    teacher_net = FoldedStudent.from_teacher(teacher.denoiser.net, residual).requires_grad_(False)
    teacher_x0 = x0_predictor(teacher_net, "v", levels)
    real = fresh_real(config.eval_points, d["noise"], EVAL_SEED, d["mean"], d["std"])
    # The level search's own seeds: TUNING_SEED + k, disjoint from EVAL_SEED and from bench.distillation's.
    search_seeds = [TUNING_SEED + k for k in range(config.search_seeds)]
    search = {s: SlicedW2To(fresh_real(config.search_points, d["noise"], s, d["mean"], d["std"])) for s in search_seeds}

    reference = measure(teacher.denoiser, "ddpm", len(ab), real, EVAL_SEED)
    log(f"teacher ddpm@{len(ab)}: {reference}")
    initial = initial_student(config, teacher_net, levels, roll.train, residual, log)
    students = []
    for method in methods:
        generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        net0 = initial.student().rounding_hidden_weights(config.hidden_weights)
        if method == "progressive":
            student = distil_progressive(config, net0, teacher_x0, levels, roll.train, generator, log)
        else:
            student = distil_consistency(config, net0, teacher_x0, levels, roll.train, generator, log, search)
        student.seconds += initial.seconds  # the shared initialisation counted in each method's cost
        for steps, net in student.nets.items():
            den = denoiser_of(net, ab, student.sampler, {steps: student.levels[steps]})
            student.quality[steps] = measure(den, student.sampler, steps, real, EVAL_SEED)
            log(f"{method} @ {steps}: {student.quality[steps]}")
        students.append(student)

    for student in students:
        student.selection = selection_w2(student, levels.alphas_cumprod, search)
        log(f"{student.method}: {student.selection:.5f} mean sliced W2 over its step counts and the search seeds")
    best = min(students, key=lambda s: s.selection)
    ab64 = torch.tensor(ab, dtype=torch.float64)
    metadata = None
    for student in students:
        for steps_served in served_sets(student, every=True):
            if config.students_dir:
                path = Path(config.students_dir) / f"{student.method}-{'-'.join(map(str, steps_served))}.pt"
                export_checkpoint(
                    *student_file(config, teacher, student, steps_served, students, reference, ab64, initial), path
                )
    net, _, meta_best = student_file(config, teacher, best, served_sets(best)[0], students, reference, ab64, initial)
    export_checkpoint(net, ab64, meta_best, config.out)
    log(f"wrote {config.out}: {best.method}, {meta_best['distillation']['samplers']}")
    metadata = meta_best
    return metadata


def selection_w2(student: Student, alphas_cumprod, search: dict[int, SlicedW2To]) -> float:
    """What the kept method minimizes: sliced W2 averaged over its step counts and over the level search's seeds
    (several seeds of many points each). The evaluation seed alone (n = 20,000) moves by ~15% from seed to seed,
    as much as the methods differ, and once picked a method on its noise."""
    return float(
        np.mean(
            [
                LevelObjective(net, alphas_cumprod, student.sampler, search)(student.levels[steps])
                for steps, net in student.nets.items()
            ]
        )
    )


def served_sets(student: Student, every: bool = False) -> list[list[int]]:
    """Which step counts one file serves. A consistency student serves every step count it was measured at; a
    progressive one only its own grid (its 1-, 2- and 4-step students are different networks): one file per step
    count, and for the exported model the 2-step student, the service's headline."""
    if student.method == "consistency":
        return [sorted(student.nets)]
    return [[k] for k in sorted(student.nets)] if every else [[2]]


def student_file(config, teacher, student: Student, steps: list[int], students, reference, ab64, initial: Initial):
    settings = {str(k): {"levels": student.levels[k], **student.quality[k]} for k in steps}
    default = {"sampler": student.sampler, "steps": 2 if 2 in steps else steps[0]}
    net = student.nets[steps[0]]
    model = describe_model(teacher, net, initial)
    metadata = describe(config, teacher, student, ({student.sampler: settings}, default), students, reference, model)
    return net.inference(), ab64, metadata


def describe_model(teacher, net: FoldedStudent, initial: Initial) -> dict:
    """The checkpoint's `model`: the student's own network (its shape, parameters and FLOPs, which a smaller
    student does not share with its teacher), how it was initialised, and the teacher's preset it descends from."""
    preset = teacher.metadata.get("model", {}).get("preset", "teacher")
    return {"preset": f"{preset}-distilled", **net.describe(), "initialisation": initial.how}


def describe(config, teacher, best: Student, served, students: list[Student], reference: dict, model: dict) -> dict:
    """The student's metadata: the teacher's recipe and schedule, plus the `distillation` object (format 2)."""
    meta = teacher.metadata
    samplers, default = served
    return {
        "num_timesteps": meta["num_timesteps"],
        "schedule": meta["schedule"],
        "prediction_type": "v",
        "model": model,
        "data": meta["data"],
        "training": {
            "config": {k: v for k, v in asdict(config).items() if k != "progress"},
            "seconds": round(sum(s.seconds for s in students), 1),
            "device": "cpu",
            "threads": threads_from_env().describe(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "distillation": {
            "teacher": teacher.id,
            "teacher_file": teacher.path.name,
            "method": best.method,
            "samplers": samplers,
            "default": default,
            # Measured on the same fresh real points (n, seed) as the teacher's default setting:
            "evaluation": {"n": config.eval_points, "seed": EVAL_SEED, "teacher_ddpm@40": reference},
            "comparison": {
                s.method: {
                    "sampler": s.sampler,
                    "seconds": round(s.seconds, 1),
                    "selection_sliced_w2": None if s.selection is None else round(s.selection, 5),
                    "steps": {str(k): {"levels": s.levels[k], **q} for k, q in s.quality.items()},
                }
                for s in students
            },
        },
    }


def parse_args(argv=None) -> DistillConfig:
    parser = argparse.ArgumentParser(prog="python -m training.distill", description=__doc__.split("\n\n")[0])
    defaults = DistillConfig()
    for f in fields(DistillConfig):
        if f.name in ("progress", "notes"):
            continue
        default = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "no_progress"}
    config = DistillConfig(**options, progress=not args.no_progress)
    try:
        config.method_list()
    except ValueError as e:
        parser.error(str(e))
    if config.hidden_weights not in HIDDEN_WEIGHTS:
        parser.error(f"--hidden-weights must be one of {', '.join(HIDDEN_WEIGHTS)}, got {config.hidden_weights!r}")
    return config


def main(argv=None) -> None:
    distil(parse_args(argv))


if __name__ == "__main__":
    main()
