"""The models this service serves: every `*.pt` in one directory, named by file stem, reloaded when files change.

One object owns the set. Readers take `get(name)`: a reference to an immutable LoadedModel, which the request keeps
until it ends, so a swap never changes a running request's model and a replaced model's memory is freed when its
last request drops it. Writers are `refresh()` calls (start-up, SIGHUP, polling), serialized by one lock; each
replaces the `models` dict as a whole (an atomic swap for readers on the event loop).

A file is (re)loaded when its stamp (size, mtime, inode) changes: `make train` and `mv` replace files atomically, so a
new inode means a new file. Loading (the contract checks, the forward call, the warm-up) happens off the request
path, through `load`; a file that fails keeps the previous model serving and is listed under `failures` until it
changes again.
"""

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from diffusion.checkpoint import LoadedModel
from diffusion.samplers import SamplerError

log = logging.getLogger("swissroll")

# What a model name may be (it comes from a file name, and clients send it back as `model=`).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
SUFFIX = ".pt"


@dataclass(frozen=True)
class Stamp:
    """What identifies one version of a file without reading it."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "Stamp":
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class ServedModel:
    name: str
    model: LoadedModel
    stamp: Stamp
    loaded_at: float  # wall-clock time (epoch seconds) it started serving
    load_s: float  # seconds to load, check and warm it up


@dataclass(frozen=True)
class LoadFailure:
    name: str
    file: str  # the file name only: never a path
    reason: str  # one line
    at: float  # wall-clock time of the failed attempt
    stamp: Stamp | None  # the version that failed: not retried until the file changes again
    still_serving: str | None = None  # id of the previous version, when one keeps serving


class UnknownModel(SamplerError):
    """`model=` names no served model: a 422 listing the ones that are."""


class DefaultModelError(Exception):
    """The default model is missing or does not load: the service cannot start (one line)."""


def _display(path: Path) -> str:
    return path.name


class ModelRepository:
    def __init__(
        self,
        directory: Path,
        default: str,
        load: Callable[[Path], Awaitable[LoadedModel]],
        only: Path | None = None,
        on_change: Callable[[str, str, LoadedModel | None, LoadedModel | None], None] | None = None,
    ):
        """load(path) -> LoadedModel, async: loads, checks and warms up one file (raising with a one-line message).
        only: serve just this file (SWISSROLL_CHECKPOINT), a repository of one model, still reloaded on change.
        on_change(name, result, old, new): called after every attempt (metrics, freeing a replaced model's graphs).
        """
        self.directory = directory
        self.default = default
        self.only = only
        self._load = load
        self._on_change = on_change
        self.models: dict[str, ServedModel] = {}
        self.failures: dict[str, LoadFailure] = {}
        self._lock = anyio.Lock()
        self._wake: anyio.Event | None = None  # made by watch(), inside the event loop

    # -- readers -------------------------------------------------------------------------------------------------

    def get(self, name: str | None = None) -> LoadedModel:
        """The model a request runs on (the default for None); UnknownModel naming the served ones otherwise."""
        served = self.models.get(self.default if name is None else name)
        if served is None:
            if name is None:  # only between a failed start and exit; routes are not served then
                raise UnknownModel("model", f"the default model {self.default!r} is not loaded")
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise UnknownModel("model", f"unknown model {shown!r}; served models: {', '.join(self.names())}")
        return served.model

    def served(self, name: str | None = None) -> ServedModel:
        self.get(name)  # the same 422 for an unknown name
        return self.models[self.default if name is None else name]

    def names(self) -> list[str]:
        return sorted(self.models)

    def add(self, name: str, model: LoadedModel, stamp: Stamp | None = None) -> None:
        """Serve an already loaded model (start-up's default, loaded before serving to fail fast)."""
        stamp = stamp if stamp is not None else Stamp.of(model.path)
        self.models = {**self.models, name: ServedModel(name, model, stamp, time.time(), 0.0)}

    def wake(self) -> None:
        """Refresh now (SIGHUP); call on the event loop's thread."""
        if self._wake is not None:
            self._wake.set()

    async def watch(self, poll_s: float) -> None:
        """Refreshes every `poll_s` seconds (0: only on wake()). Runs until cancelled; a refresh that raises is
        logged and tried again at the next tick (a failing file is not an exception: it is listed in failures)."""
        while True:
            self._wake = anyio.Event()
            with anyio.move_on_after(poll_s if poll_s > 0 else float("inf")):
                await self._wake.wait()
            try:
                await self.refresh()
            except Exception as e:
                log.warning(f"model refresh failed: {type(e).__name__}: {e}")

    # -- writers -------------------------------------------------------------------------------------------------

    def files(self) -> dict[str, Path]:
        """name -> path of every model file present now."""
        if self.only is not None:
            return {self.only.stem: self.only} if self.only.is_file() else {}
        try:
            entries = sorted(self.directory.glob(f"*{SUFFIX}"))
        except OSError:
            return {}
        return {p.stem: p for p in entries if p.is_file()}

    async def start(self) -> None:
        """The first load: every file; the default must load (DefaultModelError, one line), the others may fail."""
        await self.refresh()
        if self.default not in self.models:
            failure = self.failures.get(self.default)
            where = self.only if self.only is not None else self.directory / f"{self.default}{SUFFIX}"
            problem = failure.reason if failure else f"checkpoint {where}: file not found"
            if failure is None and self.only is None:
                found = ", ".join(self.files()) or "none"
                problem += f" (SWISSROLL_DEFAULT_MODEL={self.default}; models found in {self.directory}: {found})"
            raise DefaultModelError(problem)

    async def refresh(self) -> dict[str, str]:
        """Brings the served set in line with the files: loads new and changed ones, unloads removed ones (never
        the default). Returns name -> what happened, for the names that changed."""
        async with self._lock:
            return await self._refresh()

    async def _refresh(self) -> dict[str, str]:
        outcomes: dict[str, str] = {}
        files = self.files()
        for name, path in files.items():
            try:
                stamp = Stamp.of(path)
            except OSError:
                continue  # removed between the listing and now: the next refresh sees it gone
            served, failed = self.models.get(name), self.failures.get(name)
            if served is not None and served.stamp == stamp:
                continue
            if failed is not None and failed.stamp == stamp:
                continue
            outcomes[name] = await self._load_one(name, path, stamp)
        for name in list(self.models):
            if name not in files and name != self.default:
                old = self.models[name]
                self.models = {k: v for k, v in self.models.items() if k != name}
                log.info(f"model {name}: file removed, unloaded (was {old.model.id[:12]})")
                outcomes[name] = "unloaded"
                self._notify(name, "unloaded", old.model, None)
        for name in list(self.failures):
            if name not in files:
                self.failures = {k: v for k, v in self.failures.items() if k != name}
        return outcomes

    async def _load_one(self, name: str, path: Path, stamp: Stamp) -> str:
        old = self.models.get(name)
        previous = old.model if old is not None else None
        if not _NAME.match(name):
            return self._fail(name, path, stamp, f"file name {path.name!r} is not a valid model name ({NAME_PATTERN})")
        began = time.perf_counter()
        try:
            model = await self._load(path)
        except Exception as e:  # one line whatever went wrong: the service keeps serving what it has
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return self._fail(name, path, stamp, text)
        if previous is not None and previous.id == model.id:
            model = previous  # same bytes (a touch, a copy): keep the warmed-up object
        served = ServedModel(name, model, stamp, time.time(), time.perf_counter() - began)
        self.models = {**self.models, name: served}
        self.failures = {k: v for k, v in self.failures.items() if k != name}
        result = "loaded" if previous is None else "reloaded" if previous is not model else "unchanged"
        if result != "unchanged":
            was = f" (was {previous.id[:12]})" if previous is not None else ""
            log.info(f"model {name}: {result} {path.name} {model.id[:12]}{was} in {served.load_s:.2f} s")
        self._notify(name, result, previous, model)
        return result

    def _fail(self, name: str, path: Path, stamp: Stamp, reason: str) -> str:
        old = self.models.get(name)
        keeps = old.model.id if old is not None else None
        reason = reason.replace(str(path), path.name)  # served by /models: file names only, never a path
        failure = LoadFailure(name, _display(path), reason[:500], time.time(), stamp, keeps)
        self.failures = {**self.failures, name: failure}
        suffix = f"; still serving {keeps[:12]}" if keeps else ""
        log.warning(f"model {name}: {path.name} not loaded: {failure.reason}{suffix}")
        self._notify(name, "failed", old.model if old else None, None)
        return "failed"

    def _notify(self, name: str, result: str, old: LoadedModel | None, new: LoadedModel | None) -> None:
        if self._on_change is not None:
            self._on_change(name, result, old, new)
