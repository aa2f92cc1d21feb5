"""INT8 post-training quantisation of a bundle: ONNX Runtime static quantisation in QDQ format.

    model.onnx --quant_pre_process--> --quantize_static(calibration images)--> model.int8.onnx (QDQ)

Calibration images come from the training split through the card's preprocessing; the fp32 and INT8
models are then both evaluated on the dev split with ONNX Runtime on CPU, and the two accuracies and
the drop go into the card (`metrics.int8`). Fewer than 300 calibration images give unstable activation
ranges: that is warned about (logged, and returned for the CLI to print), not refused.

Data types (measured on mnet-24-32 with ORT 1.32 on an AVX-512 VNNI x86 CPU, see bench/inference.py):
- `activations="int8"` (default): signed int8 symmetric activations, int8 symmetric weights per
  channel (S8S8), float biases. This is what TensorRT takes (it supports only symmetric signed Q/DQ and
  dequantises only int8, so not onnxruntime's default int32 biases), so the same file builds INT8
  engines on a Jetson, and it is ONNX Runtime's recommended default on x86. Whether the written graph
  keeps TensorRT's rules is checked (`mnet.export.qdq`) and recorded as `tensorrt_compatible`.
- `activations="uint8"`: asymmetric uint8 activations (U8S8). ONNX Runtime fuses more of this graph on
  CPU (the ReLU before every depthwise conv folds into the quantisation range), which is faster on some
  architectures; TensorRT cannot build it, and `mnet export tensorrt --precision int8` says so.
Large depthwise kernels dominate MNet's cost and ONNX Runtime's int8 depthwise kernel is not much
faster than its fp32 one, so the INT8 speed-up on CPU depends on the architecture's kernel sizes.

Mixed precision (`keep_fp32`), as TensorRT picks a precision per layer: some nodes run slower at int8
than at fp32 on ONNX Runtime CPU (profiled at width 256, bench/int8_search.py: QLinearAveragePool takes
4-14x the fp32 NCHWc pool; with symmetric activations a ReLU cannot fold into the quantisation range,
so each standalone Relu costs DequantizeLinear + Relu + QuantizeLinear; the 3-channel stem conv gains
nothing at int8 and pays for the layout changes). `keep_fp32="auto"` calibrates once, then tries, one
at a time, leaving each quantisable op type and each Conv node in fp32, times the candidate against the
best so far on this CPU (paired, interleaved rounds, `threads` as deployed) and keeps a candidate only
when it is at least `_MIN_GAIN` faster. An explicit list names op types or node names. A node left in
fp32 is an unquantised node between DQ and Q, which TensorRT builds in higher precision; the graph is
checked as before.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from mnet.bundle import Bundle, load_bundle, update_card, utc_now
from mnet.errors import ConfigError, ExportError
from mnet.export.onnx import set_card_metadata
from mnet.export.qdq import tensorrt_qdq_problems
from mnet.export.samples import sample_split
from mnet.io import atomic_path, sha256_file
from mnet.metrics import compute_metrics
from mnet.runtime.backends import OnnxRuntimeBackend
from mnet.runtime.evaluate import labelled_splits, predict_images

__all__ = ["ACTIVATIONS", "METHODS", "MIN_CALIBRATION_IMAGES", "Int8Report", "calibrate_int8", "parse_keep_fp32",
           "qdq_node_counts"]

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("int8", "uint8")
MIN_CALIBRATION_IMAGES = 300
_KEEP_PROBLEMS = 5  # TensorRT problems kept in the card (a uint8 model has one per Q/DQ node)
_MIN_GAIN = 0.03  # keep_fp32="auto" keeps a node fp32 only when the model gets at least this much faster
_ROUNDS, _REPS = 9, 20  # keep_fp32="auto": interleaved rounds of calls per comparison

Stage = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class Int8Report:
    """What `calibrate_int8` did and measured (also written to the card as `metrics.int8`)."""

    path: str
    accuracy: float  # int8, on eval_split
    fp32_accuracy: float
    drop_points: float  # (fp32 - int8) accuracy in percentage points
    top1_agreement: float  # share of eval images where fp32 and int8 pick the same class
    split: str
    n: int
    calibration_images: int
    method: str
    per_channel: bool
    activations: str
    tensorrt_compatible: bool  # the file passes `tensorrt_qdq_problems` (checked on the written graph)
    sha256: str
    seconds: float
    warnings: tuple[str, ...] = ()
    tensorrt_problems: tuple[str, ...] = ()  # the first few of them, when not tensorrt_compatible
    # {split: {"accuracy", "fp32_accuracy", "n"}}: `split` and, when the dataset has one labelled with the
    # model's classes, the test split too, so `mnet evaluate BUNDLE --split test` can be checked against it
    by_split: dict[str, dict[str, float]] = field(default_factory=dict)
    # standard error of drop_points from the paired per-image outcomes (sqrt(b + c - (b - c)^2 / n) / n, b and c
    # the images only fp32 or only int8 gets right): the drop's noise on n images
    drop_se_points: float = 0.0
    # {"mode": "none" | "auto" | "list", "op_types": [...], "nodes": [...]} and, for auto, the trials and checks
    # with their measured speed-ups and the fp32 / all-int8 / chosen model latencies (ms, `threads` threads)
    keep_fp32: dict[str, Any] = field(default_factory=lambda: {"mode": "none", "op_types": [], "nodes": []})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        d["tensorrt_problems"] = list(self.tensorrt_problems)
        d["format"] = "QDQ"
        d["weights"] = "int8 symmetric, " + ("per channel" if self.per_channel else "per tensor")
        d["file"] = Path(self.path).name
        d.pop("path")
        d["created"] = utc_now()
        return d


def parse_keep_fp32(text: str | Sequence[str] | None) -> str | tuple[str, ...]:
    """"none"/""/None -> (), "auto" -> "auto", "A,B" or a sequence -> ("A", "B") (op types or node names)."""
    if text is None:
        return ()
    if isinstance(text, str):
        if text.strip().lower() in ("", "none"):
            return ()
        if text.strip().lower() == "auto":
            return "auto"
        text = text.split(",")
    names = tuple(t.strip() for t in text if t.strip())
    if "auto" in names:
        raise ConfigError(f"--keep-fp32 {','.join(names)!r}: 'auto' stands alone (or give op types / node names)")
    return names


def calibrate_int8(bundle: Bundle | str | os.PathLike, data_root: str | os.PathLike, samples: int = 512,
                   method: str = "minmax", per_channel: bool = True, *, activations: str = "int8",
                   eval_split: str = "dev", batch_size: int = 32, seed: int = 0,
                   keep_fp32: str | Sequence[str] | None = None, threads: int = 1,
                   on_stage: Stage = None) -> Int8Report:
    """Quantise the bundle's model.onnx with training images and write model.int8.onnx (atomically).

    `keep_fp32`: None/"none" quantises every node ONNX Runtime can; "auto" leaves in fp32 the op types and
    Conv nodes that measure slower at int8 on this CPU with `threads` threads; a list (or "A,B") names op
    types or node names to leave in fp32.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    keep = parse_keep_fp32(keep_fp32)
    if threads < 1:
        raise ConfigError(f"--threads {threads}: expected >= 1")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations {activations!r}: choose int8 (TensorRT-compatible) or uint8 (ORT CPU only)")
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"--samples {samples} / batch size {batch_size}: expected >= 1")
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    pre, t0 = b.card.preprocess, time.time()
    stage = on_stage or (lambda _: None)

    # data first, so a missing split fails before minutes of calibration
    stage("loading images")
    images, _ = sample_split(data_root, "train", pre, samples, seed)
    warnings: list[str] = []
    measured = labelled_splits(data_root, b, eval_split, warnings)
    if len(images) < MIN_CALIBRATION_IMAGES:
        warnings.append(f"only {len(images)} calibration images (asked for {samples}); "
                        f"{MIN_CALIBRATION_IMAGES}+ give stable activation ranges")
        log.warning(warnings[-1])

    with tempfile.TemporaryDirectory(prefix="mnet-int8-") as tmp:
        prepped, quantized = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # shape inference + graph optimisation (folds what BN the exporter left, fuses) before quantising
        quant_pre_process(str(b.onnx_path), str(prepped))
        reader = _Reader(pre.normalize(images), b.card.batch or batch_size, b.card.input_name,
                         fixed=b.card.batch is not None, equal=method != "minmax")
        cache = Path(tmp) / "ranges.json" if _has_cache(quantize_static) else None

        def quantize(out: Path, types: Sequence[str] = (), nodes: Sequence[str] = ()) -> None:
            """One QDQ model leaving `types` and `nodes` in fp32; after the first, ranges come from `cache`."""
            reader.rewind()
            # onnxruntime's histogram calibrators print() their progress; only the CLI may write to stdout
            chatter = io.StringIO()
            with contextlib.redirect_stdout(chatter):
                quantize_static(
                    str(prepped), str(out), reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                      "percentile": CalibrationMethod.Percentile}[method],
                    op_types_to_quantize=[t for t in _quantisable_op_types() if t not in types],
                    nodes_to_exclude=list(nodes),
                    # biases stay float: onnxruntime's default int32 biases are DequantizeLinear inputs TensorRT
                    # refuses (it dequantises only int8); its CPU fusions (QLinearConv, QGemm) still form
                    extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True,
                                   "QuantizeBias": False},
                    **({"calibration_cache_path": str(cache)} if cache else {}),
                )
            if chatter.getvalue().strip():
                log.debug("onnxruntime calibration: %s", chatter.getvalue().strip())

        graph = onnx.load(str(prepped)).graph
        if keep == "auto":
            stage(f"calibrating ({method}, {len(images)} images) and timing int8 vs fp32 per op type and Conv")
            keep_types, keep_nodes, keep_record = _choose_fp32(
                quantize, b.onnx_path, graph, Path(tmp), b.card.input_name,
                (b.card.batch or 1, 3, *b.card.input_hw), threads, stage)
        else:
            keep_types, keep_nodes = _resolve_keep(keep, graph)
            keep_record = {"mode": "list" if keep else "none", "op_types": list(keep_types),
                           "nodes": list(keep_nodes)}
            stage(f"calibrating ({method}, {len(images)} images)")
        quantize(quantized, keep_types, keep_nodes)
        counts = qdq_node_counts(quantized)
        if not counts["QuantizeLinear"] or not counts["DequantizeLinear"]:
            raise ExportError(f"quantisation produced no Q/DQ nodes ({counts}); the model was not quantised")

        stage("evaluating fp32 and int8 on " + ", ".join(f"{k} ({len(v)} images)" for k, v in measured.items()))
        by_split = {}
        with OnnxRuntimeBackend(b.onnx_path, "cpu") as fp32, \
                OnnxRuntimeBackend(quantized, "cpu", precision="int8") as int8:
            for name, split in measured.items():
                p32 = predict_images(fp32, split.images, pre, batch_size)
                p8 = predict_images(int8, split.images, pre, batch_size)
                m32, m8 = (compute_metrics(split.labels, p, b.card.classes) for p in (p32, p8))
                by_split[name] = {"accuracy": m8.accuracy, "fp32_accuracy": m32.accuracy, "n": m8.n}
                if name == eval_split:  # the split the report's headline figures are about
                    agree = float((p32.argmax(1) == p8.argmax(1)).mean())
                    m32_eval, m8_eval = m32, m8
                    drop_se = _paired_drop_se(split.labels, p32.argmax(1), p8.argmax(1))
        m32, m8 = m32_eval, m8_eval

        proto = onnx.load(str(quantized))
        problems = tensorrt_qdq_problems(proto)  # measured on the graph, not assumed from the options
        if problems and activations == "int8":
            warnings.append(f"{b.int8_path.name} is not loadable by TensorRT ({len(problems)} Q/DQ problem(s)): "
                            f"{problems[0]}")
            log.warning(warnings[-1])
        set_card_metadata(proto, b.card)
        with atomic_path(b.int8_path) as t:
            onnx.save_model(proto, str(t), save_as_external_data=False)

    report = Int8Report(
        path=str(b.int8_path), accuracy=m8.accuracy, fp32_accuracy=m32.accuracy,
        drop_points=100.0 * (m32.accuracy - m8.accuracy), top1_agreement=agree, split=eval_split, n=m8.n,
        calibration_images=len(images), method=method, per_channel=per_channel, activations=activations,
        tensorrt_compatible=not problems, tensorrt_problems=tuple(problems[:_KEEP_PROBLEMS]),
        sha256=sha256_file(b.int8_path), seconds=time.time() - t0, warnings=tuple(warnings), by_split=by_split,
        drop_se_points=drop_se, keep_fp32=keep_record)
    update_card(b.path, metrics={"int8": report.to_json()})
    log.info("int8: %s accuracy %.4f (fp32 %.4f) on %s", b.int8_path, m8.accuracy, m32.accuracy, eval_split)
    return report


