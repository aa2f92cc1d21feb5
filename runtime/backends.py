"""Inference backends: TensorRT engines, ONNX Runtime and PyTorch behind one small interface.

    backend = open_backend("bundle/", backend="auto", precision="fp16")
    probs = backend.infer(nchw_float32)          # (N, C) float32 probabilities

Every backend takes NCHW float32 (the output of `Preprocess`) and returns probabilities: the bundle's
models output logits and `Backend.infer` applies the softmax, so all backends agree by construction.
Batches larger than an engine's profile allows are split; a fixed-batch ONNX model, and a TensorRT engine
with a static profile (fixed-batch bundle, DLA), is fed padded chunks.

Nothing heavy is imported at module level: not torch (a Jetson runtime has none — a test proves it),
not tensorrt, not CUDA. TensorRT device memory goes through cuda-python (`cuda.bindings.runtime`, or
the older `cuda.cudart`), or through torch when only torch is there; both wrappers are a few lines.

TensorRT engines only run on the TensorRT version and GPU that built them. Each engine's sidecar
(`*.engine.json`, `mnet.bundle.EngineInfo`) records both, and `TensorRTBackend` refuses a mismatch
with the command that rebuilds it, instead of failing inside TensorRT. The sidecar also records the
engine's size and sha256: an engine and sidecar from different builds (a crash between the two renames)
are refused too, since the sidecar's batch and shapes size the buffers.

TensorRT API: the name-based tensor API (`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`,
`set_input_shape`, `set_tensor_address`, `execute_async_v3`; TensorRT >= 8.5, the only one in 10 and 11)
and, only where it is absent (8.2/8.4 on JetPack 4.6 and 5.0), the binding API (`execute_async_v2`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import platform
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from mnet.bundle import PRECISIONS, Bundle, EngineInfo, load_bundle, precision_choice_key
from mnet.errors import BackendError, ConfigError, MnetError
from mnet.io import read_json, sha256_file

__all__ = [
    "BACKENDS",
    "TENSORRT_INSTALL_HINT",
    "Backend",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "TorchBackend",
    "backend_device",
    "cuda_runtime",
    "device_label",
    "engine_file_mismatch",
    "engine_mismatch",
    "find_engine",
    "import_tensorrt",
    "open_backend",
    "ort_providers",
    "read_sidecar",
    "softmax",
    "tensorrt_available",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
_TRT_EP, _CUDA_EP, _CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
_PROVIDER_ALIASES = {"cpu": [_CPU_EP], "cuda": [_CUDA_EP, _CPU_EP], "tensorrt": [_TRT_EP, _CUDA_EP, _CPU_EP]}
TENSORRT_INSTALL_HINT = ("TensorRT's Python package is not importable: on a Jetson it comes with JetPack "
                         "(apt install python3-libnvinfer; use a venv with --system-site-packages); on x86 "
                         "pip install tensorrt cuda-python (NVIDIA's index, https://pypi.nvidia.com)")

Providers = Union[str, Sequence[Union[str, tuple]]]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = np.asarray(logits, np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Backend:
    """One model ready to run. Subclasses set the attributes below and implement `_run` (logits)."""

    name: str = ""
    precision: str = "fp32"
    providers: tuple[str, ...] = ()  # what really runs the model (ORT providers, GPU name, torch device)
    input_hw: tuple[int, int] | None = None
    num_classes: int = 0
    max_batch: int | None = None  # largest batch one `_run` may take (None: any)
    exact_batch: int | None = None  # the only batch `_run` takes (fixed-batch ONNX); chunks are padded
    output: str = "logits"  # what `_run` returns: "logits" (softmax applied here) or "probs"

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {', '.join(self.providers) or 'unknown'}"

    def infer(self, x: np.ndarray) -> np.ndarray:
        """NCHW float32 batch → (N, C) float32 probabilities."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or (self.input_hw and tuple(x.shape[2:]) != tuple(self.input_hw)):
            want = f"(N, 3, {self.input_hw[0]}, {self.input_hw[1]})" if self.input_hw else "(N, 3, H, W)"
            raise BackendError(f"{self.name}: input of shape {tuple(x.shape)}, the model takes {want} float32")
        if len(x) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        step = self.exact_batch or self.max_batch or len(x)
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            pad = (self.exact_batch - len(chunk)) if self.exact_batch else 0
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            outs.append(np.asarray(self._run(chunk), np.float32)[:len(chunk) - pad])
        y = np.concatenate(outs)
        return softmax(y) if self.output == "logits" else y

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (device memory, sessions)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- ONNX Runtime --------------------------------------------------------------------------------
def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu") from None
    return onnxruntime


