"""fp32 → fp16 ONNX conversion with fp32 inputs and outputs, and what half precision costs in accuracy.

    model.onnx --convert_to_fp16--> model.fp16.onnx --(DATA)--> card metrics.fp16 (drop vs fp32, sha256)

TensorRT 11 removed the FP16 builder flag: a network runs in half precision only if the ONNX says so.
NVIDIA points to ModelOpt AutoCast; onnxconverter-common's float16 also does it, but both are heavy
extra dependencies for what an MNet graph needs (Conv, Relu, Add, AveragePool, ReduceMean, Gemm).
This converts every float32 tensor of the graph to float16 and adds one Cast after the input and one
before the output, so callers keep feeding and reading float32. Weights are clipped to the fp16 range.
Ops whose float inputs must stay float32 by the ONNX spec (e.g. Resize scales) are refused by name.

`export_fp16` (`mnet export fp16 BUNDLE DATA`) writes model.fp16.onnx and, given a dataset, measures
fp32 and fp16 accuracy on its dev split (and a labelled test split) into `metrics.fp16`, with the sha256
of the fp16 file and of the model.onnx it came from, so `mnet bundle bench --all` can choose fp16 within
the accuracy tolerance and refuses a measurement of another file. onnxruntime's CPU provider runs a
half-precision graph in float32 throughout (it casts the weights up and drops the casts between ops, so
only the weights are ever rounded); the accuracy is therefore measured on `cpu_reference(half)`, the same
graph with every op computed in float32 between float16 tensors: fp16 weights, fp16 activations after
every op, float32 arithmetic within an op (as TensorRT's fp16 kernels accumulate).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mnet.bundle import Bundle, load_bundle, update_card, utc_now
from mnet.errors import ExportError

__all__ = ["Fp16Report", "convert_to_fp16", "cpu_reference", "export_fp16", "write_fp16"]

log = logging.getLogger(__name__)

_FP16_MAX = float(np.finfo(np.float16).max)
# Ops with a float input that the ONNX spec pins to float32 (converting it would make an invalid model).
_UNSUPPORTED = {"Resize", "Upsample", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                "EyeLike", "Multinomial", "Bernoulli"}
_MEASURED_WITH = ("onnxruntime CPU, cpu_reference(model.fp16.onnx): fp16 weights and activations, "
                 "float32 arithmetic within each op")


def _to_fp16(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    return numpy_helper.from_array(np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16), t.name)


def _retype(vi: onnx.ValueInfoProto) -> None:
    if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A half-precision copy of `model` whose graph inputs and outputs stay float32."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    bad = sorted({n.op_type for n in g.node if n.op_type in _UNSUPPORTED})
    if bad:
        raise ExportError(f"fp16 conversion does not handle {', '.join(bad)}; build fp32 or int8 instead")

    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_to_fp16(t))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_to_fp16(a.t))  # Constant / ConstantOfShape values
            elif a.type == onnx.AttributeProto.GRAPH:
                raise ExportError(f"fp16 conversion does not handle subgraphs ({node.op_type} {node.name})")
    del g.value_info[:]  # stale float32 annotations; shape inference below rebuilds them

    # Keep the interface float32: input -> Cast -> (fp16 graph) -> Cast -> output.
    inits = {t.name for t in g.initializer}
    head, tail = [], []
    for vi in g.input:
        if vi.name in inits or vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{vi.name}__fp16"
        for node in g.node:
            node.input[:] = [inner if x == vi.name else x for x in node.input]
        head.append(helper.make_node("Cast", [vi.name], [inner], name=f"{vi.name}_to_fp16", to=TensorProto.FLOAT16))
    for vi in g.output:
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{vi.name}__fp16"
        for node in g.node:
            node.output[:] = [inner if x == vi.name else x for x in node.output]
            node.input[:] = [inner if x == vi.name else x for x in node.input]
        tail.append(helper.make_node("Cast", [inner], [vi.name], name=f"{vi.name}_to_fp32", to=TensorProto.FLOAT))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)

    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"fp16 conversion produced an invalid model: {str(e)[:400]}") from None
    return m


def cpu_reference(half: onnx.ModelProto) -> onnx.ModelProto:
    """`half` (from `convert_to_fp16`) with every op computed in float32 between float16 tensors.

    An explicit Cast up before each op and down after it, which onnxruntime keeps (it only folds away the
    casts it inserts itself), so its CPU provider rounds every activation to fp16 as a device would. The
    result is a float32-arithmetic model whose numbers are those of fp16 storage; only for measuring."""
    m = onnx.shape_inference.infer_shapes(half, strict_mode=True)
    g = m.graph
    inits = {t.name for t in g.initializer}
    half_tensors = {vi.name for vi in (*g.value_info, *g.input, *g.output)
                    if vi.type.tensor_type.elem_type == TensorProto.FLOAT16} - inits
    for i, t in enumerate(g.initializer):  # fp16 values, float32 storage: exact
        if t.data_type == TensorProto.FLOAT16:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for vi in g.input:  # an initializer also listed as an input (older exporters) is float32 now too
        if vi.name in inits and vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = []
    for node in g.node:
        if node.op_type == "Cast":  # the interface casts (and the model's own) stay as they are
            nodes.append(node)
            continue
        for k, x in enumerate(node.input):
            if x in half_tensors:
                nodes.append(helper.make_node("Cast", [x], [f"{x}__up{len(nodes)}"], to=TensorProto.FLOAT))
                node.input[k] = nodes[-1].output[0]
        down = []
        for k, y in enumerate(node.output):
            if y in half_tensors:
                node.output[k] = f"{y}__f32"
                down.append(helper.make_node("Cast", [node.output[k]], [y], to=TensorProto.FLOAT16))
        nodes += [node, *down]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    try:
        onnx.checker.check_model(m, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"fp16 reference graph is invalid: {str(e)[:400]}") from None
    return m


def write_fp16(bundle: Bundle | str | os.PathLike) -> Path:
    """Convert the bundle's model.onnx and write model.fp16.onnx atomically; returns its path."""
    from mnet.io import atomic_path

    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    half = convert_to_fp16(onnx.load(str(b.onnx_path)))
    with atomic_path(b.fp16_path) as tmp:
        onnx.save_model(half, str(tmp), save_as_external_data=False)
    return b.fp16_path


