"""TensorRT glue, tested against a test double of the `tensorrt` and cuda-python modules.

The double follows the documented Python API of each line: 8.4 (binding API only), 8.6 (tensor-name
API, EXPLICIT_BATCH), 10.x (STRONGLY_TYPED, FP16/INT8 flags still there, EXPLICIT_BATCH ignored) and
11.x (no FP16/INT8 flags), and the rules the real library enforces on shapes: a static network input
takes only a profile equal to it; DLA takes only a static profile (min = opt = max: without GPU fallback
the build fails, with it every layer runs on the GPU); `set_input_shape` / `set_binding_shape` return
False for a shape outside the profile and the context keeps its previous shape; running without a valid
shape returns False. Its "device memory" is host memory at real addresses and its engine
computes logits = mean over pixels @ W, so a whole TensorRTBackend run is checked number by number.
A real build and run is the `gpu`-marked test at the end (skipped without CUDA + tensorrt).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from mnet.bundle import engine_filename, load_bundle
from mnet.errors import BackendError, ConfigError, ExportError
from mnet.export.tensorrt import _make_logger, build_engine, trtexec_command
from mnet.io import sha256_file
from mnet.runtime.backends import TensorRTBackend, open_backend, softmax
from test_export_support import BLOCK_HEAVY, copy_bundle, exported_bundle, qdq_conv_model

_GPU, _CC = "Fake GPU 9000", (8, 7)


# --- the test double -----------------------------------------------------------------------------
class _Flags:
    def __init__(self, **members):
        for k, v in members.items():
            setattr(self, k, v)


class _Severity:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


class _ILogger:
    Severity = _Severity

    def __init__(self):
        pass


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return memoryview(b"CACHE:" + self.data[-8:])


class _Config:
    def __init__(self):
        self.flags, self.pools, self.profiles, self.cache = [], {}, [], None
        self.default_device_type = self.DLA_core = None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.append(flag)

    def add_optimization_profile(self, p):
        self.profiles.append(p)
        return 0

    def create_timing_cache(self, data):
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _Network:
    def __init__(self, flags):
        self.flags, self.onnx = flags, None


class _Parser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        try:
            model = onnx.load(path)
        except Exception as e:  # what a real parser reports on a bad file
            self.errors.append(f"ModelImporter: {e}")
            return False
        # like the real parser (NVIDIA/TensorRT#4542, onnx/onnx-tensorrt#850): DequantizeLinear takes int8
        # only, so an int32 bias cannot slip past this double and hide a file TensorRT refuses
        types = {t.name: t.data_type for t in model.graph.initializer}
        for n in model.graph.node:
            t = types.get(n.input[0], onnx.TensorProto.INT8) if n.op_type == "DequantizeLinear" else None
            if t not in (None, onnx.TensorProto.INT8):
                self.errors.append(f"ModelImporter: DequantizeLinear {n.name}: input {n.input[0]} has type "
                                   f"{onnx.TensorProto.DataType.Name(t)}; only INT8 can be dequantized")
                return False
        self.network.onnx = model
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


def make_trt(version: str, *, fail_build: bool = False, dla_cores: int = 0):
    """A fake `tensorrt` module with the API surface of `version` (8.4 / 8.6 / 10.x / 11.x)."""
    major, minor = (int(v) for v in version.split(".")[:2])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    trt.built = []  # (builder, network, config) of every build, for the assertions

    net_flags = {}
    if major < 11:
        net_flags["EXPLICIT_BATCH"] = 0
    if major >= 10:
        net_flags["STRONGLY_TYPED"] = 1
    trt.NetworkDefinitionCreationFlag = _Flags(**net_flags)
    bflags = {"GPU_FALLBACK": "GPU_FALLBACK"}
    if major < 11:
        bflags.update(FP16="FP16", INT8="INT8")
    trt.BuilderFlag = _Flags(**bflags)
    trt.MemoryPoolType = _Flags(WORKSPACE="WORKSPACE")
    trt.DeviceType = _Flags(GPU="GPU", DLA="DLA")
    trt.TensorIOMode = _Flags(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ILogger = _ILogger

    class Logger(_ILogger):
        WARNING = _Severity.WARNING

        def __init__(self, severity=_Severity.WARNING):
            pass

    trt.Logger = Logger
    trt.nptype = lambda dt: {"FLOAT": np.float32, "HALF": np.float16}[dt]

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return _Network(flags)

        def create_builder_config(self):
            return _Config()

        def create_optimization_profile(self):
            return _Profile()

        def build_serialized_network(self, network, config):
            trt.built.append((self, network, config))
            if fail_build:
                self.logger.log(_Severity.ERROR, "out of tactics")
                return None
            g = network.onnx.graph
            (inp,), (out,) = [i for i in g.input if i.name not in {t.name for t in g.initializer}], g.output
            dims = [d.dim_value or -1 for d in inp.type.tensor_type.shape.dim]  # -1: a named (dynamic) dim
            classes = out.type.tensor_type.shape.dim[1].dim_value
            lo, opt, hi = config.profiles[0].shapes[inp.name]
            for i, d in enumerate(dims):  # a static dimension takes only a profile equal to it
                if d >= 0 and not lo[i] == opt[i] == hi[i] == d:
                    self.logger.log(_Severity.ERROR, f"{inp.name}: for dimension number {i} in profile 0 does not "
                                    f"match network definition (got min={lo[i]}, opt={opt[i]}, max={hi[i]}), "
                                    f"expected min=opt=max={d}")
                    return None
            device = "GPU"
            if config.default_device_type == trt.DeviceType.DLA:
                # DLA has no dynamic dimensions: profile min = opt = max (DLA Supported Layers and Restrictions)
                device = "DLA" if lo == opt == hi else None
                if device is None and trt.BuilderFlag.GPU_FALLBACK not in config.flags:
                    self.logger.log(_Severity.ERROR, f"{inp.name}: DLA does not support dynamic dimensions "
                                    f"(profile min {lo}, opt {opt}, max {hi})")
                    return None
                if device is None:  # NVIDIA/TensorRT#2319: nothing runs on DLA
                    self.logger.log(_Severity.WARNING, "dynamic shapes: every layer falls back to the GPU")
                    device = "GPU"
            plan = {"input": inp.name, "output": out.name, "dims": dims, "hw": dims[2:], "classes": classes,
                    "profile": [lo, opt, hi], "device": device,
                    "w": np.random.default_rng(classes).normal(size=(3, classes)).round(3).tolist()}
            return memoryview(b"FAKEPLAN" + json.dumps(plan).encode())

    trt.Builder = Builder
    trt.OnnxParser = _Parser

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses, self.shapes, self.calls = engine, {}, [], []
            self.refused, self.shape = [], None  # shapes refused; the last one accepted (what runs)

        def _set_shape(self, shape):
            lo, _, hi = self.engine.plan["profile"]
            shape = tuple(shape)
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                self.refused.append(shape)  # the real one logs "Error Code 3: API Usage Error" and keeps the old shape
                return False
            self.shapes.append(shape)
            self.shape = shape
            return True

        def _compute(self, shape, x_ptr, y_ptr):
            n, hw, c = shape[0], self.engine.plan["hw"], self.engine.plan["classes"]
            x = np.frombuffer((ctypes.c_float * (n * 3 * hw[0] * hw[1])).from_address(x_ptr), np.float32)
            logits = x.reshape(n, 3, *hw).mean((2, 3)) @ np.asarray(self.engine.plan["w"], np.float32)
            ctypes.memmove(y_ptr, np.ascontiguousarray(logits, np.float32).ctypes.data, n * c * 4)
            return True

        # tensor-name API (8.5+)
        def set_input_shape(self, name, shape):
            assert name == self.engine.plan["input"]
            return self._set_shape(shape)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            self.calls.append(stream_handle)
            p = self.engine.plan
            if self.shape is None:  # "not all input dimensions are specified"
                return False
            return self._compute(self.shape, self.addresses[p["input"]], self.addresses[p["output"]])

        # binding API (<= 8.4)
        def set_binding_shape(self, index, shape):
            assert index == 0
            return self._set_shape(shape)

        def execute_async_v2(self, bindings, stream_handle):
            self.calls.append(stream_handle)
            if self.shape is None:
                return False
            return self._compute(self.shape, bindings[0], bindings[1])

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            self.contexts = []

        def _meta(self, i):
            p = self.plan
            return [(p["input"], "INPUT", tuple(p["dims"])), (p["output"], "OUTPUT", (p["dims"][0], p["classes"]))][i]

        def _profile(self, name):
            assert name == self.plan["input"]  # the real one has profiles for inputs only
            return [tuple(s) for s in self.plan["profile"]]

        def create_execution_context(self):
            self.contexts.append(Context(self))
            return self.contexts[-1]

    if (major, minor) >= (8, 5):
        Engine.num_io_tensors = 2
        Engine.get_tensor_name = lambda self, i: self._meta(i)[0]
        Engine.get_tensor_mode = lambda self, n: {m[0]: m[1] for m in map(self._meta, (0, 1))}[n]
        Engine.get_tensor_dtype = lambda self, n: "FLOAT"
        Engine.get_tensor_shape = lambda self, n: {m[0]: m[2] for m in map(self._meta, (0, 1))}[n]
        Engine.get_tensor_profile_shape = lambda self, n, profile: self._profile(n)
    else:
        Engine.num_bindings = 2
        Engine.get_binding_name = lambda self, i: self._meta(i)[0]
        Engine.binding_is_input = lambda self, i: i == 0
        Engine.get_binding_dtype = lambda self, i: "FLOAT"
        Engine.get_binding_shape = lambda self, i: self._meta(i)[2]
        Engine.get_profile_shape = lambda self, profile, i: self._profile(self._meta(i)[0])

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            if not data.startswith(b"FAKEPLAN"):
                return None
            trt.engines.append(Engine(json.loads(data[8:])))
            return trt.engines[-1]

    trt.Runtime = Runtime
    trt.engines = []
    return trt


def make_cudart(gpu=_GPU, cc=_CC, fail_malloc=False):
    """A fake cuda-python runtime module: 'device' memory is host memory, copies are memmove."""
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaError_t = _Flags(cudaSuccess=0, cudaErrorInvalidValue=1, cudaErrorMemoryAllocation=2)
    rt.cudaMemcpyKind = _Flags(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    rt.buffers, rt.freed, rt.copies = {}, [], []

    class Stream(int):
        pass

    def malloc(n):
        if fail_malloc:
            return (rt.cudaError_t.cudaErrorMemoryAllocation, 0)
        buf = np.zeros(n, np.uint8)
        rt.buffers[buf.ctypes.data] = buf
        return (0, buf.ctypes.data)

    def memcpy(dst, src, count, kind, stream):
        dev = dst if kind == rt.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if count > rt.buffers[dev].nbytes:  # past the allocation: refused here rather than corrupting the heap
            return (rt.cudaError_t.cudaErrorInvalidValue,)
        rt.copies.append(kind)
        ctypes.memmove(dst, src, count)
        return (0,)

    props = types.SimpleNamespace(name=gpu.encode() + b"\0" * 8, major=cc[0], minor=cc[1])
    rt.cudaGetDevice = lambda: (0, 0)
    rt.cudaGetDeviceProperties = lambda dev: (0, props)
    rt.cudaMalloc = malloc
    rt.cudaFree = lambda ptr: (rt.freed.append(ptr), (0,))[1]
    rt.cudaStreamCreate = lambda: (0, Stream(1234))
    rt.cudaStreamSynchronize = lambda s: (0,)
    rt.cudaStreamDestroy = lambda s: (0,)
    rt.cudaMemcpyAsync = memcpy
    return rt


@pytest.fixture
def fake(monkeypatch):
    """Install fakes: fake(version, **kw) -> (trt, cudart)."""

    def install(version="10.3.0", gpu=_GPU, cc=_CC, fail_build=False, fail_malloc=False, dla_cores=0):
        trt = make_trt(version, fail_build=fail_build, dla_cores=dla_cores)
        rt = make_cudart(gpu, cc, fail_malloc)
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        cuda.bindings, bindings.runtime = bindings, rt
        for name, mod in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                          ("cuda.bindings.runtime", rt)):
            monkeypatch.setitem(sys.modules, name, mod)
        return trt, rt

    return install


@pytest.fixture
def bundle(colour_data, tmp_path_factory, tmp_path):
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "bundle")
    (b / "model.int8.onnx").write_bytes((b / "model.onnx").read_bytes())  # stands in for a QDQ model
    return b


# --- build ---------------------------------------------------------------------------------------
def test_build_fp32_on_10(fake, bundle):
    trt, _ = fake("10.3.0")
    build = build_engine(bundle, "fp32", max_batch=4)
    assert build.path == bundle / engine_filename("fp32", "10.3.0", _GPU)
    _, network, config = trt.built[-1]
    assert network.flags == 0  # EXPLICIT_BATCH is deprecated and ignored from 10 on
    assert config.flags == [] and config.pools == {"WORKSPACE": 1024 << 20}
    assert config.profiles[0].shapes == {"input": ((1, 3, 24, 32), (4, 3, 24, 32), (4, 3, 24, 32))}
    # the file is exactly TensorRT's plan: nothing prepended
    assert build.path.read_bytes().startswith(b"FAKEPLAN")
    side = json.loads(build.sidecar.read_text())
    assert side["tensorrt_version"] == "10.3.0" and side["gpu_name"] == _GPU and side["compute_capability"] == [8, 7]
    assert (side["precision"], side["min_batch"], side["opt_batch"], side["max_batch"]) == ("fp32", 1, 4, 4)
    assert side["onnx_file"] == "model.onnx" and side["onnx_sha256"] == sha256_file(bundle / "model.onnx")
    assert side["strongly_typed"] is False and side["workspace_mb"] == 1024


@pytest.mark.parametrize("version, precision, net_flags, builder_flags, source, typed", [
    ("8.6.1", "fp32", 1 << 0, [], "model.onnx", False),
    ("8.6.1", "fp16", 1 << 0, ["FP16"], "model.onnx", False),
    ("8.6.1", "int8", 1 << 0, ["INT8"], "model.int8.onnx", False),
    ("10.3.0", "fp16", 0, ["FP16"], "model.onnx", False),
    ("10.3.0", "int8", 0, ["INT8"], "model.int8.onnx", False),
    ("11.4.0", "fp32", 0, [], "model.onnx", True),
    ("11.4.0", "fp16", 1 << 1, [], "model.fp16.onnx", True),
    ("11.4.0", "int8", 1 << 1, [], "model.int8.onnx", True),
])
def test_precision_plan_per_version(fake, bundle, version, precision, net_flags, builder_flags, source, typed):
    trt, _ = fake(version)
    build = build_engine(bundle, precision)
    _, network, config = trt.built[-1]
    assert network.flags == net_flags and config.flags == builder_flags
    assert build.info.onnx_file == source and build.info.strongly_typed is typed
    assert build.path.name == f"model.{precision}.{version}.fake-gpu-9000.engine"


def test_fp16_onnx_for_strongly_typed_builds_keeps_fp32_io(fake, bundle):
    fake("11.4.0")
    build_engine(bundle, "fp16")
    half = onnx.load(str(bundle / "model.fp16.onnx"))
    assert {t.data_type for t in half.graph.initializer} == {onnx.TensorProto.FLOAT16}
    for vi in (*half.graph.input, *half.graph.output):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    import onnxruntime as ort

    x = np.random.default_rng(1).normal(size=(2, 3, 24, 32)).astype(np.float32)
    def run(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(run(bundle / "model.fp16.onnx"), run(bundle / "model.onnx"), atol=5e-3)


def test_timing_cache_is_read_and_updated(fake, bundle, tmp_path):
    trt, _ = fake()
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"previous-cache")
    build_engine(bundle, "fp32", timing_cache=cache)
    assert trt.built[-1][2].cache.data == b"previous-cache"
    assert cache.read_bytes() == b"CACHE:us-cache"


def test_build_errors(fake, bundle, tmp_path):
    fake("10.3.0", fail_build=True)
    with pytest.raises(ExportError, match="could not build the fp32 engine: out of tactics"):
        build_engine(bundle, "fp32")
    assert not list(bundle.glob("*.engine*"))
    fake("10.3.0")
    (bundle / "model.int8.onnx").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="cannot parse model.int8.onnx: ModelImporter"):
        build_engine(bundle, "int8")
    (bundle / "model.int8.onnx").unlink()
    with pytest.raises(ExportError, match="mnet calibrate int8"):
        build_engine(bundle, "int8")


def test_uint8_calibration_is_refused_for_int8_engines(fake, bundle):
    trt, _ = fake()
    onnx.save(qdq_conv_model(activations="uint8", zero_point=128), str(bundle / "model.int8.onnx"))
    with pytest.raises(ExportError, match=r"QuantizeLinear 'x_QuantizeLinear': zero point 'x_zero_point' is UINT8.*"
                                          r"asymmetric uint8 activations.*mnet calibrate int8"):
        build_engine(bundle, "int8")
    assert trt.built == [] and not list(bundle.glob("*.engine*"))


def test_int32_dequantize_input_is_refused_naming_the_node(fake, bundle):
    """onnxruntime's default int32 biases: TensorRT cannot dequantise them, so the build is refused up front
    with the node and the fix, and the test double's parser refuses the file too (it cannot hide the bug)."""
    trt, _ = fake("8.6.1")
    onnx.save(qdq_conv_model(bias="int32"), str(bundle / "model.int8.onnx"))
    with pytest.raises(ExportError) as e:
        build_engine(bundle, "int8")
    msg = str(e.value)
    assert "\n" not in msg and "model.int8.onnx is not loadable by TensorRT" in msg
    assert "DequantizeLinear 'b_DequantizeLinear': input 'b_quantized' is INT32" in msg
    assert f"mnet calibrate int8 {bundle} DATA" in msg
    assert trt.built == [] and not list(bundle.glob("*.engine*"))
    parser = trt.OnnxParser(_Network(0), None)
    assert not parser.parse_from_file(str(bundle / "model.int8.onnx"))
    assert "b_DequantizeLinear" in parser.get_error(0) and "INT32" in parser.get_error(0)
    onnx.save(qdq_conv_model(bias="float"), str(bundle / "model.int8.onnx"))
    assert trt.OnnxParser(_Network(0), None).parse_from_file(str(bundle / "model.int8.onnx"))
    assert build_engine(bundle, "int8").info.onnx_file == "model.int8.onnx"