def _has_cache(quantize_static: Callable) -> bool:
    """Whether this onnxruntime's quantize_static can reuse one calibration (1.32+); older ones recalibrate."""
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _quantisable_op_types() -> list[str]:
    """The op types onnxruntime's QDQ quantiser handles (its own default when none are named)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def _resolve_keep(names: Sequence[str], graph: onnx.GraphProto) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split `names` into op types and node names of `graph`; a name that is neither is a user mistake."""
    types = {n.op_type for n in graph.node}
    nodes = {n.name for n in graph.node}
    unknown = [x for x in names if x not in types and x not in nodes]
    if unknown:
        raise ConfigError(f"--keep-fp32 {','.join(unknown)}: not an op type or node name of the model; its op types "
                          f"are {', '.join(sorted(types))} (or use auto)")
    return tuple(x for x in names if x in types), tuple(x for x in names if x not in types)


def _paired_drop_se(labels: np.ndarray, pred32: np.ndarray, pred8: np.ndarray) -> float:
    """Standard error (points) of fp32 minus int8 accuracy measured on the same images."""
    ok32, ok8 = pred32 == np.asarray(labels), pred8 == np.asarray(labels)
    n, only32, only8 = len(ok32), int((ok32 & ~ok8).sum()), int((ok8 & ~ok32).sum())
    return 100.0 * float(np.sqrt(max(only32 + only8 - (only32 - only8) ** 2 / n, 0.0))) / n if n else 0.0


