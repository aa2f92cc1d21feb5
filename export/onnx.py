"""ONNX export with verification: checkpoint → bundle (model.onnx + mnet.json), or nothing.

An export counts as done only after `onnx.checker` (full check) passes and ONNX Runtime reproduces the
PyTorch logits on real training images (or synthetic ones when no dataset is given): max |Δlogit| and
top-1 agreement go into the card, and a miss (|Δlogit| over 1e-4, or a top-1 flip that is not a tie
within that tolerance) raises `ExportError` with no bundle left behind. The
bundle is written into a temporary directory beside the target and renamed into place.

Exporter choice (torch 2.14): the TorchScript exporter (`dynamo=False`) writes opset 17 natively and
folds BatchNorm into the convolutions, in ~0.1 s. The torch.export-based exporter (`dynamo=True`,
torch's default) starts at opset 18, and its own down-conversion to 17 fails on ReduceMean (the axes
input); onnx's C converter then leaves an attribute (`noop_with_empty_axes`) that opset 17 does not
know. opset 17 matters: TensorRT 8.5/8.6 (JetPack 5/6) parse at most opset 17. So `exporter="auto"`
uses TorchScript for opset <= 17 and torch.export for 18+, each falling back to the other (with our
repaired down-conversion) if it fails — e.g. once torch drops the TorchScript exporter.

The graph outputs raw logits ("logits"); backends apply softmax (see `mnet.bundle`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from mnet.bundle import (CARD_FILE, METADATA_KEY, ONNX_FILE, Bundle, BundleCard, load_bundle, utc_now,
                         write_card)
from mnet.errors import ConfigError, ExportError
from mnet.export.samples import sample_split, synthetic_images
from mnet.io import process_umask, sha256_file

__all__ = [
    "EXPORTERS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "export_onnx",
    "has_external_data",
    "read_card_metadata",
    "set_card_metadata",
    "tool_versions",
]

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTERS = ("auto", "torchscript", "dynamo")
_MIN_OPSET = 13  # per-channel QDQ (INT8) needs 13
_DYNAMO_MIN_OPSET = 18
_MAX_DYNAMIC_BATCH = 4096
# Reductions whose `axes` moved from attribute to input in opset 18 (ReduceSum moved in 13).
_REDUCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}

CheckpointLike = Union[str, os.PathLike, Any]


def export_onnx(checkpoint: CheckpointLike, out_bundle: str | os.PathLike, *, opset: int = 17,
                batch: str | int = "dynamic", simplify: bool = False, data_root: str | os.PathLike | None = None,
                parity_images: int = 32, atol: float = 1e-4, overwrite: bool = False, exporter: str = "auto",
                seed: int = 0) -> Bundle:
    """Export a checkpoint (path or `Checkpoint`) to a verified bundle directory and return it.

    batch: "dynamic" (default) or a fixed batch size. data_root: dataset whose train split provides
    the parity images (synthetic images when None). overwrite: replace an existing bundle at
    `out_bundle` (CLI `--force`); a directory that is not a bundle is never replaced.
    """
    from mnet.search.checkpoint import Checkpoint, build_model, load_checkpoint
    from mnet.search.depthwise import use_conv

    fixed_batch = _check_options(opset, batch, parity_images, atol, exporter)
    target = Path(out_bundle)
    _check_target(target, overwrite)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = use_conv(build_model(ckpt))  # the plain conv form, whatever training timed as faster

    # 1. graph
    proto, used = _export_graph(model, ckpt.preprocess.input_hw, opset, fixed_batch, exporter)
    if simplify:
        proto = _simplify(proto)
    _clean(proto)
    _check_io(proto, fixed_batch, len(ckpt.classes))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"exported ONNX does not pass onnx.checker: {str(e)[:500]}") from None

    # 2. parity with PyTorch on real (or synthetic) images
    if data_root is not None:
        images, _ = sample_split(data_root, "train", ckpt.preprocess, parity_images, seed)
        source = f"train split of {Path(data_root).resolve()}"
    else:
        images, source = synthetic_images(ckpt.preprocess, parity_images, seed), "synthetic uniform uint8 images"
    x = ckpt.preprocess.normalize(images)
    parity = _parity(model, proto, x, fixed_batch, atol)
    parity["source"] = source
    if parity["max_abs_logit_diff"] > atol or parity["top1_disagreements"]:
        raise ExportError(
            f"ONNX parity check failed on {parity['images']} images: max |Δlogit| = "
            f"{parity['max_abs_logit_diff']:.3g} (limit {atol:g}), top-1 agreement "
            f"{parity['top1_agreement']:.3f} ({parity['top1_disagreements']} disagreement(s) where PyTorch's top-1 "
            "leads by more than the limit); no bundle written. Try --batch dynamic, another --opset, "
            "or report the model")

    # 3. card, metadata, files
    card = _make_card(ckpt, model, fixed_batch, opset, parity, used, simplify)
    set_card_metadata(proto, card)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _chmod_like_mkdir(tmp)
        onnx.save_model(proto, str(tmp / ONNX_FILE), save_as_external_data=False)
        if has_external_data(onnx.load(str(tmp / ONNX_FILE), load_external_data=False)) or len(os.listdir(tmp)) != 1:
            raise ExportError("the ONNX file references external data; a bundle must be a single file")
        write_card(tmp, card)
        _commit_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s (%s exporter, opset %d, parity max |d| %.2e)", ckpt.path, target, used, opset,
             parity["max_abs_logit_diff"])
    return load_bundle(target)


# --- options and target --------------------------------------------------------------------------
def _check_options(opset: int, batch: str | int, parity_images: int, atol: float, exporter: str) -> int | None:
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not _MIN_OPSET <= opset <= max_opset:
        raise ConfigError(f"--opset {opset!r}: expected {_MIN_OPSET}..{max_opset} "
                          "(17 for TensorRT 8.5/8.6 on JetPack 5/6)")
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if parity_images < 1:
        raise ConfigError(f"parity_images {parity_images!r}: expected >= 1 (32 or more recommended)")
    if not atol > 0:
        raise ConfigError(f"atol {atol!r}: expected > 0")
    if batch == "dynamic":
        return None
    if isinstance(batch, str) and batch.strip().isdigit():
        batch = int(batch)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ConfigError(f"--batch {batch!r}: expected 'dynamic' or a positive integer")
    return batch


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists():
        if not target.parent.is_dir():
            raise ExportError(f"--out {target}: parent directory {target.parent} does not exist")
        return
    if target.is_dir() and not any(target.iterdir()):
        return  # an empty directory made for the bundle
    if not target.is_dir() or not (target / CARD_FILE).is_file():
        raise ExportError(f"--out {target}: exists and is not a bundle (no {CARD_FILE}); "
                          "refusing to replace it, choose another path")
    if not overwrite:
        raise ExportError(f"--out {target}: bundle already exists; pass --force to replace it")


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 directories; a bundle is copied to devices and read by services, so use 0777 & ~umask."""
    os.chmod(path, 0o777 & ~process_umask())


