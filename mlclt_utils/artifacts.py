"""The artifact store: one folder per run, one sub-folder per stage, a manifest per stage.

Layout: ``<root>/<run>/<stage>/...`` where ``root`` is ``$MLCLT_ARTIFACTS`` or
``./artifacts``. A stage is complete when its ``manifest.json`` exists; the manifest is
written last, so an interrupted stage never looks complete. Every file is written to a
temporary name and renamed into place.

The manifest records the stage's config and its hash, the identities of the upstream
stages it consumed, the hash of every file it wrote, the package version and timings. A
stage's *identity* is a hash of its config, its inputs and its output files, and nothing
else: two builds that wrote the same bytes from the same inputs have the same identity,
however long they took. ``Stage.require_inputs`` checks that the upstream stages a stage
consumed are still the ones it was built from. Which stages exist, how they are built and
how a stale one is refused is the business of ``mlclt_utils.stages``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

ENV_ROOT = "MLCLT_ARTIFACTS"
# File names with one meaning across every stage.
MANIFEST_FILE = "manifest.json"
IN_PROGRESS_FILE = "in_progress.json"   # present while a build runs or after it was killed
RESUME_FILE = "resume.pt"               # training state of an unfinished build
METRICS_FILE = "metrics.jsonl"          # one JSON row per logging interval of a training
_UMASK = os.umask(0)
os.umask(_UMASK)


class ManifestMismatch(RuntimeError):
    """An upstream artifact is missing or is not the one a stage expects."""


def artifacts_root(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root).resolve()
    return Path(os.environ.get(ENV_ROOT, "artifacts")).resolve()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Mapping[str, Any]) -> str:
    """Short, stable hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def file_hash(path: str | os.PathLike) -> str:
    """Hash of a file's content. A safetensors file is hashed by its parsed header and its
    data: its writer stores the metadata map in a random key order, so two files with the
    same tensors and metadata can differ in their bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).endswith(".safetensors"):
            n = int.from_bytes(f.read(8), "little")
            h.update(canonical_json(json.loads(f.read(n))).encode())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; use the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines log; stops at a line cut short by an interruption."""
    rows = []
    path = Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (contiguous CPU copies)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def package_version() -> str:
    from . import __version__

    return __version__


class Stage:
    """One stage folder of one run, e.g. ``Stage("tiny", "models/s-en50")``."""

    def __init__(self, run: str, name: str, root: str | os.PathLike | None = None):
        if not run or "/" in run or run.startswith("."):
            raise ValueError(f"run name {run!r} is not allowed: use a plain folder name")
        self.run = run
        self.name = name
        self.root = artifacts_root(root)
        self.path = self.root / run / name

    def __repr__(self) -> str:
        return f"Stage({self.run!r}, {self.name!r}) at {self.path}"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    def is_complete(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        if not self.is_complete():
            raise ManifestMismatch(
                f"stage {self.name!r} of run {self.run!r} is missing or incomplete "
                f"(no manifest at {self.manifest_path}); run the chapter that builds it first"
            )
        return read_json(self.manifest_path)

    def identity(self) -> str:
        """Hash of the config, inputs and output files recorded in the manifest."""
        return self.manifest()["identity"]

    def output_hashes(self, volatile: tuple[str, ...] = ()) -> dict[str, str]:
        """Hash of every file of the stage folder except the bookkeeping files and
        ``volatile`` ones (logs with timings), by relative path."""
        skip = {MANIFEST_FILE, IN_PROGRESS_FILE, RESUME_FILE, *volatile}
        out = {}
        for f in sorted(self.path.rglob("*")):
            rel = f.relative_to(self.path).as_posix()
            if f.is_file() and rel not in skip and not f.name.startswith("."):
                out[rel] = file_hash(f)
        return out

    def file(self, relative: str) -> Path:
        return self.path / relative

    def matches(self, config: Mapping[str, Any]) -> bool:
        """True when the stage is complete, built from this config, and its inputs are intact."""
        if not self.is_complete():
            return False
        if self.manifest().get("config_hash") != config_hash(config):
            return False
        try:
            self.require_inputs()
        except ManifestMismatch:
            return False
        return True

    def start(self, clean: bool = True) -> None:
        """Begin (re)building this stage: drop the old manifest so it no longer looks complete."""
        if self.manifest_path.exists():
            self.manifest_path.unlink()
        if clean and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def finish(self, config: Mapping[str, Any], inputs: list["Stage"] | None = None,
               timings: Mapping[str, float] | None = None, volatile: tuple[str, ...] = (),
               **extra: Any) -> dict:
        """Write the manifest last; from now on the stage counts as complete."""
        recorded_inputs = {s.name: s.identity() for s in (inputs or [])}
        outputs = self.output_hashes(volatile)
        manifest = {
            "run": self.run,
            "stage": self.name,
            "config": config,
            "config_hash": config_hash(config),
            "inputs": recorded_inputs,
            "outputs": outputs,
            "identity": config_hash({"config": config_hash(config), "inputs": recorded_inputs,
                                     "outputs": outputs}),
            "package_version": package_version(),
            "timings": dict(timings or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        write_json(self.manifest_path, manifest)
        return manifest

    def require_inputs(self) -> None:
        """Raise if an upstream stage recorded in the manifest changed or disappeared."""
        for name, expected in self.manifest().get("inputs", {}).items():
            upstream = Stage(self.run, name, self.root)
            if not upstream.is_complete():
                raise ManifestMismatch(
                    f"stage {self.name!r} was built from {name!r}, which is now missing; rebuild it")
            got = upstream.identity()
            if got != expected:
                raise ManifestMismatch(
                    f"stage {self.name!r} expects input {name!r} with identity {expected}, "
                    f"but found {got}: the input was rebuilt since; rerun {self.name!r}")

    def require(self, config: Mapping[str, Any] | None = None) -> dict:
        """Manifest of a complete stage, checked against the expected config when given."""
        manifest = self.manifest()
        if config is not None and manifest.get("config_hash") != config_hash(config):
            diff = sorted(k for k in set(config) | set(manifest["config"])
                          if config.get(k) != manifest["config"].get(k))
            raise ManifestMismatch(
                f"stage {self.name!r} of run {self.run!r} was built with a different config "
                f"(keys that differ: {diff}); rerun the chapter that builds it")
        self.require_inputs()
        return manifest