def _choose_fp32(quantize: Callable, fp32_path: Path, graph: onnx.GraphProto, tmp: Path, input_name: str,
                 shape: tuple[int, ...], threads: int, stage: Callable[[str], None]
                 ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]:
    """Greedy per-layer precision by measurement: candidates are each quantisable op type but Conv (as a
    group) and each Conv node; one is kept fp32 when the model then runs `_MIN_GAIN` faster than the best
    so far, and stays so when quantising it again (the others kept) is slower. Returns (op types, node
    names, the record for the card)."""
    quantisable = set(_quantisable_op_types())
    present = [t for t in dict.fromkeys(n.op_type for n in graph.node) if t in quantisable]
    candidates = [("op_type", t) for t in present if t != "Conv"]
    candidates += [("node", n.name) for n in graph.node if n.op_type == "Conv" and n.name]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    best_path = tmp / "auto_0.onnx"
    quantize(best_path)  # calibrates (once, where onnxruntime can cache the ranges)
    all_int8 = best_path
    types: list[str] = []
    nodes: list[str] = []
    trials = []
    for i, (kind, name) in enumerate(candidates, 1):
        stage(f"int8 vs fp32 {i}/{len(candidates)}: {name}")
        cand = tmp / f"auto_{i}.onnx"
        t_, n_ = types + [name] * (kind == "op_type"), nodes + [name] * (kind == "node")
        quantize(cand, t_, n_)
        if not qdq_node_counts(cand)["QuantizeLinear"]:  # nothing left at int8: not an int8 model
            trials.append({"kind": kind, "name": name, "speedup": None, "kept_fp32": False})
            continue
        gain = _paired_speedup(best_path, cand, input_name, x, threads)  # best ÷ candidate latency
        kept = gain >= 1.0 + _MIN_GAIN
        trials.append({"kind": kind, "name": name, "speedup": round(gain, 4), "kept_fp32": kept})
        if kept:
            types, nodes, best_path = t_, n_, cand
    # one noisy win must not stick: each kept candidate is quantised again (alone) and stays fp32 only if
    # that model is measurably slower than the chosen one
    checks = []
    for i, (kind, name) in enumerate([("op_type", t) for t in types] + [("node", n) for n in nodes], 1):
        stage(f"checking {name}")
        cand = tmp / f"check_{i}.onnx"
        t_, n_ = [t for t in types if t != name], [n for n in nodes if n != name]
        quantize(cand, t_, n_)
        gain = _paired_speedup(best_path, cand, input_name, x, threads)  # < 1: quantising it again is slower
        kept = gain < 1.0
        checks.append({"kind": kind, "name": name, "requantised_speedup": round(gain, 4), "kept_fp32": kept})
        if not kept:
            types, nodes, best_path = t_, n_, cand
    ms = _latencies([fp32_path, all_int8, best_path], input_name, x, threads)
    record = {"mode": "auto", "op_types": types, "nodes": nodes, "threads": threads, "min_gain": _MIN_GAIN,
              "fp32_ms": ms[0], "all_int8_ms": ms[1], "int8_ms": ms[2], "trials": trials, "checks": checks}
    log.info("keep_fp32 auto: op types %s, nodes %s; %.3f ms (all int8 %.3f, fp32 %.3f)", types, nodes, *ms[::-1])
    return tuple(types), tuple(nodes), record


