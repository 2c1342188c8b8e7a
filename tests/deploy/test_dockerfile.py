"""The Dockerfile agrees with the code: console script, port, health check, settings, build context.

No Docker engine runs here, so the file is parsed line by line (instructions, continuations, exec-form JSON) and
every value that must match something in the project is compared with that thing.
"""

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.__main__ import _ALLOCATOR_THRESHOLD
from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEFAULT_PORT = Settings.model_fields["port"].default
MODELS_DIR = Settings.model_fields["models_dir"].default
DEFAULT_MODEL = Settings.model_fields["default_model"].default


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return instructions


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """'--a=1 --b=2 rest' -> ({'a': '1', 'b': '2'}, 'rest')."""
    flags = {}
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        args = args.strip()
    return flags, args


def env_of(instructions) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use the ENV key=value form: {args}"
                env[key] = value
    return env


def served(path: str) -> int:
    """Status the app gives `path` before start-up (no model loaded); 404 means no such route."""
    app = create_app(Settings(warmup=False))
    return TestClient(app).get(path).status_code


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def env(instructions):
    return env_of(instructions)


def only(instructions, keyword):
    found = [args for k, args in instructions if k == keyword]
    assert len(found) == 1, f"expected exactly one {keyword}, found {found}"
    return found[0]


def test_parser_handles_continuations_and_comments():
    parsed = parse_dockerfile("# c\nFROM x\nRUN a \\\n    && b\n\nENV A=1 \\\n    B=2\n")
    assert parsed == [("FROM", "x"), ("RUN", "a && b"), ("ENV", "A=1 B=2")]
    assert env_of(parsed) == {"A": "1", "B": "2"}


def test_slim_python_base_matching_requires_python(instructions):
    base = only(instructions, "FROM")
    assert re.fullmatch(r"python:3\.\d+-slim", base), base
    minor = int(base.split(".")[1].split("-")[0])
    required = PYPROJECT["project"]["requires-python"]
    assert required == ">=3.11" and minor >= 11


def test_cmd_is_the_serve_console_script(instructions):
    cmd = json.loads(only(instructions, "CMD"))  # exec form: the server gets SIGTERM directly
    assert cmd == ["swissroll-serve"]
    assert PYPROJECT["project"]["scripts"]["swissroll-serve"] == "service.__main__:main"
    assert not [k for k, _ in instructions if k == "ENTRYPOINT"]


def test_exposed_port_is_the_settings_default(instructions, env):
    assert only(instructions, "EXPOSE") in (str(DEFAULT_PORT), f"{DEFAULT_PORT}/tcp")
    assert env.get("SWISSROLL_PORT", str(DEFAULT_PORT)) == str(DEFAULT_PORT)


def test_listens_on_all_interfaces(env):
    assert Settings.model_fields["host"].default == "127.0.0.1"  # why the image must override it
    assert env["SWISSROLL_HOST"] == "0.0.0.0"


def test_healthcheck_probes_readiness_on_the_exposed_port_without_curl(instructions):
    flags, rest = split_flags(only(instructions, "HEALTHCHECK"))
    assert rest.startswith("CMD ")
    command = json.loads(rest.removeprefix("CMD "))
    assert command[0] == "python" and command[1] == "-c"  # the slim image has no curl
    assert "urllib.request" in command[2]
    urls = re.findall(r"https?://[^'\"\s]+", command[2])
    assert len(urls) == 1
    match = re.fullmatch(r"http://(127\.0\.0\.1|localhost):(\d+)(/\S*)", urls[0])
    assert match, urls[0]
    assert int(match[2]) == DEFAULT_PORT == int(only(instructions, "EXPOSE").split("/")[0])
    assert match[3] == "/readyz"
    # The route exists and is the readiness one: before the model is loaded it answers 503, not 200 or 404.
    assert served(match[3]) == 503
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    # the urlopen timeout is shorter than the check's own timeout, so a hung server fails cleanly
    urlopen_timeout = float(re.search(r"timeout=(\d+(?:\.\d+)?)", command[2])[1])
    assert urlopen_timeout < float(flags["timeout"].removesuffix("s"))


def test_stops_with_sigterm(instructions):
    assert only(instructions, "STOPSIGNAL") == "SIGTERM"


def test_runs_as_a_non_root_user_after_all_installs(instructions):
    users = [(i, args) for i, (k, args) in enumerate(instructions) if k == "USER"]
    assert users, "no USER instruction: the server would run as root"
    index, user = users[-1]
    name, _, group = user.partition(":")
    assert name not in ("root", "0") and group not in ("root", "0")
    runs_after = [args for k, args in instructions[index:] if k == "RUN"]
    assert not runs_after, f"RUN after USER (would fail without root): {runs_after}"
    # The uid is created in the image.
    assert any(k == "RUN" and f"--uid {name}" in args for k, args in instructions)


