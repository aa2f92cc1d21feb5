"""TensorRT engine build from a bundle, on the device that will run it (TensorRT 8.6 → 11).

    model.onnx / model.fp16.onnx / model.int8.onnx --ONNX parser + profile(1..max_batch)--> engine + sidecar

A fixed-batch bundle, or a --dla build (DLA has no dynamic shapes), gets a static profile (min = opt = max)
that the sidecar records; the runtime pads every batch to it.

One engine per (precision, TensorRT version, GPU): `model.<precision>.<trt>.<gpu>.engine`, written as
TensorRT serialised it (no header bytes, so trtexec, DeepStream and C++ loaders load it as is), beside
its sidecar `<engine>.json` (`mnet.bundle.EngineInfo`, with the engine's size and sha256) that the runtime
checks before loading.

Precision, by what the installed TensorRT offers (feature tests, not version numbers):
- fp32: model.onnx.
- fp16: the FP16 builder flag where it exists (<= 10.x); where it does not (11.x, strongly typed only),
  a half-precision copy of the ONNX (`model.fp16.onnx`, fp32 I/O; `mnet.export.fp16`) built strongly typed.
- int8: model.int8.onnx (explicit Q/DQ from `mnet calibrate int8`), refused before the build unless its
  graph keeps TensorRT's Q/DQ rules (`mnet.export.qdq`); the INT8 flag is set where it exists
  (TensorRT 8.x needs it to honour Q/DQ), strongly typed where it does not. No implicit calibrator:
  deprecated in 10.x and removed in 11.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

from mnet.bundle import FP16_FILE, PRECISIONS, Bundle, EngineInfo, engine_filename, load_bundle, utc_now
from mnet.errors import ConfigError, ExportError
from mnet.io import atomic_path, sha256_file, write_json
from mnet.runtime.backends import cuda_runtime, import_tensorrt

__all__ = ["EngineBuild", "build_engine", "tensorrt_major", "trtexec_command"]

log = logging.getLogger(__name__)


class EngineBuild:
    """What `build_engine` wrote."""

    def __init__(self, path: Path, info: EngineInfo, onnx_path: Path):
        self.path, self.info, self.onnx_path = path, info, onnx_path

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".json")


def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ExportError(f"cannot read the TensorRT version {version!r}") from None


def _check(b: Bundle, precision: str, max_batch: int, workspace_mb: int, dla: int | None) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"--max-batch {max_batch!r}: expected a positive integer")
    if not isinstance(workspace_mb, int) or workspace_mb < 1:
        raise ConfigError(f"--workspace-mb {workspace_mb!r}: expected a positive integer (MiB)")
    if dla is not None and (not isinstance(dla, int) or dla < 0):
        raise ConfigError(f"--dla {dla!r}: expected a DLA core number (0 or 1 on Jetson AGX/NX)")
    if dla is not None and precision == "fp32":
        raise ConfigError("--dla runs fp16 or int8 only; pass --precision fp16 or int8")
    if b.card.batch is not None and max_batch != b.card.batch:
        raise ConfigError(f"{b.path} was exported with a fixed batch of {b.card.batch}; pass --max-batch "
                          f"{b.card.batch} or re-export with --batch dynamic")


def _min_batch(b: Bundle, max_batch: int, dla: int | None) -> int:
    """The profile's smallest batch. DLA has no dynamic dimensions: the profile's min, opt and max must be
    equal (TensorRT Developer Guide, DLA Supported Layers and Restrictions); a dynamic profile fails the
    build, or with GPU fallback runs every layer on the GPU (NVIDIA/TensorRT#2319). So a DLA engine takes
    exactly `max_batch` (the bundle's batch when it has one) and the runtime pads to it."""
    return max_batch if dla is not None else (b.card.batch or 1)


def _int8_source(b: Bundle) -> Path:
    """model.int8.onnx, once its graph keeps TensorRT's Q/DQ rules (`mnet.export.qdq`): TensorRT's parser
    refuses a bad file with an assertion deep in its log; this names the node and the fix first."""
    path = b.int8_path
    if not path.is_file():
        raise ExportError(f"{b.path}: no model.int8.onnx for an int8 engine; make it first: "
                          f"mnet calibrate int8 {b.path} DATA")
    fix = f"recalibrate it (int8 activations, the default): mnet calibrate int8 {b.path} DATA"
    try:
        import onnx

        from mnet.export.qdq import tensorrt_qdq_problems
    except ImportError:  # a Jetson without the onnx package: use the check calibration ran on this very file
        card = b.card.metrics.get("int8") or {}
        if card.get("sha256") != sha256_file(path) or "tensorrt_problems" not in card:
            raise ExportError(f"{path}: the card records no TensorRT check of this file and the onnx package is "
                              f"not installed to run one; pip install onnx, or {fix}") from None
        problems = list(card["tensorrt_problems"])
    else:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 -- not ONNX at all: TensorRT's parser says so, with its own words
            return path
        problems = tensorrt_qdq_problems(model)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportError(f"{path.name} is not loadable by TensorRT: {problems[0]}{more}; {fix}")
    return path


def _fp16_source(b: Bundle) -> Path:
    """model.fp16.onnx, (re)made from model.onnx when missing or older (onnx imported only here and in
    `_int8_source`, which does without it: a Jetson building fp32/fp16-by-flag/int8 engines needs no onnx)."""
    from mnet.export.fp16 import write_fp16

    out = b.fp16_path
    if not out.is_file() or out.stat().st_mtime < b.onnx_path.stat().st_mtime:
        write_fp16(b)
    return out


def _plan(trt, precision: str) -> dict[str, Any]:
    """How this TensorRT builds `precision`: network flags, builder flags, strong typing."""
    flags_enum, builder_flags = trt.NetworkDefinitionCreationFlag, trt.BuilderFlag
    major = tensorrt_major(trt.__version__)
    weak = {"fp16": "FP16", "int8": "INT8"}.get(precision)
    strongly_typed = weak is not None and not hasattr(builder_flags, weak)
    net_flags = 0
    if major < 10 and hasattr(flags_enum, "EXPLICIT_BATCH"):  # ignored (deprecated) from 10 on
        net_flags |= 1 << int(flags_enum.EXPLICIT_BATCH)
    if strongly_typed and hasattr(flags_enum, "STRONGLY_TYPED"):  # 11.x: always strongly typed anyway
        net_flags |= 1 << int(flags_enum.STRONGLY_TYPED)
    return {"major": major, "network_flags": net_flags, "builder_flags": [] if strongly_typed or not weak else [weak],
            "strongly_typed": strongly_typed or major >= 11}


def _make_logger(trt):
    """An ILogger that forwards TensorRT's log to `logging` and keeps errors for the exception message."""
    sev = trt.ILogger.Severity

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Logger()


def build_engine(bundle: Bundle | str | os.PathLike, precision: str = "fp32", max_batch: int = 8,
                 workspace_mb: int = 1024, timing_cache: str | os.PathLike | None = None,
                 dla: int | None = None) -> EngineBuild:
    """Build (or rebuild) the bundle's engine for `precision` on this GPU with this TensorRT."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    _check(b, precision, max_batch, workspace_mb, dla)
    trt = import_tensorrt()
    gpu_name, capability = cuda_runtime().device()
    plan = _plan(trt, precision)
    if precision == "int8":
        source = _int8_source(b)
    elif precision == "fp16" and plan["strongly_typed"]:
        source = _fp16_source(b)
    else:
        source = b.onnx_path

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(plan["network_flags"])
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {source.name}: {'; '.join(errors)[:600]}")

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    else:  # TensorRT < 8.4
        config.max_workspace_size = workspace_mb << 20
    for flag in plan["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    h, w = b.card.input_hw
    name = b.card.input_name
    min_batch = _min_batch(b, max_batch, dla)
    profile = builder.create_optimization_profile()
    # opt = max: a grading loop fills batches when fruit crowd the belt, which is when speed matters
    profile.set_shape(name, (min_batch, 3, h, w), (max_batch, 3, h, w), (max_batch, 3, h, w))
    config.add_optimization_profile(profile)
    if dla is not None:
        if getattr(builder, "num_DLA_cores", 0) <= dla:
            raise ExportError(f"--dla {dla}: this device has {getattr(builder, 'num_DLA_cores', 0)} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache = None
    if timing_cache is not None:
        tc = Path(timing_cache)
        cache = config.create_timing_cache(tc.read_bytes() if tc.is_file() else b"")
        config.set_timing_cache(cache, False)

    log.info("building %s engine from %s (TensorRT %s, %s, batch %d..%d)", precision, source.name, trt.__version__,
             gpu_name, min_batch, max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} could not build the {precision} engine: "
                          f"{'; '.join(logger.errors)[:600] or 'see the TensorRT log (-v)'}")

    path = b.path / engine_filename(precision, trt.__version__, gpu_name)
    # Two files, two renames: the sidecar (naming the engine's size and sha256) is complete under a temp
    # name before the engine is renamed into place, and renamed right after it. A crash in between leaves
    # a new engine beside the old sidecar, which the runtime refuses (their checksums differ).
    with atomic_path(path.with_name(path.name + ".json")) as side_tmp:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(serialized)  # the plan exactly as TensorRT serialised it: no header, no prefix
            info = EngineInfo(
                tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=tuple(capability),
                precision=precision, min_batch=min_batch, opt_batch=max_batch, max_batch=max_batch,
                input_name=name, output_name=b.card.output_name, input_hw=(h, w), onnx_file=source.name,
                onnx_sha256=sha256_file(source), strongly_typed=plan["strongly_typed"], workspace_mb=workspace_mb,
                dla_core=dla, built=utc_now(), mnet_version=_mnet_version(), engine_sha256=sha256_file(tmp),
                engine_bytes=tmp.stat().st_size)
            write_json(side_tmp, info.to_json())
    if cache is not None:
        with atomic_path(timing_cache) as tmp, open(tmp, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    return EngineBuild(path, info, source)


def _mnet_version() -> str:
    from mnet import __version__

    return __version__


def trtexec_command(bundle: Bundle | str | os.PathLike, precision: str = "fp32", max_batch: int = 8,
                    workspace_mb: int = 1024, timing_cache: str | os.PathLike | None = None,
                    dla: int | None = None, trt_version: str | None = None, gpu_name: str | None = None) -> str:
    """The trtexec line equivalent to `build_engine` (to reproduce or profile a build by hand).

    TensorRT version and GPU name default to the installed ones when tensorrt and CUDA are there;
    without them the engine is named generically and the flags are those of TensorRT <= 10.
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    _check(b, precision, max_batch, workspace_mb, dla)
    if trt_version is None or gpu_name is None:
        try:
            trt_version = trt_version or import_tensorrt().__version__
            gpu_name = gpu_name or cuda_runtime().device()[0]
        except Exception:  # no TensorRT/CUDA here: print the portable form
            trt_version = gpu_name = None
    strongly_typed = precision != "fp32" and trt_version is not None and tensorrt_major(trt_version) >= 11
    if precision == "int8":
        source = b.int8_path
    elif precision == "fp16" and strongly_typed:
        source = b.path / FP16_FILE
    else:
        source = b.onnx_path
    engine = (b.path / engine_filename(precision, trt_version, gpu_name) if trt_version and gpu_name
              else b.path / f"model.{precision}.engine")
    h, w = b.card.input_hw
    name, lo = b.card.input_name, _min_batch(b, max_batch, dla)
    args = ["trtexec", f"--onnx={source}", f"--saveEngine={engine}",
            f"--minShapes={name}:{lo}x3x{h}x{w}", f"--optShapes={name}:{max_batch}x3x{h}x{w}",
            f"--maxShapes={name}:{max_batch}x3x{h}x{w}", f"--memPoolSize=workspace:{workspace_mb}"]
    if strongly_typed:
        args.append("--stronglyTyped")
    elif precision != "fp32":
        args.append(f"--{precision}")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    if dla is not None:
        args += [f"--useDLACore={dla}", "--allowGPUFallback"]
    return " ".join(shlex.quote(a) for a in args)
