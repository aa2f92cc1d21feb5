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
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from mnet.bundle import Bundle, load_bundle, update_card, utc_now
from mnet.data import Dataset
from mnet.errors import ConfigError, DataError, ExportError
from mnet.export.onnx import set_card_metadata
from mnet.export.qdq import tensorrt_qdq_problems
from mnet.export.samples import sample_split
from mnet.io import atomic_path, sha256_file
from mnet.metrics import compute_metrics
from mnet.runtime.backends import OnnxRuntimeBackend
from mnet.runtime.evaluate import predict_images

__all__ = ["ACTIVATIONS", "METHODS", "MIN_CALIBRATION_IMAGES", "Int8Report", "calibrate_int8", "qdq_node_counts"]

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("int8", "uint8")
MIN_CALIBRATION_IMAGES = 300
_KEEP_PROBLEMS = 5  # TensorRT problems kept in the card (a uint8 model has one per Q/DQ node)

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


def calibrate_int8(bundle: Bundle | str | os.PathLike, data_root: str | os.PathLike, samples: int = 512,
                   method: str = "minmax", per_channel: bool = True, *, activations: str = "int8",
                   eval_split: str = "dev", batch_size: int = 32, seed: int = 0, on_stage: Stage = None) -> Int8Report:
    """Quantise the bundle's model.onnx with training images and write model.int8.onnx (atomically)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
    dataset = Dataset(data_root)
    dev = dataset.load(eval_split, pre)
    if not dev.labelled or tuple(dev.classes) != tuple(b.card.classes):
        raise DataError(f"{data_root}: split '{eval_split}' must be labelled with the model's classes "
                        f"{list(b.card.classes)}")
    measured, warnings = {eval_split: dev}, []
    if eval_split != "test" and "test" in dataset.splits():
        # an extra figure: a test split that cannot be read (an empty or broken list) is reported, not
        # fatal, and an unlabelled one (a release test set) is simply not scored
        try:
            test = dataset.load("test", pre)
        except DataError as e:
            warnings.append(f"test split not measured: {e}")
            log.warning(warnings[-1])
        else:
            if test.labelled and tuple(test.classes) == tuple(b.card.classes):
                measured["test"] = test
    if len(images) < MIN_CALIBRATION_IMAGES:
        warnings.append(f"only {len(images)} calibration images (asked for {samples}); "
                        f"{MIN_CALIBRATION_IMAGES}+ give stable activation ranges")
        log.warning(warnings[-1])

    with tempfile.TemporaryDirectory(prefix="mnet-int8-") as tmp:
        stage(f"calibrating ({method}, {len(images)} images)")
        prepped, quantized = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # shape inference + graph optimisation (folds what BN the exporter left, fuses) before quantising
        quant_pre_process(str(b.onnx_path), str(prepped))
        reader = _Reader(pre.normalize(images), b.card.batch or batch_size, b.card.input_name,
                         fixed=b.card.batch is not None, equal=method != "minmax")
        # onnxruntime's histogram calibrators print() their progress; only the CLI may write to stdout
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            quantize_static(
                str(prepped), str(quantized), reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                # biases stay float: onnxruntime's default int32 biases are DequantizeLinear inputs TensorRT
                # refuses (it dequantises only int8); its CPU fusions (QLinearConv, QGemm) still form
                extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True,
                               "QuantizeBias": False},
            )
        if chatter.getvalue().strip():
            log.debug("onnxruntime calibration: %s", chatter.getvalue().strip())
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
        sha256=sha256_file(b.int8_path), seconds=time.time() - t0, warnings=tuple(warnings), by_split=by_split)
    update_card(b.path, metrics={"int8": report.to_json()})
    log.info("int8: %s accuracy %.4f (fp32 %.4f) on %s", b.int8_path, m8.accuracy, m32.accuracy, eval_split)
    return report


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