def test_calibrated_int8_model_builds(fake, bundle, colour_data, monkeypatch):
    """`mnet calibrate int8`'s own file passes the check and the double's parser; without the onnx package the
    build trusts the card's check only for the very file it was run on."""
    from mnet.calibration.int8 import calibrate_int8

    (bundle / "model.int8.onnx").unlink()
    assert calibrate_int8(bundle, colour_data, samples=32).tensorrt_compatible is True
    trt, _ = fake("8.6.1")
    assert build_engine(bundle, "int8").info.onnx_file == "model.int8.onnx"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnx", None)  # a Jetson without the onnx package
        assert build_engine(bundle, "int8").path.is_file()
    onnx.save(qdq_conv_model(bias="int32"), str(bundle / "model.int8.onnx"))  # not the file the card checked
    with monkeypatch.context() as m, pytest.raises(ExportError, match="records no TensorRT check of this file"):
        m.setitem(sys.modules, "onnx", None)
        build_engine(bundle, "int8")


def test_option_errors(fake, bundle, colour_data, tmp_path_factory, tmp_path):
    fake()
    with pytest.raises(ConfigError, match="--precision"):
        build_engine(bundle, "fp8")
    with pytest.raises(ConfigError, match="--max-batch"):
        build_engine(bundle, "fp32", max_batch=0)
    with pytest.raises(ConfigError, match="--dla runs fp16 or int8"):
        build_engine(bundle, "fp32", dla=0)
    with pytest.raises(ExportError, match="--dla 0: this device has 0 DLA"):
        build_engine(bundle, "fp16", dla=0)
    from mnet.export.onnx import export_onnx
    from test_export_support import trained_checkpoint

    fixed = export_onnx(trained_checkpoint(colour_data, tmp_path_factory), tmp_path / "b2", batch=2, parity_images=4)
    with pytest.raises(ConfigError, match="fixed batch of 2"):
        build_engine(fixed.path, "fp32", max_batch=8)