def _commit_dir(tmp: Path, target: Path) -> None:
    """Rename the finished temp directory over `target` (a directory cannot be renamed onto a full one)."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- graph ---------------------------------------------------------------------------------------
def _export_graph(model, input_hw, opset: int, fixed_batch: int | None, exporter: str) -> tuple[onnx.ModelProto, str]:
    import torch

    example = torch.zeros(fixed_batch or 2, 3, *input_hw)  # batch 2: torch.export specialises a size-1 dim
    if exporter == "auto":
        order = ("torchscript", "dynamo") if opset < _DYNAMO_MIN_OPSET else ("dynamo", "torchscript")
    else:
        order = (exporter,)
    errors = []
    for name in order:
        try:
            with torch.no_grad():
                fn = _export_torchscript if name == "torchscript" else _export_dynamo
                return fn(model, example, opset, fixed_batch is None), name
        except ExportError as e:
            errors.append(f"{name}: {e}")
        except Exception as e:  # the exporters raise many types; report them all, the user can pick another
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
        log.info("ONNX export with %s failed: %s", name, errors[-1])
    raise ExportError("torch.onnx.export failed (" + " | ".join(errors) + ")")


def _export_torchscript(model, example, opset: int, dynamic: bool) -> onnx.ModelProto:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Chosen on purpose (module docstring); its deprecation notice is not news to our users.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None)
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(model, example, opset: int, dynamic: bool) -> onnx.ModelProto:
    import torch

    kw: dict[str, Any] = {}
    if dynamic:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=_MAX_DYNAMIC_BATCH)},)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):  # the exporter prints progress; library code must not
        program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=max(opset, _DYNAMO_MIN_OPSET),
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
                                    optimize=True, verbose=False, report=False, **kw)
    log.debug("torch.onnx (dynamo): %s", chatter.getvalue())
    proto = program.model_proto
    if opset < _DYNAMO_MIN_OPSET:
        proto = _downgrade(proto, opset)
    return proto


def _downgrade(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx's version converter, plus the repair it needs for reductions going from 18 to <= 17."""
    from onnx import version_converter

    out = version_converter.convert_version(proto, opset)
    for node in out.graph.node:
        if node.op_type in _REDUCE_18:
            for a in list(node.attribute):
                if a.name == "noop_with_empty_axes":
                    if a.i:  # cannot be expressed before opset 18
                        raise ExportError(f"node {node.name}: {node.op_type} with noop_with_empty_axes=1 needs opset 18")
                    node.attribute.remove(a)
    return out


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:
        raise ExportError("--simplify needs onnxslim: pip install onnxslim (or export without --simplify)") from None
    return onnxslim.slim(proto)


