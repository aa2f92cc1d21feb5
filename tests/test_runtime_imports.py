"""mnet.runtime must run on a Jetson without torch: import every runtime module with torch blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

RUNTIME_DIR = Path(__file__).resolve().parents[1] / "runtime"


def test_runtime_imports_without_torch_or_search():
    modules = sorted(f"mnet.runtime.{p.stem}" for p in RUNTIME_DIR.glob("*.py") if p.stem != "__init__")
    assert {"mnet.runtime.sources", "mnet.runtime.grader", "mnet.runtime.sinks"} <= set(modules)
    code = textwrap.dedent(f"""
        import importlib, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith(("torch.", "torchvision", "mnet.search")):
                    raise ImportError(f"blocked in this test: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        for name in ["mnet.events", "mnet.runtime"] + {modules!r}:
            importlib.import_module(name)
        # the grader pulls in everything it needs; nothing may have slipped torch in another way
        assert not any(m == "torch" or m.startswith(("torch.", "mnet.search")) for m in sys.modules), \\
            sorted(m for m in sys.modules if "torch" in m or "search" in m)
        print("ok", len({modules!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")