# --- run -----------------------------------------------------------------------------------------
def _expected(bundle, trt, x):
    w = np.asarray(trt.engines[-1].plan["w"], np.float32)
    return softmax(x.mean((2, 3)) @ w)


@pytest.mark.parametrize("version", ["8.4.3", "8.6.1", "10.3.0", "11.4.0"])
def test_backend_runs_engine_in_profile_sized_chunks(fake, bundle, version):
    trt, rt = fake(version)
    build_engine(bundle, "fp16", max_batch=4)
    x = np.random.default_rng(2).normal(size=(10, 3, 24, 32)).astype(np.float32)
    with open_backend(bundle, "auto", "fp16") as be:  # auto: tensorrt importable and a matching engine
        assert isinstance(be, TensorRTBackend) and be.precision == "fp16"
        assert be.providers == (f"{_GPU} (TensorRT {version})",)
        probs = be.infer(x)
        ctx = trt.engines[-1].contexts[-1]
        assert ctx.shapes == [(4, 3, 24, 32), (4, 3, 24, 32), (2, 3, 24, 32)]
        assert ctx.calls == [1234] * 3  # the stream handle, as an int
        if version != "8.4.3":
            assert set(ctx.addresses) == {"input", "logits"}
    np.testing.assert_allclose(probs, _expected(bundle, trt, x), atol=1e-5)
    assert len(rt.freed) == 2  # input and output buffers released on close