def ort_providers(providers: Providers, available: Sequence[str]) -> tuple[list, bool]:
    """Providers to ask ONNX Runtime for, and whether the first one was asked for explicitly.

    "auto": TensorRT → CUDA → CPU, those this onnxruntime build lists. "cpu" / "cuda" / "tensorrt",
    or a list of provider names (or (name, options) pairs) as ONNX Runtime takes them.
    """
    if isinstance(providers, str):
        if providers == "auto":
            return [p for p in (_TRT_EP, _CUDA_EP, _CPU_EP) if p in available] or [_CPU_EP], False
        if providers not in _PROVIDER_ALIASES:
            raise ConfigError(f"providers {providers!r}: choose auto, cpu, cuda, tensorrt or a list of "
                              f"onnxruntime provider names ({', '.join(available)})")
        want = list(_PROVIDER_ALIASES[providers])
    else:
        want = list(providers)
    first = want[0][0] if isinstance(want[0], tuple) else want[0]
    if first not in available:
        raise BackendError(f"onnxruntime provider {first} is not in this onnxruntime build (it has "
                           f"{', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT or use providers='cpu'")
    return want, True


class OnnxRuntimeBackend(Backend):
    """An ONNX model in ONNX Runtime; `providers` reports what the session really got.

    onnxruntime-gpu lists CUDA (and TensorRT) even where their libraries are missing, and then silently
    runs on CPU; so the providers come from `session.get_providers()`, and an explicit request
    (providers="cuda") that did not come up raises instead of falling back.
    """

    name = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, providers: Providers = "auto", *, precision: str = "fp32",
                 output: str = "logits", threads: int | None = None, trt_cache_dir: str | os.PathLike | None = None):
        ort = _import_onnxruntime()
        model_path = Path(model_path)
        if not model_path.is_file():
            raise BackendError(f"ONNX model not found: {model_path}")
        want, explicit = ort_providers(providers, ort.get_available_providers())
        want = [_with_trt_options(p, precision, trt_cache_dir) for p in want]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3  # a provider that fails to start is reported below, not as C++ log noise
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=want)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"{model_path}: onnxruntime cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
        self.providers = tuple(self.session.get_providers())
        asked = [p[0] if isinstance(p, tuple) else p for p in want]
        if explicit and asked[0] not in self.providers:
            raise BackendError(f"onnxruntime could not start {asked[0]} (the session runs on {', '.join(self.providers)}); "
                               "check the CUDA/cuDNN/TensorRT libraries that your onnxruntime-gpu needs, or use providers='cpu'")
        dropped = [p for p in asked if p not in self.providers]
        if dropped:
            log.warning("onnxruntime could not start %s; running on %s", ", ".join(dropped), ", ".join(self.providers))
        if precision == "fp16" and _TRT_EP not in self.providers:
            raise BackendError("fp16 with onnxruntime needs its TensorRT provider (the session runs on "
                               f"{', '.join(self.providers)}); use fp32/int8, or a TensorRT engine (fp16 accuracy "
                               "is measured on a CPU by `mnet export fp16 BUNDLE DATA`)")
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        shape = list(inp.shape)
        self.input_hw = tuple(shape[2:]) if all(isinstance(v, int) for v in shape[2:]) else None
        self.exact_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.num_classes = out.shape[1] if len(out.shape) == 2 and isinstance(out.shape[1], int) else 0
        self.precision, self.output, self.model_path = precision, output, model_path

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def close(self) -> None:
        self.session = None


def _with_trt_options(provider, precision: str, cache_dir) -> Any:
    """TensorRT provider options: precision flags and an engine cache (a build takes minutes on a Jetson)."""
    if provider != _TRT_EP:
        return provider
    opts: dict[str, Any] = {"trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8"}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
    return (provider, opts)


