"""TensorRT glue, tested against a test double of the `tensorrt` and cuda-python modules.

The double follows the documented Python API of each line: 8.4 (binding API only), 8.6 (tensor-name
API, EXPLICIT_BATCH), 10.x (STRONGLY_TYPED, FP16/INT8 flags still there, EXPLICIT_BATCH ignored) and
11.x (no FP16/INT8 flags). Its "device memory" is host memory at real addresses and its engine
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
from mnet.export.tensorrt import build_engine, trtexec_command
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


def make_trt(version: str, *, fail_build: bool = False):
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
        num_DLA_cores = 0

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
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            classes = out.type.tensor_type.shape.dim[1].dim_value
            hi = config.profiles[0].shapes[inp.name][2]
            plan = {"input": inp.name, "output": out.name, "hw": dims[2:], "classes": classes, "max": hi[0],
                    "w": np.random.default_rng(classes).normal(size=(3, classes)).round(3).tolist()}
            return memoryview(b"FAKEPLAN" + json.dumps(plan).encode())

    trt.Builder = Builder
    trt.OnnxParser = _Parser

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses, self.shapes, self.calls = engine, {}, [], []

        def _compute(self, shape, x_ptr, y_ptr):
            n, hw, c = shape[0], self.engine.plan["hw"], self.engine.plan["classes"]
            x = np.frombuffer((ctypes.c_float * (n * 3 * hw[0] * hw[1])).from_address(x_ptr), np.float32)
            logits = x.reshape(n, 3, *hw).mean((2, 3)) @ np.asarray(self.engine.plan["w"], np.float32)
            ctypes.memmove(y_ptr, np.ascontiguousarray(logits, np.float32).ctypes.data, n * c * 4)
            return True

        # tensor-name API (8.5+)
        def set_input_shape(self, name, shape):
            self.shapes.append(tuple(shape))
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            self.calls.append(stream_handle)
            p = self.engine.plan
            return self._compute(self.shapes[-1], self.addresses[p["input"]], self.addresses[p["output"]])

        # binding API (<= 8.4)
        def set_binding_shape(self, index, shape):
            self.shapes.append(tuple(shape))
            return True

        def execute_async_v2(self, bindings, stream_handle):
            self.calls.append(stream_handle)
            return self._compute(self.shapes[-1], bindings[0], bindings[1])

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            self.contexts = []

        def _meta(self, i):
            p = self.plan
            return [(p["input"], "INPUT", (-1, 3, *p["hw"])), (p["output"], "OUTPUT", (-1, p["classes"]))][i]

        def create_execution_context(self):
            self.contexts.append(Context(self))
            return self.contexts[-1]

    if (major, minor) >= (8, 5):
        Engine.num_io_tensors = 2
        Engine.get_tensor_name = lambda self, i: self._meta(i)[0]
        Engine.get_tensor_mode = lambda self, n: {m[0]: m[1] for m in map(self._meta, (0, 1))}[n]
        Engine.get_tensor_dtype = lambda self, n: "FLOAT"
        Engine.get_tensor_shape = lambda self, n: {m[0]: m[2] for m in map(self._meta, (0, 1))}[n]
    else:
        Engine.num_bindings = 2
        Engine.get_binding_name = lambda self, i: self._meta(i)[0]
        Engine.binding_is_input = lambda self, i: i == 0
        Engine.get_binding_dtype = lambda self, i: "FLOAT"
        Engine.get_binding_shape = lambda self, i: self._meta(i)[2]

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
    rt.cudaError_t = _Flags(cudaSuccess=0, cudaErrorMemoryAllocation=2)
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

    def install(version="10.3.0", gpu=_GPU, cc=_CC, fail_build=False, fail_malloc=False):
        trt = make_trt(version, fail_build=fail_build)
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