@pytest.fixture
def fixed_bundle(colour_data, tmp_path_factory, tmp_path):
    """A bundle exported with a fixed batch of 2 (a static input in model.onnx and in the engine)."""
    from mnet.export.onnx import export_onnx
    from test_export_support import trained_checkpoint

    return export_onnx(trained_checkpoint(colour_data, tmp_path_factory), tmp_path / "fixed", batch=2,
                       parity_images=4).path


def _warmup(bundle_dir, backend):
    """What `mnet grade` does first: one blank crop through the grader's worker."""
    from mnet.runtime.grader import Grader

    card = load_bundle(bundle_dir).card
    with Grader(backend, card.preprocess, card.classes) as g:
        g.warmup()


@pytest.mark.parametrize("version", ["8.4.3", "10.3.0"])
def test_fixed_batch_engine_pads_every_batch_to_its_size(fake, fixed_bundle, version):
    """The engine of a fixed-batch bundle takes that batch only: one crop (the grader's warm-up) and
    three crops are padded to 2, and only the real rows come back."""
    trt, _ = fake(version)
    build = build_engine(fixed_bundle, "fp32", max_batch=2)
    assert (build.info.min_batch, build.info.opt_batch, build.info.max_batch) == (2, 2, 2)
    x = np.random.default_rng(3).normal(size=(3, 3, 24, 32)).astype(np.float32)
    with open_backend(fixed_bundle, "tensorrt", "fp32") as be:
        assert (be.exact_batch, be.max_batch) == (2, 2)
        _warmup(fixed_bundle, be)
        probs = be.infer(x)
        ctx = trt.engines[-1].contexts[-1]
        assert ctx.refused == [] and ctx.shapes == [(2, 3, 24, 32)] * 3
    np.testing.assert_allclose(probs, _expected(fixed_bundle, trt, x), atol=1e-5)