# --- CUDA memory (cuda-python, or torch) ---------------------------------------------------------
class _CudaPython:
    """Device memory, copies and a stream through cuda-python's runtime bindings."""

    source = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart as rt  # older cuda-python
        self.rt = rt

    def _ok(self, result: Any, what: str) -> Any:
        result = result if isinstance(result, tuple) else (result,)
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA {what} failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    def device(self) -> tuple[str, tuple[int, int]]:
        dev = self._ok(self.rt.cudaGetDevice(), "cudaGetDevice")
        prop = self._ok(self.rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        name = prop.name
        name = bytes(name).split(b"\0")[0].decode() if isinstance(name, (bytes, bytearray)) else str(name)
        return name, (int(prop.major), int(prop.minor))

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr), "cudaFree")

    def stream(self) -> Any:
        return self._ok(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def handle(self, stream: Any) -> int:
        return int(stream)

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync")

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream), "cudaMemcpyAsync")

    def sync(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


class _CudaTorch:
    """The same through torch, for machines with torch but without cuda-python (lazy import)."""

    source = "torch"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise BackendError("torch sees no CUDA device")
        self.torch, self._buffers = torch, {}

    def device(self) -> tuple[str, tuple[int, int]]:
        return self.torch.cuda.get_device_name(), tuple(self.torch.cuda.get_device_capability())

    def malloc(self, nbytes: int) -> int:
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        self._buffers[t.data_ptr()] = t
        return t.data_ptr()

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def stream(self) -> Any:
        return self.torch.cuda.Stream()

    def handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def htod(self, dst: int, src: np.ndarray, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            self._buffers[dst][:src.nbytes].copy_(self.torch.from_numpy(src.reshape(-1).view(np.uint8)))

    def dtoh(self, dst: np.ndarray, src: int, stream: Any) -> None:
        stream.synchronize()
        dst.reshape(-1).view(np.uint8)[:] = self._buffers[src][:dst.nbytes].cpu().numpy()

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def destroy(self, stream: Any) -> None:
        pass


def cuda_runtime():
    """The CUDA wrapper: cuda-python when importable, else torch; BackendError when neither works."""
    errors = []
    for cls in (_CudaPython, _CudaTorch):
        try:
            return cls()
        except (ImportError, MnetError) as e:
            errors.append(f"{cls.source}: {e}")
    raise BackendError("TensorRT needs CUDA device memory through cuda-python (pip install cuda-python) "
                       f"or torch with CUDA; neither works here ({'; '.join(errors)})")


# --- TensorRT ------------------------------------------------------------------------------------
def tensorrt_available() -> bool:
    """Whether `import tensorrt` can work, without importing it (which initialises CUDA)."""
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):  # a broken install, or a module object without a spec
        return False


def import_tensorrt():
    """The tensorrt module, or BackendError with one line on how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise BackendError(TENSORRT_INSTALL_HINT) from None


def read_sidecar(engine_path: str | os.PathLike) -> EngineInfo:
    engine_path = Path(engine_path)
    side = engine_path.with_name(engine_path.name + ".json")
    if not side.is_file():
        raise BackendError(f"{engine_path}: no sidecar {side.name}, so mnet cannot tell which TensorRT and GPU "
                           "built it; build engines with `mnet export tensorrt`")
    try:
        return EngineInfo.from_json(read_json(side, "engine sidecar"))
    except MnetError as e:
        raise BackendError(f"{side}: {e}") from None


def engine_mismatch(info: EngineInfo, trt_version: str, gpu_name: str, capability: tuple[int, int]) -> str | None:
    """Why an engine cannot run here (None when it can): TensorRT engines are tied to both."""
    problems = []
    if info.tensorrt_version != trt_version:
        problems.append(f"TensorRT {info.tensorrt_version} built it, this is TensorRT {trt_version}")
    if info.gpu_name != gpu_name or tuple(info.compute_capability) != tuple(capability):
        problems.append(f"it was built for {info.gpu_name} (sm {info.compute_capability[0]}.{info.compute_capability[1]}), "
                        f"this GPU is {gpu_name} (sm {capability[0]}.{capability[1]})")
    return "; ".join(problems) or None


def engine_file_mismatch(engine_path: str | os.PathLike, info: EngineInfo, data: bytes | None = None) -> str | None:
    """Why the engine file (or its bytes, `data`, when already read) is not the one its sidecar describes:
    None when its size and sha256 match, or when the sidecar predates mnet recording them."""
    size = len(data) if data is not None else Path(engine_path).stat().st_size
    if info.engine_bytes is not None and size != info.engine_bytes:
        why = f"the engine is {size} bytes, its sidecar describes one of {info.engine_bytes}"
    elif info.engine_sha256 is not None and info.engine_sha256 != (
            hashlib.sha256(data).hexdigest() if data is not None else sha256_file(engine_path)):
        why = "the engine's sha256 differs from the one its sidecar records"
    else:
        return None
    # e.g. a crash after the engine was renamed into place and before its sidecar was
    return f"it does not match its sidecar ({why}; an interrupted build?)"


def _rebuild_hint(bundle_dir: Path, precision: str) -> str:
    return f"rebuild it on this device: mnet export tensorrt {bundle_dir} --precision {precision}"


def find_engine(bundle: Bundle, precision: str, trt_version: str, gpu_name: str,
                capability: tuple[int, int]) -> tuple[Path, EngineInfo]:
    """The bundle's engine for `precision` that runs on this TensorRT and GPU, or BackendError saying why not."""
    reasons = []
    for path, info, why in bundle.engines():
        if info is None:
            reasons.append(f"{path.name}: {why}")
            continue
        if info.precision != precision:
            continue
        mismatch = engine_mismatch(info, trt_version, gpu_name, capability) or engine_file_mismatch(path, info)
        if mismatch is None:
            return path, info
        reasons.append(f"{path.name}: {mismatch}")
    what = "; ".join(reasons) if reasons else "there is none"
    raise BackendError(f"{bundle.path}: no {precision} TensorRT engine for TensorRT {trt_version} on {gpu_name} "
                       f"({what}); {_rebuild_hint(bundle.path, precision)}")


class TensorRTBackend(Backend):
    """A serialized TensorRT engine (with its sidecar), run on one CUDA stream with preallocated buffers."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, *, output: str = "logits", check: bool = True):
        trt = import_tensorrt()
        self._cuda = cuda_runtime()
        engine_path = Path(engine_path)
        info = read_sidecar(engine_path)
        gpu_name, capability = self._cuda.device()
        mismatch = engine_mismatch(info, trt.__version__, gpu_name, capability)
        if check and mismatch:
            raise BackendError(f"{engine_path.name} cannot run here: {mismatch}; "
                               f"{_rebuild_hint(engine_path.parent, info.precision)}")
        self.info, self.precision, self.output = info, info.precision, output
        self.providers = (f"{gpu_name} (TensorRT {trt.__version__})",)
        self.input_hw, self.max_batch = tuple(info.input_hw), info.max_batch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        data = engine_path.read_bytes()
        stale = engine_file_mismatch(engine_path, info, data)
        if stale:  # refused even with check=False: the sidecar's batch and shapes size the buffers below
            raise BackendError(f"{engine_path.name}: {stale}; {_rebuild_hint(engine_path.parent, info.precision)}")
        if info.engine_sha256 is None:
            log.warning("%s: its sidecar predates engine checksums, so a stale engine/sidecar pair cannot be "
                        "detected; %s", engine_path.name, _rebuild_hint(engine_path.parent, info.precision))
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"{engine_path}: TensorRT could not deserialize the engine (see its log above); "
                               f"{_rebuild_hint(engine_path.parent, info.precision)}")
        self.context = self.engine.create_execution_context()
        self._v3 = hasattr(self.engine, "num_io_tensors")
        self._tensors = self._io_tensors(trt)
        inputs = [t for t in self._tensors if t["input"]]
        outputs = [t for t in self._tensors if not t["input"]]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{engine_path}: expected one input and one output tensor, got "
                               f"{[t['name'] for t in inputs]} / {[t['name'] for t in outputs]}")
        self._in, self._out = inputs[0], outputs[0]
        self.num_classes = int(self._out["shape"][-1])
        self._engine_path, self._profile = engine_path, self._input_profile()
        lo, hi = self._profile[0][0], self._profile[2][0]
        # A DLA engine or a fixed-batch ONNX takes one batch size only (profile min = max, or a static
        # input): DLA has no dynamic dimensions, "the runtime dimensions must be the same as the dimensions
        # used for building" (TensorRT Developer Guide, DLA Supported Layers and Restrictions). `infer`
        # pads every chunk to it, as for a fixed-batch ONNX in onnxruntime.
        self.max_batch, self.exact_batch = hi, (hi if lo == hi else None)
        self._stream = self._cuda.stream()
        for t in self._tensors:  # buffers for the largest batch the profile allows, allocated once
            per_item = int(np.prod([d for d in t["shape"][1:]])) * t["dtype"].itemsize
            t["ptr"] = self._cuda.malloc(per_item * self.max_batch)

    def _io_tensors(self, trt) -> list[dict[str, Any]]:
        e = self.engine
        if self._v3:
            names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
            return [{"name": n, "index": i, "input": e.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
                     "dtype": np.dtype(trt.nptype(e.get_tensor_dtype(n))), "shape": tuple(e.get_tensor_shape(n))}
                    for i, n in enumerate(names)]
        return [{"name": e.get_binding_name(i), "index": i, "input": e.binding_is_input(i),
                 "dtype": np.dtype(trt.nptype(e.get_binding_dtype(i))), "shape": tuple(e.get_binding_shape(i))}
                for i in range(e.num_bindings)]

    def _input_profile(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes of the engine's profile 0; a static input is its own profile."""
        t = self._in
        if all(d >= 0 for d in t["shape"]):
            return (t["shape"],) * 3
        if self._v3:
            shapes = self.engine.get_tensor_profile_shape(t["name"], 0)
        else:
            shapes = self.engine.get_profile_shape(0, t["index"])
        lo, opt, hi = (tuple(int(d) for d in s) for s in shapes)
        return lo, opt, hi

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        x = np.ascontiguousarray(x, dtype=self._in["dtype"])
        out = np.empty((n, self.num_classes), self._out["dtype"])
        cuda, stream = self._cuda, self._stream
        # The shape first: it is checked against the profile, which also sized the buffers. A refused
        # shape is a False return, not an exception (IExecutionContext.set_input_shape / set_binding_shape),
        # and the context keeps the previous shape, so ignoring it fails or runs the wrong batch.
        if self._v3:
            shaped = self.context.set_input_shape(self._in["name"], tuple(x.shape))
        else:
            shaped = self.context.set_binding_shape(self._in["index"], tuple(x.shape))
        if not shaped:
            lo, _, hi = self._profile
            raise BackendError(f"{self._engine_path.name}: TensorRT refused input shape {tuple(x.shape)} for "
                               f"{self._in['name']!r}; the engine's profile takes {lo} to {hi}"
                               f"{' exactly' if lo == hi else ''}; for other batch sizes "
                               f"{_rebuild_hint(self._engine_path.parent, self.precision)} --max-batch N")
        cuda.htod(self._in["ptr"], x, stream)
        if self._v3:
            for t in self._tensors:
                self.context.set_tensor_address(t["name"], t["ptr"])
            ok = self.context.execute_async_v3(cuda.handle(stream))
        else:
            bindings = [0] * len(self._tensors)
            for t in self._tensors:
                bindings[t["index"]] = t["ptr"]
            ok = self.context.execute_async_v2(bindings, cuda.handle(stream))
        if not ok:
            raise BackendError(f"TensorRT execution failed for a batch of {n} (see the TensorRT log)")
        cuda.dtoh(out, self._out["ptr"], stream)
        cuda.sync(stream)
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        for t in getattr(self, "_tensors", []):
            if t.get("ptr"):
                self._cuda.free(t.pop("ptr"))
        if getattr(self, "_stream", None) is not None:
            self._cuda.destroy(self._stream)
            self._stream = None
        self.context = self.engine = None


# --- PyTorch -------------------------------------------------------------------------------------
class TorchBackend(Backend):
    """The source checkpoint in PyTorch (lazy import: a runtime without torch never gets here)."""

    name = "torch"

    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu"):
        try:
            import torch
            from mnet.search.checkpoint import build_model, load_checkpoint
        except ImportError:
            raise BackendError("the torch backend needs PyTorch: pip install 'mnet[train]', "
                               "or use --backend onnxruntime / tensorrt") from None
        self.torch = torch
        ckpt = load_checkpoint(checkpoint)
        self.device = torch.device(device)
        self.model = build_model(ckpt).to(self.device)
        self.input_hw = tuple(ckpt.preprocess.input_hw)
        self.num_classes = len(ckpt.classes)
        self.providers = (str(self.device),)

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def close(self) -> None:
        self.model = None


# --- choosing ------------------------------------------------------------------------------------
def open_backend(bundle: Bundle | str | os.PathLike, backend: str = "auto", precision: str = "fp32", *,
                 providers: Providers = "auto", threads: int | None = None) -> Backend:
    """Open the bundle's model for `precision` on `backend` ("auto": a matching TensorRT engine when
    tensorrt is importable and the bundle has one for this device, else ONNX Runtime).

    precision="auto": the precision `mnet bundle bench --all` recorded for this backend and device in the
    card (`precision_choice`), or fp32 with a warning saying how to measure one."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision == "auto":
        backend, precision = _recorded_precision(b, backend, providers)
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)} or auto")
    if backend == "auto":
        backend = "tensorrt" if _engine_here(b, precision) else "onnxruntime"
    if backend == "tensorrt":
        trt = import_tensorrt()
        gpu_name, capability = cuda_runtime().device()
        path, _ = find_engine(b, precision, trt.__version__, gpu_name, capability)
        return TensorRTBackend(path, output=b.card.output)
    if backend == "onnxruntime":
        model = b.int8_path if precision == "int8" else b.onnx_path
        if not model.is_file():
            raise BackendError(f"{b.path}: no {model.name}; make it with: mnet calibrate int8 {b.path} DATA")
        return OnnxRuntimeBackend(model, providers, precision=precision, output=b.card.output, threads=threads,
                                  trt_cache_dir=b.path / "ort-trt-cache")
    if precision != "fp32":
        raise BackendError(f"the torch backend runs fp32 only (asked for {precision}); use onnxruntime or tensorrt")
    ckpt = b.card.source.get("checkpoint")
    if not ckpt or not Path(ckpt).is_file():
        raise BackendError(f"the torch backend needs the source checkpoint {ckpt or '(unknown)'}, which is not on "
                           "this machine; use --backend onnxruntime or tensorrt")
    return TorchBackend(ckpt)


def _engine_here(bundle: Bundle, precision: str) -> bool:
    """Whether `auto` should pick TensorRT: tensorrt importable, CUDA up, and a matching engine present."""
    if not tensorrt_available() or not any(info and info.precision == precision for _, info, _ in bundle.engines()):
        return False
    try:
        trt = import_tensorrt()
        gpu_name, capability = cuda_runtime().device()
        find_engine(bundle, precision, trt.__version__, gpu_name, capability)
        return True
    except MnetError as e:
        log.info("backend auto: not using TensorRT (%s)", e)
        return False


# --- precision "auto": what `mnet bundle bench --all` measured on this device -------------------------
@functools.lru_cache(maxsize=1)
def _host_hardware() -> str:
    """The board (Jetson: /proc/device-tree/model) or CPU model this runs on, else the machine type."""
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except (OSError, IndexError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_label(kind: str, gpu_name: str | None = None) -> str:
    """"cpu:<board or CPU model>" or "cuda:<GPU name>": the device a precision choice is measured on, so
    a card measured on a Jetson and on a PC keeps both. A GPU name that cannot be read names the host."""
    if kind == "cuda" and gpu_name is None:
        try:
            gpu_name = cuda_runtime().device()[0]
        except MnetError:
            gpu_name = None
    return f"cuda:{gpu_name}" if kind == "cuda" and gpu_name else f"{kind}:{_host_hardware()}"


def backend_device(net: Backend) -> str:
    """The `device_label` of an open backend: what really runs it (onnxruntime may fall back to CPU)."""
    if isinstance(net, TensorRTBackend):
        return device_label("cuda", net.info.gpu_name)
    first = net.providers[0] if net.providers else ""
    return device_label("cuda" if first in (_TRT_EP, _CUDA_EP) or first.startswith("cuda") else "cpu")


def _recorded_precision(b: Bundle, backend: str, providers: Providers) -> tuple[str, str]:
    """(backend, precision) from the card's `precision_choice` for this device, or (backend, "fp32") and a
    warning. backend="auto" takes TensorRT's choice where it has one and its engine runs here."""
    choices, tried = b.card.precision_choice, []
    if backend == "tensorrt" or (backend == "auto" and tensorrt_available()):
        try:
            key = precision_choice_key("tensorrt", device_label("cuda", cuda_runtime().device()[0]))
        except MnetError:
            if backend == "tensorrt":
                raise
            key = None
        if key is not None:
            tried.append(key)
            chosen = (choices.get(key) or {}).get("chosen")
            if chosen and (backend == "tensorrt" or _engine_here(b, chosen)):
                return "tensorrt", chosen
    if backend in ("auto", "onnxruntime"):
        want, _ = ort_providers(providers, _import_onnxruntime().get_available_providers())
        first = want[0][0] if isinstance(want[0], tuple) else want[0]
        key = precision_choice_key("onnxruntime", device_label("cpu" if first == _CPU_EP else "cuda"))
        tried.append(key)
        if key in choices:
            return "onnxruntime", choices[key]["chosen"]
    if backend == "torch":
        tried.append(precision_choice_key("torch", device_label("cpu")))  # TorchBackend runs on the CPU
    log.warning("precision auto: %s records no measured choice for %s; using fp32 (measure one with "
                "`mnet bundle bench %s --all%s`)", b.path, " or ".join(tried), b.path,
                "" if backend == "auto" else f" --backend {backend}")
    return backend, "fp32"