def _sessions(paths: Sequence[Path], threads: int) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]


def _round_medians(paths: Sequence[Path], input_name: str, x: np.ndarray, threads: int) -> list[list[float]]:
    """Per model, the median latency (ms) of `_REPS` calls in each of `_ROUNDS` rounds, models shuffled per
    round so that a noisy neighbour hits them alike."""
    sessions = _sessions(paths, threads)
    for s in sessions:
        for _ in range(5):
            s.run(None, {input_name: x})
    out: list[list[float]] = [[] for _ in sessions]
    for r in range(_ROUNDS):
        order = list(range(len(sessions)))
        random.Random(r).shuffle(order)
        for k in order:
            t = []
            for _ in range(_REPS):
                t0 = time.perf_counter()
                sessions[k].run(None, {input_name: x})
                t.append(time.perf_counter() - t0)
            out[k].append(1e3 * statistics.median(t))
    return out


def _paired_speedup(a: Path, b: Path, input_name: str, x: np.ndarray, threads: int) -> float:
    """Median over rounds of a's latency ÷ b's (> 1: b is faster)."""
    ra, rb = _round_medians([a, b], input_name, x, threads)
    return statistics.median(p / q for p, q in zip(ra, rb))


def _latencies(paths: Sequence[Path], input_name: str, x: np.ndarray, threads: int) -> list[float]:
    return [statistics.median(r) for r in _round_medians(paths, input_name, x, threads)]


def qdq_node_counts(path: str | os.PathLike) -> dict[str, int]:
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {op: ops.count(op) for op in ("QuantizeLinear", "DequantizeLinear")}


class _Reader(CalibrationDataReader):
    """Preprocessed calibration images in batches the model (and the calibrator) accepts.

    A fixed-batch model needs full batches. ORT's histogram calibrators (entropy, percentile) stack
    every batch's activations into one array, so their batches must all have the same size: they get
    the largest batch size <= `batch` that divides the image count, and nothing is dropped.
    """

    def __init__(self, x: np.ndarray, batch: int, input_name: str, fixed: bool, equal: bool):
        if fixed:
            if len(x) < batch:  # repeat images to fill the one batch
                x = np.concatenate([x, x[np.arange(batch - len(x)) % len(x)]])
            x = x[:len(x) - len(x) % batch]  # drop a short tail rather than pad it with repeats
        elif equal:
            batch = max(d for d in range(1, min(batch, len(x)) + 1) if len(x) % d == 0)
        self.batches = [x[i:i + batch] for i in range(0, len(x), batch)]
        self.input_name, self._next = input_name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {self.input_name: self.batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0
