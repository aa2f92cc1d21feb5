"""Measured latency of a bundle's model on this machine, recorded in its card.

The key names what was measured — `<backend>/<device>/<precision>/b<batch>` — and the value carries
p50/p90 and the device, so a card gathers latencies from several machines (server, Jetson) side by side.

`measure_precisions` (`mnet bundle bench --all`) times every precision the bundle has on one backend
and device in interleaved rounds (the median of the rounds' medians: a loaded machine drifts, and
interleaving spreads the drift over every precision alike), then records in `card.precision_choice` the
fastest one whose recorded accuracy drop vs fp32 (`metrics.<precision>.drop_points`, from `mnet calibrate
int8` and `mnet export fp16 BUNDLE DATA`) is within the tolerance, measured on the very model file the
backend runs (sha256); `--precision auto` runs that one. numpy only, like the rest of the runtime.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from mnet.bundle import PRECISIONS, BundleCard, load_bundle, precision_choice_key, update_card, utc_now
from mnet.errors import ConfigError, MnetError
from mnet.io import sha256_file

__all__ = ["ACCURACY_TOLERANCE_POINTS", "accuracy_drop", "choose_precision", "latency_key", "measure_bundle",
           "measure_precisions"]

# the INT8 target (README, bench/inference.py): at most 0.5 points of accuracy lost vs fp32
ACCURACY_TOLERANCE_POINTS = 0.5
# the stage that records `metrics.<precision>.drop_points` (with the sha256 of the model it measured)
_MEASURED_BY = {"int8": "mnet calibrate int8 BUNDLE DATA", "fp16": "mnet export fp16 BUNDLE DATA"}


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


def accuracy_drop(card: BundleCard, precision: str, model_sha256: str | None = None) -> tuple[float | None, str]:
    """The card's accuracy drop vs fp32 in points for `precision`, or None and why there is none to trust.

    `model_sha256` is that of the ONNX file the measured backend runs (for TensorRT, the one its engine was
    built from): a model changed since its accuracy was measured has no accuracy either. metrics.fp16 was
    measured on model.fp16.onnx (`sha256`), which TensorRT 11 builds from; TensorRT's FP16 builder flag
    (<= 10) and onnxruntime's TensorRT provider run the model.onnx it was converted from (`source_sha256`)
    at half precision, so that file counts as measured too."""
    if precision == "fp32":
        return 0.0, ""
    stage = _MEASURED_BY.get(precision)
    rec = card.metrics.get(precision)
    if not isinstance(rec, dict) or not isinstance(rec.get("drop_points"), (int, float)):
        how = f"measure it with `{stage}`" if stage else "no mnet stage measures it"
        return None, f"no {precision} accuracy in the card (metrics.{precision}.drop_points; {how})"
    measured = {rec.get("sha256")} | ({rec.get("source_sha256")} if precision == "fp16" else set())
    if model_sha256 and rec.get("sha256") and model_sha256 not in measured:
        return None, (f"the {precision} model is not the one metrics.{precision} measured (sha256 differs); "
                      f"measure it again (`{stage}`), or rebuild its engine")
    return float(rec["drop_points"]), ""


def choose_precision(measured: dict[str, float], drops: dict[str, float | None],
                     tolerance: float = ACCURACY_TOLERANCE_POINTS) -> tuple[str, dict[str, str]]:
    """The fastest measured precision whose accuracy drop is known and <= `tolerance` points (fp32, the
    reference, always qualifies; a tie goes to the more precise), and why each other one was excluded."""
    if "fp32" not in measured:
        raise ConfigError("choose_precision: fp32 must be measured (it is the reference)")
    excluded = {}
    for p in measured:
        d = drops.get(p)
        if p != "fp32" and d is None:
            excluded[p] = "no accuracy recorded"
        elif p != "fp32" and d > tolerance:
            excluded[p] = f"accuracy drop {d:.2f} points > tolerance {tolerance:g}"
    eligible = [p for p in measured if p not in excluded]
    return min(eligible, key=lambda p: (measured[p], PRECISIONS.index(p))), excluded


def _model_sha256(net) -> str | None:
    info = getattr(net, "info", None)  # TensorRT: the ONNX file the engine was built from
    if info is not None:
        return info.onnx_sha256
    path = getattr(net, "model_path", None)
    return sha256_file(path) if path is not None else None


def _block_ms(net, x: np.ndarray, min_reps: int, min_seconds: float) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        net.infer(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_precisions(bundle: str | os.PathLike, backend: str = "onnxruntime", batch: int = 1, *,
                       threads: int | None = None, rounds: int = 5, min_seconds: float = 1.0, warmup: int = 10,
                       min_reps: int = 20, tolerance: float = ACCURACY_TOLERANCE_POINTS,
                       record: bool = True) -> tuple[str, dict]:
    """Time every precision the bundle has on `backend` here, side by side, and choose one.

    Each of `rounds` rounds times every precision for `min_seconds / rounds` (at least `min_reps` runs)
    in a rotated order; a precision's p50 is the median of its round medians. Returns the
    `precision_choice` key ("<backend>/<device>") and entry; `record` writes it, and one `latency`
    entry per precision, into the card in one atomic update.
    """
    from mnet.runtime.backends import backend_device, open_backend

    if batch < 1:
        raise ConfigError(f"--batch {batch}: expected >= 1")
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: expected >= 1")
    if not tolerance >= 0:
        raise ConfigError(f"--tolerance {tolerance}: expected accuracy points >= 0")
    b = load_bundle(bundle)
    x = np.random.default_rng(0).standard_normal((batch, 3, *b.card.input_hw)).astype(np.float32)
    nets, unavailable = {}, {}
    try:
        nets["fp32"] = open_backend(b, backend, "fp32", threads=threads)  # the reference: failing here raises
        name = nets["fp32"].name  # backend "auto" resolves once, so every precision runs on the same one
        for p in PRECISIONS[1:]:
            try:
                nets[p] = open_backend(b, name, p, threads=threads)
            except MnetError as e:
                unavailable[p] = str(e)
        for net in nets.values():
            for _ in range(warmup):
                net.infer(x)
        order, times = list(nets), {p: [] for p in nets}
        for r in range(rounds):
            for p in order[r % len(order):] + order[:r % len(order)]:
                times[p].append(_block_ms(nets[p], x, min_reps, min_seconds / rounds))
        device = backend_device(nets["fp32"])
        shas = {p: _model_sha256(net) for p, net in nets.items()}
        providers = {p: tuple(net.providers) for p, net in nets.items()}
    finally:
        for net in nets.values():
            net.close()
    rounds_ms = {p: [statistics.median(t) for t in ts] for p, ts in times.items()}
    measured = {p: statistics.median(v) for p, v in rounds_ms.items()}
    drops, ineligible = {}, {}
    for p in measured:
        drops[p], why = accuracy_drop(b.card, p, shas[p])
        if why:
            ineligible[p] = why
    chosen, excluded = choose_precision(measured, drops, tolerance)
    ineligible.update({p: why for p, why in excluded.items() if p not in ineligible})
    key = precision_choice_key(name, device)
    entry = {"backend": name, "device": device, "chosen": chosen, "measured": measured,
             "rounds_ms": rounds_ms, "accuracy_drop": drops, "tolerance_points": tolerance,
             "ineligible": ineligible, "unavailable": unavailable, "batch": batch, "threads": threads or "default",
             "rounds": rounds, "host": platform.node(), "measured_at": utc_now()}
    if record:
        latency = {}
        for p, ts in times.items():
            flat = [t for block in ts for t in block]
            latency[latency_key(name, providers[p], p, batch)] = {
                "p50_ms": measured[p], "p90_ms": float(np.percentile(flat, 90)), "n": len(flat),
                "device": ", ".join(providers[p]) or platform.processor(), "host": platform.node(),
                "threads": threads or "default", "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        update_card(b.path, latency=latency, precision_choice={key: entry})
    return key, entry
