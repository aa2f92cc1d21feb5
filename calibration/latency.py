"""Latency tables measured on the target: `mnet calibrate latency` and `mnet calibrate check`.

Read top to bottom: `measure_table` enumerates every block the search space can contain, times each on the
chosen backend (warm-up, then repeats until the median is stable), writes the table after every entry
(so an interrupted run resumes where it stopped), then fits the predictor's correction on whole random
networks measured end to end. `check_table` measures other random networks and compares.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mnet.arch import Arch, SearchSpace, get_preset
from mnet.errors import BackendError, ConfigError
from mnet.io import write_json
from mnet.latency_table import Entry, LatencyTable, arch_blocks, space_blocks

from mnet.calibration.blocks import arch_model, block_inputs, block_model
from mnet.calibration.predictor import LatencyPredictor, describe_space, error_stats, fit_correction, load_table

__all__ = ["TimingConfig", "make_timer", "measure_table", "measure_archs", "check_table", "device_fingerprint"]

log = logging.getLogger(__name__)
Progress = Optional[Callable[[int, int, str], None]]  # (done, total, what)


class TimingConfig:
    """Warm-up, then repeat until at least `min_reps` runs and `min_seconds` have passed (cap `max_reps`)."""

    def __init__(self, warmup: int = 10, min_reps: int = 30, min_seconds: float = 0.2, max_reps: int = 5000):
        self.warmup, self.min_reps, self.min_seconds, self.max_reps = warmup, min_reps, min_seconds, max_reps


def _time(fn: Callable[[], None], cfg: TimingConfig, sync: Callable[[], None] = lambda: None) -> Entry:
    for _ in range(cfg.warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < cfg.max_reps and (len(times) < cfg.min_reps or time.perf_counter() - start < cfg.min_seconds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return Entry(float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), len(ms))


# --- timers: one per backend, each times a block key or a whole Arch ---------------------------------
class _OrtTimer:
    """onnxruntime: each block is its own tiny ONNX model and session."""

    def __init__(self, device: str, precision: str, threads: int | None, batch: int, cfg: TimingConfig):
        import onnxruntime as ort

        if precision == "fp16":
            raise ConfigError("--precision fp16 is not supported with --backend onnxruntime; use fp32 or int8 "
                              "(or --backend tensorrt for fp16)")
        self.ort, self.precision, self.threads, self.batch, self.cfg = ort, precision, threads, batch, cfg
        avail = ort.get_available_providers()
        if device == "cuda":
            if "CUDAExecutionProvider" not in avail:
                raise BackendError("--device cuda: onnxruntime has no CUDA provider here; install onnxruntime-gpu")
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        self.version = ort.__version__

    def _session(self, model):
        if self.precision == "int8":
            model = _quantize_qdq(model, self.batch)
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        sess = self.ort.InferenceSession(model.SerializeToString(), so, providers=self.providers)
        got = sess.get_providers()
        if self.providers[0] not in got:
            raise BackendError(f"onnxruntime did not give {self.providers[0]} (got {got}); check the CUDA install")
        return sess

    def _run(self, sess, shapes: dict[str, tuple]) -> Entry:
        rng = np.random.default_rng(0)
        feed = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        return _time(lambda: sess.run(None, feed), self.cfg)

    def block(self, key: str) -> Entry:
        return self._run(self._session(block_model(key, self.batch)), block_inputs(key, self.batch))

    def arch(self, arch: Arch) -> Entry:
        return self._run(self._session(arch_model(arch, self.batch)), {"input": (self.batch, 3, *arch.input_hw)})


def _quantize_qdq(model, batch: int):
    """Static QDQ quantisation of a block (random calibration data: only the timing matters)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}

    class _Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.items = iter([{n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
                               for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return onnx.load(dst)


class _TorchTimer:
    """PyTorch eager: each block is the same nn.Module the model uses."""

    def __init__(self, device: str, precision: str, threads: int | None, batch: int, cfg: TimingConfig):
        import torch

        if precision == "int8":
            raise ConfigError("--precision int8 is not supported with --backend torch; use onnxruntime or tensorrt")
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda: CUDA is not available to torch here; use --device cpu")
        if precision == "fp16" and device != "cuda":
            raise ConfigError("--precision fp16 with --backend torch needs --device cuda")
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.batch, self.cfg = torch, batch, cfg
        self.device = torch.device(device)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.version = torch.__version__
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def _run(self, fn, shapes) -> Entry:
        torch = self.torch
        xs = [torch.randn(s, device=self.device, dtype=self.dtype) for s in shapes.values()]
        with torch.inference_mode():
            return _time(lambda: fn(*xs), self.cfg, self.sync)

    def block(self, key: str) -> Entry:
        from mnet.calibration.blocks import _parse
        from mnet.search.ops import Head, SepConv, Stem, pool_to

        kind, f = _parse(key)
        if kind == "stem":
            m = Stem(f["c"], f["s"])
        elif kind == "op":
            m = SepConv(f["c"], f["k"], f["d"], (f["h"], f["w"]))
        elif kind == "head":
            m = Head(f["c"], f["n"])
        else:
            m = None
        if m is not None:
            m = m.to(self.device, self.dtype).eval()
            return self._run(m, block_inputs(key, self.batch))
        fn = (lambda x: pool_to(x, 1)) if kind == "pool" else (lambda x, y: x + y)
        return self._run(fn, block_inputs(key, self.batch))

    def arch(self, arch: Arch) -> Entry:
        from mnet.search.model import MNet

        m = MNet(arch).to(self.device, self.dtype).eval()
        return self._run(m, {"input": (self.batch, 3, *arch.input_hw)})


class _TensorRTTimer:
    """TensorRT: each block is built into an engine on this device and timed with execute_async_v3."""

    def __init__(self, device: str, precision: str, threads: int | None, batch: int, cfg: TimingConfig):
        from mnet.export.tensorrt import import_tensorrt

        self.trt = import_tensorrt()
        self.precision, self.batch, self.cfg = precision, batch, cfg
        self.version = self.trt.__version__

    def _run(self, model) -> Entry:
        from mnet.export.tensorrt import time_onnx_model

        if self.precision == "int8":
            model = _quantize_qdq(model, self.batch)
        return time_onnx_model(model, self.precision, self.batch, lambda fn, sync: _time(fn, self.cfg, sync))

    def block(self, key: str) -> Entry:
        return self._run(block_model(key, self.batch))

    def arch(self, arch: Arch) -> Entry:
        return self._run(arch_model(arch, self.batch))


_TIMERS = {"onnxruntime": _OrtTimer, "torch": _TorchTimer, "tensorrt": _TensorRTTimer}


def make_timer(backend: str, device: str = "cpu", precision: str = "fp32", threads: int | None = None,
               batch: int = 1, cfg: TimingConfig | None = None):
    if backend not in _TIMERS:
        raise ConfigError(f"--backend {backend!r}: choose onnxruntime, torch or tensorrt")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: choose cpu or cuda")
    if precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"--precision {precision!r}: choose fp32, fp16 or int8")
    if batch < 1:
        raise ConfigError(f"--batch {batch}: expected >= 1")
    return _TIMERS[backend](device, precision, threads, batch, cfg or TimingConfig())


def device_fingerprint(backend: str, device: str, timer, threads: int | None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fp = {"cpu": cpu, "machine": platform.machine(), "os": platform.platform(terse=True),
          "cpu_count": os.cpu_count(), "threads": threads or "default", "device": device,
          "backend": backend, "backend_version": timer.version}
    if device == "cuda" or backend == "tensorrt":
        fp["gpu"] = _gpu_name()
    return fp


def _gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        from mnet.export.tensorrt import gpu_name

        return gpu_name()
    except Exception:  # best effort: the fingerprint is informative, not a key
        return "unknown GPU"


def _fit_archs(space: SearchSpace, k: int, seed: int) -> list[Arch]:
    rng = random.Random(seed)
    return [space.sample(rng) for _ in range(k)]


def measure_archs(timer, archs: list[Arch], progress: Progress = None) -> list[float]:
    out = []
    for i, a in enumerate(archs, 1):
        out.append(timer.arch(a).p50_ms)
        if progress:
            progress(i, len(archs), "network")
    return out


def measure_table(space: str | SearchSpace, out: str | os.PathLike, *, backend: str = "onnxruntime",
                  device: str = "cpu", precision: str = "fp32", threads: int | None = None, batch: int = 1,
                  fit_archs: int = 10, seed: int = 0, timing: TimingConfig | None = None,
                  progress: Progress = None) -> LatencyTable:
    """Measure (or finish measuring) the latency table of `space` (a preset name or a `build_space` space)
    on this machine and write it to `out`."""
    space = get_preset(space) if isinstance(space, str) else space
    out = Path(out)
    timer = make_timer(backend, device, precision, threads, batch, timing)
    table = LatencyTable(device=device_fingerprint(backend, device, timer, threads), backend=backend,
                         precision=precision, batch=batch, space=space.to_json())
    if out.exists():
        old = load_table(out)
        if old.space != table.space:
            raise ConfigError(f"{out} holds a table for search space {describe_space(old.search_space())}, not "
                              f"{describe_space(space)}; pass the space options it was measured with, a new --out, "
                              "or delete it")
        same = (old.backend, old.precision, old.batch, old.device) == \
               (table.backend, table.precision, table.batch, table.device)
        if not same:
            raise ConfigError(f"{out} holds a table for another target ({old.fingerprint}); "
                              "pass a new --out or delete it")
        table = replace(table, entries=dict(old.entries))
        log.info("resuming %s: %d entries already measured", out, len(old.entries))

    keys = space_blocks(space)
    todo = [k for k in keys if k not in table.entries]
    entries = dict(table.entries)
    for i, key in enumerate(todo, 1):
        entries[key] = timer.block(key)
        table = replace(table, entries=entries)
        write_json(out, table.to_json())  # every entry lands on disk: an interrupted run resumes here
        if progress:
            progress(len(keys) - len(todo) + i, len(keys), key)

    # the correction: whole networks end to end on the same backend
    archs = _fit_archs(space, fit_archs, seed)
    predictor = LatencyPredictor(table)
    raw = [predictor.raw_ms(a) for a in archs]
    measured = measure_archs(timer, archs, progress)
    table = replace(table, correction=fit_correction(raw, [len(arch_blocks(a)) for a in archs], measured),
                    complete=True)
    write_json(out, table.to_json())
    return table


def check_table(path: str | os.PathLike, archs: int = 50, seed: int = 1, plot: str | os.PathLike | None = None,
                threads: int | None = None, timing: TimingConfig | None = None,
                progress: Progress = None) -> dict:
    """Measure `archs` random networks end to end and compare with the table's predictions."""
    predictor = LatencyPredictor.from_file(path)
    table = predictor.table
    space = SearchSpace.from_json(table.space)
    device = table.device.get("device", "cpu")
    if threads is None and isinstance(table.device.get("threads"), int):
        threads = table.device["threads"]
    timer = make_timer(table.backend, device, table.precision, threads, table.batch, timing)
    here = device_fingerprint(table.backend, device, timer, threads)
    if (here.get("cpu"), here.get("gpu"), here.get("backend_version")) != \
            (table.device.get("cpu"), table.device.get("gpu"), table.device.get("backend_version")):
        log.warning("checking on a different machine or library version than the table was measured on")
    sample = _fit_archs(space, archs, seed + 7919)  # not the fit set
    predicted = [predictor.predict_ms(a) for a in sample]
    measured = measure_archs(timer, sample, progress)
    stats = error_stats(predicted, measured)
    result = {"table": str(path), "fingerprint": table.fingerprint, **stats,
              "points": [{"predicted_ms": p, "measured_ms": m} for p, m in zip(predicted, measured)]}
    if plot:
        _scatter(plot, predicted, measured, stats, table.fingerprint)
        result["plot"] = str(plot)
    return result


def _scatter(path, predicted, measured, stats, title) -> None:
    from mnet.io import atomic_path
    from mnet.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(measured, predicted, s=14)
    lo, hi = min(min(measured), min(predicted)), max(max(measured), max(predicted))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.set_title(f"τ={stats['kendall_tau']:.3f}  MAPE={stats['mape']:.1%}\n{title}", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