@pytest.mark.parametrize("version", ["8.4.3", "10.3.0"])
def test_shape_outside_the_profile_is_a_clear_error(fake, bundle, version):
    """set_input_shape / set_binding_shape answer False (no exception) for a shape outside the profile:
    one line naming the shape and the profile, before anything is copied or run."""
    trt, rt = fake(version)
    build_engine(bundle, "fp32", max_batch=4)
    with open_backend(bundle, "tensorrt", "fp32") as be:
        assert (be.exact_batch, be.max_batch) == (None, 4)
        be.infer(np.zeros((3, 3, 24, 32), np.float32))
        copies = len(rt.copies)
        with pytest.raises(BackendError) as e:
            be._run(np.zeros((5, 3, 24, 32), np.float32))  # past the buffers too: must stop before the copy
        ctx = trt.engines[-1].contexts[-1]
        assert ctx.refused == [(5, 3, 24, 32)] and len(ctx.calls) == 1 and len(rt.copies) == copies
    msg = str(e.value)
    assert "\n" not in msg and "refused input shape (5, 3, 24, 32) for 'input'" in msg
    assert "profile takes (1, 3, 24, 32) to (4, 3, 24, 32)" in msg and "mnet export tensorrt" in msg


def test_dla_build_has_a_static_profile_and_the_runtime_pads_to_it(fake, bundle):
    """DLA has no dynamic dimensions (min = opt = max): the engine is built for exactly --max-batch, the
    sidecar says so, and the backend pads every batch to it."""
    trt, _ = fake("8.6.1", dla_cores=2)
    build = build_engine(bundle, "fp16", max_batch=4, dla=1)
    _, _, config = trt.built[-1]
    assert config.default_device_type == "DLA" and config.DLA_core == 1 and "GPU_FALLBACK" in config.flags
    assert config.profiles[0].shapes == {"input": ((4, 3, 24, 32),) * 3}
    assert trt.engines == [] and json.loads(build.sidecar.read_text())["dla_core"] == 1
    assert (build.info.min_batch, build.info.opt_batch, build.info.max_batch) == (4, 4, 4)
    x = np.random.default_rng(4).normal(size=(5, 3, 24, 32)).astype(np.float32)
    with open_backend(bundle, "tensorrt", "fp16") as be:
        assert trt.engines[-1].plan["device"] == "DLA"  # a dynamic profile would have put it all on the GPU
        assert (be.exact_batch, be.max_batch) == (4, 4)
        _warmup(bundle, be)
        probs = be.infer(x)
        assert trt.engines[-1].contexts[-1].shapes == [(4, 3, 24, 32)] * 3
    np.testing.assert_allclose(probs, _expected(bundle, trt, x), atol=1e-5)


