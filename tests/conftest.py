"""Shared fixtures: tiny checkpoints on disk, direction files, an in-process CLI runner."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

from tiny import HIDDEN, build, save  # noqa: E402

from refusal_edit.directions.artifacts import DirectionFile, load_direction, save_direction  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run faster on one thread: with two, OpenMP's spin-wait costs more than the arithmetic (a tiny
    llama forward: 0.64 s with 2 threads on a busy 2-core machine, 0.02 s with 1). Real-model tests keep all."""
    if request.node.get_closest_marker("real") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `refusal-edit ARGS...` in-process through the real entry point (`main`)."""
    from refusal_edit.cli import main

    def run(*args: str | Path) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["refusal-edit", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def make_direction(path: Path, seed: int = 5, layer: int = 2, hidden: int = HIDDEN) -> DirectionFile:
    torch.manual_seed(seed)
    save_direction(path, torch.randn(hidden), {"layer": layer, "position": -1, "model": "tiny"})
    return load_direction(path)


@pytest.fixture
def tiny_dir(tmp_path):
    """Factory: save a tiny model of `model_type` (with tokenizer) and return its directory."""

    def make(model_type: str = "llama", name: str = "model", **overrides) -> Path:
        return save(build(model_type, **overrides), tmp_path / name)

    return make


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster on a shared machine (no OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """`make test` runs one pytest-xdist worker per core, each taking whole files (`--dist loadfile`: the
    real-model tests share one extract of the demo model through session fixtures). The real-model tests come
    first, so the longest file starts at once while the tiny-model files (one thread each) fill the other cores."""
    real = [item for item in items if item.get_closest_marker("real") is not None]
    items[:] = real + [item for item in items if item.get_closest_marker("real") is None]