def test_allocator_env_matches_the_launcher(env):
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) == _ALLOCATOR_THRESHOLD
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) == _ALLOCATOR_THRESHOLD


def test_swissroll_env_are_valid_settings(env):
    values = {k.removeprefix("SWISSROLL_").lower(): v for k, v in env.items() if k.startswith("SWISSROLL_")}
    assert values
    Settings(**values)  # unknown names (extra="forbid") or bad values raise


def test_dependencies_are_installed_before_the_code_is_copied(instructions):
    def first(predicate):
        return next(i for i, (k, args) in enumerate(instructions) if predicate(k, args))

    copy_pyproject = first(lambda k, a: k == "COPY" and a.split()[0] == "pyproject.toml")
    install_deps = first(lambda k, a: k == "RUN" and "pip install -r" in a)
    copy_code = first(lambda k, a: k == "COPY" and a.split()[0] in ("service", "service/", "."))
    assert copy_pyproject < install_deps < copy_code
    assert all(k != "COPY" or a.split()[0] == "pyproject.toml" for k, a in instructions[:install_deps])


def _python_snippets(instructions):
    """(code, argument-or-None) of every `python -c CODE [ARG]` inside RUN instructions."""
    snippets = []
    for keyword, args in instructions:
        if keyword != "RUN":
            continue
        tokens = shlex.split(args)
        for i, token in enumerate(tokens[:-2]):
            if token == "python" and tokens[i + 1] == "-c":
                after = tokens[i + 3] if i + 3 < len(tokens) else None
                snippets.append((tokens[i + 2], after if after and after.startswith("$") else None))
    return snippets


def test_dependency_extraction_snippets_produce_pyproject_requirements(instructions, tmp_path):
    """Run the Python one-liners of the RUN lines against the real pyproject.toml."""
    snippets = _python_snippets(instructions)
    assert len(snippets) == 2, snippets
    project = PYPROJECT["project"]
    outputs = []
    for code, arg in snippets:
        code = code.replace("/tmp/src/pyproject.toml", str(REPO / "pyproject.toml"))
        argv = [sys.executable, "-c", code] + (["train"] if arg else [])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        outputs.append(result.stdout.split())
    assert outputs[0] == project["dependencies"]
    assert outputs[1] == project["optional-dependencies"]["train"]


def test_committed_models_are_baked_in_where_the_settings_look(instructions, env):
    copies = [args.split() for k, args in instructions if k == "COPY" and "checkpoints/" in args]
    assert len(copies) == 1
    src, dest = copies[0][-2:]
    baked = sorted(p.name for p in REPO.glob(src))
    assert f"{DEFAULT_MODEL}.pt" in baked and len(baked) >= 2, baked  # the default and the seed model at least
    assert "SWISSROLL_CHECKPOINT" not in env  # a one-file setting would hide every model but one
    workdir = Path(only(instructions, "WORKDIR"))
    assert Path(env.get("SWISSROLL_MODELS_DIR", workdir / MODELS_DIR)) == Path(dest)


def test_every_python_package_is_copied_into_the_image(instructions):
    """pip install of the copied source needs every package pyproject.toml lists (a missing one fails the build)."""
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    copied = {args.split()[0] for k, args in instructions if k == "COPY" and args.split()[-1].startswith("/tmp/src/")}
    assert packages <= copied, (packages, copied)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a path is also matched through its parent folders."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_copy_needs_and_drops_the_rest(instructions):
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = [args.split()[-2] for k, args in instructions if k == "COPY" and not args.startswith("--from")]
    assert sources
    for src in sources:
        paths = sorted(REPO.glob(src)) if any(c in src for c in "*?[") else [REPO / src]
        assert paths and all(p.exists() for p in paths), f"COPY source {src} is not in the repo"
        files = [
            f
            for path in paths
            for f in ([path] if path.is_file() else path.rglob("*"))
            if f.is_file() and "__pycache__" not in f.parts
        ]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(rel, patterns), f"{rel} is needed by COPY {src} but .dockerignore drops it"
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/__init__.py",
        "service/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/README.md",
        "checkpoints/swissroll.loss.png",
        "checkpoints/.new.pt.tmp",
        "test-artifacts/x.png",
    ):
        assert dockerignore_excludes(dropped, patterns), f".dockerignore lets {dropped} into the build context"