def test_the_double_enforces_tensorrts_shape_rules(fake, bundle):
    """So that the tests above fail where the real library would: a DLA config with min != max fails the
    build (without GPU fallback; with it nothing runs on DLA), a static input takes only its own shape,
    and a refused shape leaves the context's last good shape in place."""
    trt, _ = fake("10.3.0", dla_cores=1)

    def build(lo, hi, dla=False, fallback=True, path=bundle / "model.onnx"):
        logger = _make_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        assert trt.OnnxParser(network, logger).parse_from_file(str(path))
        config, profile = builder.create_builder_config(), builder.create_optimization_profile()
        profile.set_shape("input", (lo, 3, 24, 32), (hi, 3, 24, 32), (hi, 3, 24, 32))
        config.add_optimization_profile(profile)
        if dla:
            config.default_device_type, config.DLA_core = trt.DeviceType.DLA, 0
        if dla and fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        plan = builder.build_serialized_network(network, config)
        return (json.loads(bytes(plan)[8:]) if plan is not None else None), logger.errors

    plan, errors = build(1, 4, dla=True, fallback=False)
    assert plan is None and "DLA does not support dynamic dimensions" in errors[0]
    assert build(1, 4, dla=True)[0]["device"] == "GPU"
    assert build(4, 4, dla=True)[0]["device"] == "DLA"
    static = bundle / "static.onnx"
    model = onnx.load(str(bundle / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(static))
    plan, errors = build(1, 2, path=static)
    assert plan is None and "expected min=opt=max=2" in errors[0]
    engine = trt.Runtime(None).deserialize_cuda_engine(b"FAKEPLAN" + json.dumps(build(1, 4)[0]).encode())
    ctx = engine.create_execution_context()
    assert engine.get_tensor_profile_shape("input", 0) == [(1, 3, 24, 32), (4, 3, 24, 32), (4, 3, 24, 32)]
    assert ctx.execute_async_v3(0) is False  # no shape yet
    assert ctx.set_input_shape("input", (2, 3, 24, 32)) and not ctx.set_input_shape("input", (8, 3, 24, 32))
    assert ctx.shape == (2, 3, 24, 32) and ctx.refused == [(8, 3, 24, 32)]


def test_mismatched_engine_is_refused_with_rebuild_command(fake, bundle):
    fake("10.3.0")
    build = build_engine(bundle, "fp32")
    fake("10.4.0")  # TensorRT upgraded
    with pytest.raises(BackendError, match=r"TensorRT 10.3.0 built it, this is TensorRT 10.4.0.*"
                                           r"mnet export tensorrt .* --precision fp32"):
        TensorRTBackend(build.path)
    with pytest.raises(BackendError, match="no fp32 TensorRT engine for TensorRT 10.4.0"):
        open_backend(bundle, "tensorrt", "fp32")
    with open_backend(bundle, "auto", "fp32") as be:  # auto falls back instead of failing
        assert be.name == "onnxruntime"
    fake("10.3.0", gpu="Orin", cc=(8, 7))  # same TensorRT, other GPU
    with pytest.raises(BackendError, match=r"built for Fake GPU 9000 \(sm 8.7\), this GPU is Orin"):
        TensorRTBackend(build.path)


def test_engine_without_sidecar_is_refused(fake, bundle):
    fake()
    build = build_engine(bundle, "fp32")
    build.sidecar.unlink()
    with pytest.raises(BackendError, match="no sidecar"):
        TensorRTBackend(build.path)
    with pytest.raises(BackendError, match="no fp32 TensorRT engine.*engine sidecar not found"):
        open_backend(bundle, "tensorrt", "fp32")


def test_cuda_errors_become_backend_errors(fake, bundle):
    fake()
    build = build_engine(bundle, "fp32")
    fake(fail_malloc=True)
    with pytest.raises(BackendError, match="CUDA cudaMalloc failed"):
        TensorRTBackend(build.path)


def test_corrupt_engine_is_refused(fake, bundle):
    fake()
    build = build_engine(bundle, "fp32")
    build.path.write_bytes(b"\x00" * 16 + build.path.read_bytes())  # e.g. a loader that prepended a header
    with pytest.raises(BackendError, match="does not match its sidecar"):
        TensorRTBackend(build.path)
    side = json.loads(build.sidecar.read_text())
    side.pop("engine_sha256"), side.pop("engine_bytes")  # a sidecar from before mnet recorded them
    build.sidecar.write_text(json.dumps(side))
    with pytest.raises(BackendError, match="could not deserialize"):
        TensorRTBackend(build.path)


def test_engine_and_sidecar_from_different_builds_are_refused(fake, bundle, monkeypatch):
    """A crash between the engine's rename and its sidecar's leaves a new engine beside the old sidecar
    (whose batch and shapes would size the buffers): refused, and `auto` falls back to onnxruntime."""
    import mnet.io

    trt, _ = fake("10.3.0")
    old = build_engine(bundle, "fp32", max_batch=4)
    side = json.loads(old.sidecar.read_text())
    assert side["engine_bytes"] == old.path.stat().st_size and side["engine_sha256"] == sha256_file(old.path)
    real_replace = os.replace

    def crash_at_the_sidecar(src, dst):
        if str(dst).endswith(".engine.json"):
            raise OSError("power cut")
        real_replace(src, dst)

    with monkeypatch.context() as m, pytest.raises(OSError, match="power cut"):
        m.setattr(mnet.io.os, "replace", crash_at_the_sidecar)
        build_engine(bundle, "fp32", max_batch=2)
    assert json.loads(old.sidecar.read_text()) == side  # the old sidecar, now beside a new engine
    assert sha256_file(old.path) != side["engine_sha256"]
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".")] == []  # no temp file left
    with pytest.raises(BackendError, match=r"does not match its sidecar.*mnet export tensorrt .* --precision fp32"):
        TensorRTBackend(old.path)
    with pytest.raises(BackendError, match="no fp32 TensorRT engine.*does not match its sidecar"):
        open_backend(bundle, "tensorrt", "fp32")
    with open_backend(bundle, "auto", "fp32") as be:
        assert be.name == "onnxruntime"
    build_engine(bundle, "fp32", max_batch=4)  # a whole build mends the pair
    TensorRTBackend(old.path).close()
    good = old.path.read_bytes()  # same size, other bytes: caught by the checksum
    old.path.write_bytes(good[:-2] + bytes([good[-2] ^ 1]) + good[-1:])
    with pytest.raises(BackendError, match="sha256 differs"):
        TensorRTBackend(old.path)


