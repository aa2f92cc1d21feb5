"""Shared helpers for tests/test_export_*.py (no tests here).

Training a tiny MNet and exporting it take seconds, so each is done once per test session and cached
here (module-scoped fixtures in several files would repeat them); tests that change a bundle work on
a copy from `copy_bundle`.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from mnet.arch import PRESETS

_CACHE: dict[str, Path] = {}

# A sys.meta_path finder that leaves only what a Jetson runtime install has (numpy, OpenCV, onnxruntime,
# typer, rich): torch, mnet.search (which needs torch), the onnx package and tensorrt cannot be imported.
BLOCK_HEAVY = textwrap.dedent("""
    import importlib.abc, sys
    class _BlockHeavy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "tensorrt") or name.startswith("mnet.search"):
                raise ImportError("blocked for this test: " + name)
            return None
    sys.meta_path.insert(0, _BlockHeavy())
""")


def trained_checkpoint(colour_data: Path, tmp_path_factory) -> Path:
    """RUN/best.pt of a tiny MNet trained one epoch on the colour dataset (cached for the session)."""
    key = f"ckpt:{colour_data}"
    if key not in _CACHE:
        from mnet.search.train import TrainConfig, train

        out = tmp_path_factory.mktemp("export_run")
        train(colour_data, PRESETS["tiny"].sample(random.Random(0)), out, TrainConfig(epochs=1, lr=0.05, batch_size=32))
        _CACHE[key] = out / "best.pt"
    return _CACHE[key]


def exported_bundle(colour_data: Path, tmp_path_factory) -> Path:
    """A bundle exported from `trained_checkpoint` with parity on the colour train split (cached)."""
    key = f"bundle:{colour_data}"
    if key not in _CACHE:
        from mnet.export.onnx import export_onnx

        out = tmp_path_factory.mktemp("export_bundle") / "bundle"
        export_onnx(trained_checkpoint(colour_data, tmp_path_factory), out, data_root=colour_data)
        _CACHE[key] = out
    return _CACHE[key]


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (this venv), capturing text output."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
