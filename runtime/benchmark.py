"""Measured latency of a bundle's model on this machine, recorded in its card.

The key names what was measured — `<backend>/<device>/<precision>/b<batch>` — and the value carries
p50/p90 and the device, so a card gathers latencies from several machines (server, Jetson) side by side.
numpy only, like the rest of the runtime.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from mnet.bundle import load_bundle, update_card
from mnet.errors import ConfigError

__all__ = ["measure_bundle", "latency_key"]


def latency_key(backend: str, providers: tuple[str, ...], precision: str, batch: int) -> str:
    device = "cuda" if any("CUDA" in p or "Tensorrt" in p or "TensorRT" in p for p in providers) else "cpu"
    if backend == "tensorrt":
        device = "cuda"
    return f"{backend}/{device}/{precision}/b{batch}"


def measure_bundle(bundle: str | os.PathLike, backend: str = "onnxruntime", precision: str = "fp32",
                   batch: int = 1, *, threads: int | None = None, warmup: int = 10, min_reps: int = 50,
                   min_seconds: float = 1.0, record: bool = True) -> tuple[str, dict]:
    """Time `infer` on random input of the bundle's shape; optionally store it in the card."""
    from mnet.runtime.backends import open_backend

    if batch < 1:
        raise ConfigError(f"--batch {batch}: expected >= 1")
    b = load_bundle(bundle)
    x = np.random.default_rng(0).standard_normal((batch, 3, *b.card.input_hw)).astype(np.float32)
    with open_backend(b, backend, precision, threads=threads) as net:
        for _ in range(warmup):
            net.infer(x)
        times = []
        start = time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            net.infer(x)
            times.append((time.perf_counter() - t0) * 1e3)
        key = latency_key(net.name, tuple(net.providers), precision, batch)
        value = {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
                 "n": len(times), "device": ", ".join(net.providers) or platform.processor(),
                 "host": platform.node(), "threads": threads or "default", "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if record:
        update_card(Path(b.path), latency={key: value})
    return key, value