def _clean(proto: onnx.ModelProto) -> None:
    """Drop exporter debug metadata (stack traces with local paths) from nodes: bundles travel."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    proto.doc_string = f"MNet classifier; the bundle card is in metadata_props['{METADATA_KEY}']"


def _check_io(proto: onnx.ModelProto, fixed_batch: int | None, num_classes: int) -> None:
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in proto.graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"exported graph has inputs {[i.name for i in inputs]} and outputs "
                          f"{[o.name for o in proto.graph.output]}; expected ['{INPUT_NAME}'] and ['{OUTPUT_NAME}']")
    dim = inputs[0].type.tensor_type.shape.dim[0]
    if fixed_batch is None and not dim.dim_param:
        raise ExportError(f"exported graph has a fixed batch ({dim.dim_value}) where a dynamic one was asked for")
    if fixed_batch is not None and dim.dim_value != fixed_batch:
        raise ExportError(f"exported graph has batch {dim.dim_param or dim.dim_value}, expected {fixed_batch}")


def has_external_data(proto: onnx.ModelProto) -> bool:
    """Whether any initializer lives in a separate file (a bundle's model must be one file)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def set_card_metadata(proto: onnx.ModelProto, card: BundleCard) -> None:
    """Put the card JSON into the model's metadata_props (replacing an older copy)."""
    keep = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(card.to_json(), sort_keys=True)


def read_card_metadata(path: str | os.PathLike) -> BundleCard:
    """The card embedded in an ONNX file (raises ExportError when there is none)."""
    proto = onnx.load(str(path), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            return BundleCard.from_json(json.loads(p.value))
    raise ExportError(f"{path}: no '{METADATA_KEY}' in metadata_props; not exported by mnet")


# --- parity --------------------------------------------------------------------------------------
def _reference_logits(model, x: np.ndarray) -> np.ndarray:
    """PyTorch logits for NCHW float32 `x` (the side of the parity check we trust)."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).float().numpy()


def _parity(model, proto: onnx.ModelProto, x: np.ndarray, fixed_batch: int | None, atol: float) -> dict[str, Any]:
    import onnxruntime as ort

    # CPU only: the check is about the graph, and CPU kernels are deterministic.
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = _reference_logits(model, x)
    n = len(x)
    if fixed_batch is None:
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        single = sess.run([OUTPUT_NAME], {INPUT_NAME: x[:1]})[0]  # batch 1 must work too
        diff = max(float(np.abs(got - ref).max()), float(np.abs(single - ref[:1]).max()))
        batches = [n, 1]
    else:
        parts = []
        for i in range(0, n, fixed_batch):
            chunk = x[i:i + fixed_batch]
            pad = fixed_batch - len(chunk)
            if pad:  # a fixed-batch graph takes exactly `fixed_batch` images: pad with repeats, trim after
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            parts.append(sess.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0][:fixed_batch - pad])
        got = np.concatenate(parts)
        diff = float(np.abs(got - ref).max())
        batches = [fixed_batch]
    differ = got.argmax(1) != ref.argmax(1)
    # A flip between two logits that PyTorch itself has within the tolerance of each other (2·atol: each
    # may move by atol) is a tie, not an export error; untrained heads are full of them. Any other flip fails.
    top2 = np.sort(ref, axis=1)[:, -2:]
    decisive = differ & (top2[:, 1] - top2[:, 0] > 2 * atol)
    return {"images": n, "max_abs_logit_diff": diff, "top1_agreement": float(1 - differ.mean()),
            "top1_disagreements": int(decisive.sum()), "atol": atol, "batches": batches,
            "provider": "CPUExecutionProvider"}


# --- card ----------------------------------------------------------------------------------------
def tool_versions(**extra: Any) -> dict[str, Any]:
    """Installed versions of the tools that shape an exported model (from package metadata, no imports)."""
    out: dict[str, Any] = {}
    for name, dist in (("mnet", "mnet"), ("torch", "torch"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                       ("onnxruntime-gpu", "onnxruntime-gpu"), ("onnxslim", "onnxslim")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {**out, **extra}


def _make_card(ckpt, model, fixed_batch: int | None, opset: int, parity: dict, exporter: str,
               simplify: bool) -> BundleCard:
    metrics: dict[str, Any] = {"parity": parity}
    dev = ckpt.metrics.get("dev")
    if isinstance(dev, dict) and "accuracy" in dev:
        metrics["dev"] = {"accuracy": dev["accuracy"], "macro_f1": dev.get("macro_f1"), "n": dev.get("n"),
                          "epoch": ckpt.epoch, "from": "checkpoint (PyTorch)"}
    is_mnet = ckpt.kind == "mnet"
    return BundleCard(
        classes=tuple(ckpt.classes),
        preprocess=ckpt.preprocess,
        params=int(sum(p.numel() for p in model.parameters())),
        arch=ckpt.arch if is_mnet else None,
        model_name=None if is_mnet else ckpt.model_name,
        macs=ckpt.arch.macs() if is_mnet and ckpt.arch is not None else None,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        output="logits",
        batch=fixed_batch,
        opset=opset,
        metrics=metrics,
        source={"checkpoint": str(Path(ckpt.path).resolve()), "sha256": sha256_file(ckpt.path), "epoch": ckpt.epoch,
                "kind": ckpt.kind, "dataset": ckpt.raw.get("dataset")},
        tools=tool_versions(opset=opset, exporter=exporter, simplified=simplify),
        created=utc_now(),
    )
