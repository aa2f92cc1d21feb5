"""mnet.io: atomic writes get the mode a plain open() would, without touching the process umask."""

from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest

from mnet import io as mio
from test_export_support import run_python


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux-only")
def test_writes_read_the_umask_without_setting_it(tmp_path, monkeypatch):
    """os.umask can only read the mask by setting it, which races threads creating files: the write helpers
    must never call it (on Linux they read /proc/self/status)."""
    old = os.umask(0o027)
    try:
        def refuse(mask):
            raise AssertionError(f"os.umask({mask:#o}) called while other threads may be creating files")

        monkeypatch.setattr(os, "umask", refuse)
        assert mio.process_umask() == 0o027
        mio.write_json(tmp_path / "a.json", {"x": 1})
        with mio.atomic_path(tmp_path / "b.bin") as t:
            t.write_bytes(b"b")
        for name in ("a.json", "b.bin"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux-only")
def test_importing_mnet_io_does_not_set_the_umask(tmp_path):
    r = run_python(textwrap.dedent(f"""
        import os
        os.umask(0o007)
        calls = []
        real = os.umask
        os.umask = lambda m: (calls.append(m), real(m))[1]
        import mnet.io
        mnet.io.write_text({str(tmp_path / "c.txt")!r}, "c")
        print(calls, oct(os.stat({str(tmp_path / "c.txt")!r}).st_mode & 0o777))
    """))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "0o660"]


def test_without_proc_the_umask_is_read_once_at_import(tmp_path):
    """Where /proc/self/status is missing (macOS, old kernels) the set-and-restore happens once, at import."""
    r = run_python(textwrap.dedent(f"""
        import builtins, os
        os.umask(0o077)
        real_open, real_umask, calls = builtins.open, os.umask, []
        def no_proc(f, *a, **k):
            if str(f).startswith("/proc/"):
                raise FileNotFoundError(f)
            return real_open(f, *a, **k)
        builtins.open = no_proc
        os.umask = lambda m: (calls.append(m), real_umask(m))[1]
        import mnet.io
        n = len(calls)
        mnet.io.write_text({str(tmp_path / "d.txt")!r}, "d")
        print(n, len(calls), oct(mnet.io.process_umask()), oct(os.stat({str(tmp_path / "d.txt")!r}).st_mode & 0o777))
    """))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "2", "0o77", "0o600"]