# --- trtexec and the CLI -------------------------------------------------------------------------
def test_trtexec_command(bundle):
    b = str(bundle)
    cmd = trtexec_command(bundle, "fp16", 8, 512, "t.cache", None, trt_version="10.3.0", gpu_name="Orin")
    assert cmd == (f"trtexec --onnx={b}/model.onnx --saveEngine={b}/model.fp16.10.3.0.orin.engine "
                   "--minShapes=input:1x3x24x32 --optShapes=input:8x3x24x32 --maxShapes=input:8x3x24x32 "
                   "--memPoolSize=workspace:512 --fp16 --timingCacheFile=t.cache")
    cmd = trtexec_command(bundle, "fp16", 8, trt_version="11.4.0", gpu_name="Thor")
    assert f"--onnx={b}/model.fp16.onnx" in cmd and cmd.endswith("--stronglyTyped")
    cmd = trtexec_command(bundle, "int8", 4, dla=1, trt_version="8.6.1", gpu_name="Orin")
    assert "model.int8.onnx" in cmd and "--int8 --useDLACore=1 --allowGPUFallback" in cmd
    assert "--minShapes=input:4x3x24x32 --optShapes=input:4x3x24x32 --maxShapes=input:4x3x24x32" in cmd  # DLA: static


def test_cli_without_tensorrt_exits_2_with_one_line(bundle):
    code = BLOCK_HEAVY + f"""
from mnet.cli import main
raise SystemExit(main(["export", "tensorrt", {str(bundle)!r}, "--precision", "fp16"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "JetPack" in lines[0]


def test_cli_print_trtexec_needs_no_tensorrt(bundle, capsys):
    from mnet.cli import main

    assert main(["export", "tensorrt", str(bundle), "--precision", "int8", "--max-batch", "16",
                 "--print-trtexec"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trtexec --onnx=") and "--maxShapes=input:16x3x24x32" in out


def test_cli_builds_with_fake_tensorrt(fake, bundle, capsys):
    fake("10.3.0")
    from mnet.cli import main

    assert main(["export", "tensorrt", str(bundle), "--precision", "fp16", "--max-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "model.fp16.10.3.0.fake-gpu-9000.engine" in out and "batch 1..2" in out
    assert main(["bundle", "show", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "engine" in out and "TensorRT 10.3.0" in out and "Fake GPU" in out


# --- the real thing ------------------------------------------------------------------------------
def _real_tensorrt_and_cuda() -> bool:
    try:
        import tensorrt  # noqa: F401

        from mnet.runtime.backends import cuda_runtime

        cuda_runtime().device()
        return True
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _real_tensorrt_and_cuda(), reason="needs CUDA and the tensorrt Python package")
def test_real_engine_build_and_run(colour_data, tmp_path_factory, tmp_path):
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    x = np.random.default_rng(0).normal(size=(5, 3, 24, 32)).astype(np.float32)
    with open_backend(b, "onnxruntime", providers="cpu") as ref:
        want = ref.infer(x)
    for precision, atol in (("fp32", 1e-3), ("fp16", 2e-2)):
        build = build_engine(b, precision, max_batch=4)
        assert Path(build.path).is_file() and load_bundle(b).engines()
        with open_backend(b, "tensorrt", precision) as be:
            np.testing.assert_allclose(be.infer(x), want, atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not _real_tensorrt_and_cuda(), reason="needs CUDA and the tensorrt Python package")
def test_real_int8_engine_builds_from_the_calibrated_model(colour_data, tmp_path_factory, tmp_path):
    """The file `mnet calibrate int8` writes is one the real TensorRT parser and builder take."""
    from mnet.calibration.int8 import calibrate_int8

    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    calibrate_int8(b, colour_data, samples=32)
    build = build_engine(b, "int8", max_batch=4)
    assert build.info.onnx_file == "model.int8.onnx"
    x = np.random.default_rng(0).normal(size=(5, 3, 24, 32)).astype(np.float32)
    with open_backend(b, "onnxruntime", "int8", providers="cpu") as ref:
        want = ref.infer(x)
    with open_backend(b, "tensorrt", "int8") as be:
        np.testing.assert_allclose(be.infer(x), want, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _real_tensorrt_and_cuda(), reason="needs CUDA and the tensorrt Python package")
def test_real_fixed_batch_engine_and_profile_errors(colour_data, tmp_path_factory, tmp_path):
    """A fixed-batch bundle's engine pads one crop (the warm-up) and three crops to its batch, and a shape
    outside a dynamic engine's profile is the one-line error (the real set_input_shape answers False)."""
    from mnet.export.onnx import export_onnx
    from test_export_support import trained_checkpoint

    fixed = export_onnx(trained_checkpoint(colour_data, tmp_path_factory), tmp_path / "fixed", batch=2,
                        parity_images=4).path
    build_engine(fixed, "fp32", max_batch=2)
    x = np.random.default_rng(0).normal(size=(3, 3, 24, 32)).astype(np.float32)
    with open_backend(fixed, "onnxruntime", providers="cpu") as ref:
        want = ref.infer(x)
    with open_backend(fixed, "tensorrt", "fp32") as be:
        assert (be.exact_batch, be.max_batch) == (2, 2)
        _warmup(fixed, be)
        np.testing.assert_allclose(be.infer(x), want, atol=1e-3)
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    build_engine(b, "fp32", max_batch=4)
    with open_backend(b, "tensorrt", "fp32") as be:
        assert (be.exact_batch, be.max_batch) == (None, 4)
        with pytest.raises(BackendError, match=r"refused input shape \(5, 3, 24, 32\).*\(1, 3, 24, 32\) to \(4, 3"):
            be._run(np.zeros((5, 3, 24, 32), np.float32))
        np.testing.assert_allclose(be.infer(x), be.infer(x[:1]).tolist() + be.infer(x[1:]).tolist(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _real_tensorrt_and_cuda(), reason="needs CUDA and the tensorrt Python package")
def test_real_dla_engine_takes_exactly_its_batch(colour_data, tmp_path_factory, tmp_path):
    """On a Jetson with DLA (Xavier, Orin; TensorRT <= 10.7): the static-profile DLA build succeeds and runs."""
    import tensorrt as trt

    if getattr(trt.Builder(trt.Logger(trt.Logger.WARNING)), "num_DLA_cores", 0) < 1:
        pytest.skip("this device has no DLA core")
    b = copy_bundle(exported_bundle(colour_data, tmp_path_factory), tmp_path / "b")
    build = build_engine(b, "fp16", max_batch=4, dla=0)
    assert (build.info.min_batch, build.info.max_batch) == (4, 4)
    x = np.random.default_rng(0).normal(size=(5, 3, 24, 32)).astype(np.float32)
    with open_backend(b, "onnxruntime", providers="cpu") as ref:
        want = ref.infer(x)
    with open_backend(b, "tensorrt", "fp16") as be:
        assert be.exact_batch == 4
        _warmup(b, be)
        np.testing.assert_allclose(be.infer(x), want, atol=2e-2)