@dataclass(frozen=True)
class Fp16Report:
    """What `export_fp16` wrote and, given data, measured (then also the card's `metrics.fp16`)."""

    path: str
    sha256: str  # of model.fp16.onnx as written: the file the accuracy below is about
    source_sha256: str  # of the model.onnx it was converted from (what TensorRT's FP16 flag builds from)
    seconds: float
    accuracy: float | None = None  # fp16, on split; None: no data given, nothing measured or recorded
    fp32_accuracy: float | None = None
    drop_points: float | None = None  # (fp32 - fp16) accuracy in percentage points
    top1_agreement: float | None = None  # share of the split's images where fp32 and fp16 pick the same class
    split: str = ""
    n: int = 0
    by_split: dict[str, dict[str, float]] = field(default_factory=dict)  # as in metrics.int8.by_split
    warnings: tuple[str, ...] = ()

    @property
    def measured(self) -> bool:
        return self.drop_points is not None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        d["file"] = Path(self.path).name
        d.pop("path")
        d["measured_with"] = _MEASURED_WITH
        d["created"] = utc_now()
        return d


def export_fp16(bundle: Bundle | str | os.PathLike, data_root: str | os.PathLike | None = None, *,
                eval_split: str = "dev", batch_size: int = 64,
                on_stage: Optional[Callable[[str], None]] = None) -> Fp16Report:
    """Write model.fp16.onnx; with `data_root`, measure fp32 vs fp16 accuracy and record `metrics.fp16`."""
    from mnet.io import sha256_file
    from mnet.metrics import compute_metrics
    from mnet.runtime.backends import OnnxRuntimeBackend
    from mnet.runtime.evaluate import labelled_splits, predict_images

    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    t0, stage, warnings = time.time(), on_stage or (lambda _: None), []
    splits = None
    if data_root is not None:  # data first, so a missing split fails before anything is written
        stage("loading images")
        splits = labelled_splits(data_root, b, eval_split, warnings)
    stage("converting to fp16")
    source_sha = sha256_file(b.onnx_path)
    path = write_fp16(b)
    sha = sha256_file(path)
    if splits is None:
        return Fp16Report(str(path), sha, source_sha, time.time() - t0)

    stage("evaluating fp32 and fp16 on " + ", ".join(f"{k} ({len(v)} images)" for k, v in splits.items()))
    pre, by_split = b.card.preprocess, {}
    with tempfile.TemporaryDirectory(prefix="mnet-fp16-") as tmp:
        ref = Path(tmp) / "fp16-reference.onnx"
        onnx.save_model(cpu_reference(onnx.load(str(path))), str(ref))  # from the file whose sha256 is recorded
        # `precision` (left at fp32) only sets the TensorRT provider's flags: the half precision is in the graph
        with OnnxRuntimeBackend(b.onnx_path, "cpu") as fp32, OnnxRuntimeBackend(ref, "cpu") as fp16:
            for name, split in splits.items():
                p32 = predict_images(fp32, split.images, pre, batch_size)
                p16 = predict_images(fp16, split.images, pre, batch_size)
                m32, m16 = (compute_metrics(split.labels, p, b.card.classes) for p in (p32, p16))
                by_split[name] = {"accuracy": m16.accuracy, "fp32_accuracy": m32.accuracy, "n": m16.n}
                if name == eval_split:
                    agree, head = float((p32.argmax(1) == p16.argmax(1)).mean()), (m32, m16)
    m32, m16 = head
    report = Fp16Report(str(path), sha, source_sha, time.time() - t0, accuracy=m16.accuracy,
                        fp32_accuracy=m32.accuracy, drop_points=100.0 * (m32.accuracy - m16.accuracy),
                        top1_agreement=agree, split=eval_split, n=m16.n, by_split=by_split,
                        warnings=tuple(warnings))
    update_card(b.path, metrics={"fp16": report.to_json()})
    log.info("fp16: %s accuracy %.4f (fp32 %.4f) on %s", path, m16.accuracy, m32.accuracy, eval_split)
    return report
