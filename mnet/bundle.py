"""The bundle: a directory that carries one exported model and everything needed to run it.

    bundle/
      mnet.json                                  the card (this module): authoritative, updated in place
      model.onnx                                 fp32, dynamic batch, metadata_props["mnet.card"] = card JSON
      model.int8.onnx                            optional, QDQ (`mnet calibrate int8`)
      model.fp16.onnx                            optional, half precision (`mnet export fp16`; TensorRT 11 fp16)
      model.<precision>.<trt>.<gpu>.engine       optional TensorRT engines, never with bytes prepended ...
      model.<precision>.<trt>.<gpu>.engine.json  ... each with its sidecar (`EngineInfo`)

`model.onnx` carries the card as it was at export time, so a copy of the ONNX file alone still knows its
classes and preprocessing; `mnet.json` is the one later stages update (INT8 results, latencies).

The model's output is raw logits (`output == "logits"`): every backend applies the softmax, so the
INT8 model quantises logits rather than probabilities squeezed into 1/256 steps, and the parity check
compares logits. Plain stdlib + `mnet.arch` / `mnet.preprocess`: the runtime imports this on a Jetson
without torch (a test proves it).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mnet.arch import Arch
from mnet.errors import CheckpointError, ConfigError, MnetError
from mnet.io import read_json, write_json
from mnet.preprocess import Preprocess

__all__ = [
    "CARD_FILE",
    "FP16_FILE",
    "INT8_FILE",
    "METADATA_KEY",
    "ONNX_FILE",
    "PRECISIONS",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleCard",
    "EngineInfo",
    "engine_filename",
    "load_bundle",
    "precision_choice_key",
    "update_card",
    "utc_now",
    "write_card",
]

SCHEMA_VERSION = 1
CARD_FILE = "mnet.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"
METADATA_KEY = "mnet.card"
PRECISIONS = ("fp32", "fp16", "int8")
_OUTPUTS = ("logits", "probs")
# update_card merges these key by key instead of replacing them (precision_choice: one entry per backend/device)
_MERGED = ("metrics", "latency", "precision_choice")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _need(cond: bool, what: str, name: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{what} field '{name}' = {value!r} is invalid: {fix}")


def _missing(what: str, d: Mapping[str, Any], required: set[str]) -> None:
    missing = sorted(required - set(d))
    if missing:
        raise ConfigError(f"{what} is missing field(s) {missing}")


def _is_json_object(v: Any) -> bool:
    return isinstance(v, Mapping) and all(isinstance(k, str) for k in v)


def precision_choice_key(backend: str, device: str) -> str:
    """The `precision_choice` key of a backend on a device: "onnxruntime/cpu:<cpu model>", "tensorrt/cuda:Orin"."""
    return f"{backend}/{device}"


def _check_precision_choice(key: str, e: Any) -> None:
    """One `precision_choice` entry (written by `mnet bundle bench --all`, mnet.runtime.benchmark)."""
    w, name = "bundle card", f"precision_choice[{key!r}]"
    _need(_is_json_object(e), w, name, e, "expected a JSON object")
    _missing(f"bundle card {name}", e, {"backend", "device", "chosen", "measured", "tolerance_points"})
    _need(key == precision_choice_key(e["backend"], e["device"]), w, f"{name}.device", e["device"],
          f"the key must be '<backend>/<device>' = {precision_choice_key(e['backend'], e['device'])!r}")
    m = e["measured"]
    _need(_is_json_object(m) and "fp32" in m and all(p in PRECISIONS and isinstance(v, (int, float))
                                                     and not isinstance(v, bool) and v > 0 for p, v in m.items()),
          w, f"{name}.measured", m, f"expected {{precision: p50_ms > 0}} with fp32 among {list(PRECISIONS)}")
    _need(e["chosen"] in m, w, f"{name}.chosen", e["chosen"], f"expected one of the measured {sorted(m)}")
    t = e["tolerance_points"]
    _need(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0, w, f"{name}.tolerance_points", t,
          "expected a number of accuracy points >= 0")


@dataclass(frozen=True)
class BundleCard:
    """`mnet.json`: what the model is, how to feed it, how good and how fast it is, where it came from.

    `metrics` holds `dev` (from the checkpoint), `parity` (ONNX vs PyTorch), `int8` (calibration) and `fp16`
    (`mnet export fp16 BUNDLE DATA`), each of the last two with the sha256 of the model file it measured;
    `latency` is filled by the stages that measure it, keyed by whatever they measured (e.g.
    "onnxruntime/cpu/fp32/b1"). `precision_choice` holds, per "<backend>/<device>", the precision
    `mnet bundle bench --all` measured fastest within the accuracy tolerance (`--precision auto`). `open_set` is the runtime's open-set gate calibration (max-softmax
    threshold on dev, `mnet.calibration.open_set`; read by runtime/gate.py), empty until calibrated. Treat the dict fields as read-only: change a card with `update_card`.
    """

    classes: tuple[str, ...]
    preprocess: Preprocess
    params: int
    arch: Arch | None = None
    model_name: str | None = None  # set for torchvision baselines (arch is None)
    macs: int | None = None
    input_name: str = "input"
    output_name: str = "logits"
    output: str = "logits"  # what the output holds; backends apply softmax to logits
    batch: int | None = None  # None = dynamic batch
    opset: int = 17
    metrics: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint path, sha256, epoch
    tools: dict[str, Any] = field(default_factory=dict)  # mnet, torch, onnx, onnxruntime, opset, exporter
    open_set: dict[str, Any] = field(default_factory=dict)  # gate calibration (score, min_confidence, split, ...)
    precision_choice: dict[str, Any] = field(default_factory=dict)  # {"<backend>/<device>": {chosen, measured, ...}}
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        w = "bundle card"
        _need(self.schema_version == SCHEMA_VERSION, w, "schema_version", self.schema_version,
              f"this mnet reads schema_version {SCHEMA_VERSION}; use the mnet that wrote the bundle or re-export")
        c = self.classes
        _need(isinstance(c, tuple) and len(c) >= 2 and all(isinstance(x, str) and x for x in c) and len(set(c)) == len(c),
              w, "classes", c, "expected two or more distinct non-empty class names")
        _need(isinstance(self.preprocess, Preprocess), w, "preprocessing", self.preprocess, "expected a preprocess object")
        _need(self.arch is not None or bool(self.model_name), w, "arch", self.arch,
              "expected an arch (MNet) or a model_name (baseline)")
        if self.arch is not None:
            _need(isinstance(self.arch, Arch), w, "arch", self.arch, "expected an Arch")
            _need(self.arch.num_classes == len(c), w, "arch.num_classes", self.arch.num_classes,
                  f"the card lists {len(c)} classes")
            _need(tuple(self.arch.input_hw) == tuple(self.preprocess.input_hw), w, "preprocessing.input_hw",
                  list(self.preprocess.input_hw), f"the arch's input_hw is {list(self.arch.input_hw)}")
        _need(self.model_name is None or isinstance(self.model_name, str), w, "model_name", self.model_name,
              "expected a string or null")
        _need(isinstance(self.params, int) and self.params >= 0, w, "params", self.params, "expected an integer >= 0")
        _need(self.macs is None or (isinstance(self.macs, int) and self.macs >= 0), w, "macs", self.macs,
              "expected an integer >= 0 or null")
        for name in ("input_name", "output_name"):
            v = getattr(self, name)
            _need(isinstance(v, str) and bool(v), w, name, v, "expected a non-empty tensor name")
        _need(self.output in _OUTPUTS, w, "output", self.output, f"expected one of {list(_OUTPUTS)}")
        _need(self.batch is None or (isinstance(self.batch, int) and not isinstance(self.batch, bool) and self.batch >= 1),
              w, "batch", self.batch, "expected null (dynamic) or an integer >= 1")
        _need(isinstance(self.opset, int) and 7 <= self.opset <= 30, w, "opset", self.opset, "expected an ONNX opset number")
        for name in ("metrics", "latency", "source", "tools", "open_set", "precision_choice"):
            v = getattr(self, name)
            _need(_is_json_object(v), w, name, v, "expected a JSON object")
        for key, entry in self.precision_choice.items():
            _check_precision_choice(key, entry)
        _need(isinstance(self.created, str), w, "created", self.created, "expected an ISO timestamp string")

    # --- derived -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.preprocess.input_hw)

    @property
    def input_shape(self) -> list[int | str]:
        """NCHW with "batch" for a dynamic batch dimension."""
        return ["batch" if self.batch is None else self.batch, 3, *self.input_hw]

    @property
    def display_name(self) -> str:
        return self.model_name or "mnet"

    # --- json ----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.display_name,
            "arch": self.arch.to_json() if self.arch is not None else None,
            "model_name": self.model_name,
            "classes": list(self.classes),
            "preprocessing": self.preprocess.to_json(),
            "input": {"name": self.input_name, "shape": self.input_shape, "dtype": "float32", "layout": "NCHW"},
            "output": {"name": self.output_name, "shape": [self.input_shape[0], self.num_classes],
                       "dtype": "float32", "holds": self.output},
            "opset": self.opset,
            "params": self.params,
            "macs": self.macs,
            "metrics": dict(self.metrics),
            "latency": dict(self.latency),
            "source": dict(self.source),
            "tools": dict(self.tools),
            "open_set": dict(self.open_set),
            "precision_choice": dict(self.precision_choice),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, d: Any) -> BundleCard:
        if not isinstance(d, dict):
            raise ConfigError(f"bundle card must be a JSON object, got {type(d).__name__}")
        _missing("bundle card", d, {"classes", "preprocessing", "params", "input", "output"})
        sv = d.get("schema_version", SCHEMA_VERSION)
        _need(sv == SCHEMA_VERSION, "bundle card", "schema_version", sv,
              f"this mnet reads schema_version {SCHEMA_VERSION}; use the mnet that wrote the bundle or re-export")
        classes = d["classes"]
        _need(isinstance(classes, list), "bundle card", "classes", classes, "expected a list of class names")
        arch = None
        if d.get("arch") is not None:
            try:
                arch = Arch.from_json(d["arch"])
            except ConfigError as e:
                raise ConfigError(f"bundle card field 'arch': {e}") from None
        try:
            pre = Preprocess.from_json(d["preprocessing"])
        except (ConfigError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"bundle card field 'preprocessing': {e}") from None
        inp, out = d["input"], d["output"]
        _need(isinstance(inp, dict) and isinstance(inp.get("shape"), list) and len(inp["shape"]) == 4,
              "bundle card", "input", inp, "expected {name, shape: [batch, 3, H, W], ...}")
        _need(isinstance(out, dict), "bundle card", "output", out, "expected {name, holds, ...}")
        b = inp["shape"][0]
        batch = None if b in ("batch", None, -1) else b
        return cls(
            schema_version=sv,
            arch=arch,
            model_name=d.get("model_name"),
            classes=tuple(classes),
            preprocess=pre,
            input_name=inp.get("name", "input"),
            output_name=out.get("name", "logits"),
            output=out.get("holds", "logits"),
            batch=batch,
            opset=d.get("opset", 17),
            params=d["params"],
            macs=d.get("macs"),
            metrics=d.get("metrics") or {},
            latency=d.get("latency") or {},
            source=d.get("source") or {},
            tools=d.get("tools") or {},
            open_set=d.get("open_set") or {},
            precision_choice=d.get("precision_choice") or {},
            created=d.get("created", ""),
        )


def _slug(text: str) -> str:
    """File-name-safe lower-case token: 'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def engine_filename(precision: str, trt_version: str, gpu_name: str) -> str:
    """`model.<precision>.<trt-version>.<gpu>.engine` (DESIGN: engines are per device and version)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    return f"model.{precision}.{_slug(trt_version)}.{_slug(gpu_name)}.engine"


@dataclass(frozen=True)
class EngineInfo:
    """The `*.engine.json` sidecar: what a TensorRT engine was built from, with what, and for which GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    input_name: str
    output_name: str
    input_hw: tuple[int, int]
    onnx_file: str
    onnx_sha256: str
    strongly_typed: bool = False
    workspace_mb: int | None = None
    dla_core: int | None = None
    built: str = ""
    mnet_version: str = ""
    # the engine file this sidecar describes, so a pair left inconsistent by a crash mid-build is refused;
    # None in sidecars written before mnet recorded them
    engine_sha256: str | None = None
    engine_bytes: int | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        w = "engine sidecar"
        _need(self.schema_version == SCHEMA_VERSION, w, "schema_version", self.schema_version,
              f"this mnet reads schema_version {SCHEMA_VERSION}; rebuild the engine")
        _need(self.precision in PRECISIONS, w, "precision", self.precision, f"expected one of {list(PRECISIONS)}")
        for name in ("tensorrt_version", "gpu_name", "input_name", "output_name", "onnx_file"):
            v = getattr(self, name)
            _need(isinstance(v, str) and bool(v), w, name, v, "expected a non-empty string")
        cc = self.compute_capability
        _need(isinstance(cc, tuple) and len(cc) == 2 and all(isinstance(v, int) for v in cc), w,
              "compute_capability", cc, "expected [major, minor]")
        _need(all(isinstance(v, int) and v >= 1 for v in (self.min_batch, self.opt_batch, self.max_batch))
              and self.min_batch <= self.opt_batch <= self.max_batch, w, "max_batch",
              (self.min_batch, self.opt_batch, self.max_batch), "expected 1 <= min <= opt <= max")
        _need(isinstance(self.input_hw, tuple) and len(self.input_hw) == 2, w, "input_hw", self.input_hw,
              "expected [height, width]")
        _need(isinstance(self.onnx_sha256, str) and len(self.onnx_sha256) == 64, w, "onnx_sha256",
              self.onnx_sha256, "expected a sha256 hex digest")
        _need(self.engine_sha256 is None or (isinstance(self.engine_sha256, str) and len(self.engine_sha256) == 64),
              w, "engine_sha256", self.engine_sha256, "expected a sha256 hex digest")
        _need(self.engine_bytes is None or (isinstance(self.engine_bytes, int) and self.engine_bytes > 0), w,
              "engine_bytes", self.engine_bytes, "expected the engine file's size in bytes")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        d["input_hw"] = list(self.input_hw)
        return d

    @classmethod
    def from_json(cls, d: Any) -> EngineInfo:
        if not isinstance(d, dict):
            raise ConfigError(f"engine sidecar must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        _missing("engine sidecar", d, required)
        kw = {k: v for k, v in d.items() if k in names}
        try:
            kw["compute_capability"] = tuple(int(v) for v in d["compute_capability"])
            kw["input_hw"] = tuple(int(v) for v in d["input_hw"])
        except (TypeError, ValueError):
            raise ConfigError(f"engine sidecar fields 'compute_capability'/'input_hw' = "
                              f"{d['compute_capability']!r}/{d['input_hw']!r}: expected two integers each") from None
        return cls(**kw)


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its directory and card, with the paths of what it holds."""

    path: Path
    card: BundleCard

    @property
    def card_path(self) -> Path:
        return self.path / CARD_FILE

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def int8_path(self) -> Path:
        return self.path / INT8_FILE

    @property
    def fp16_path(self) -> Path:
        return self.path / FP16_FILE

    def engines(self) -> list[tuple[Path, EngineInfo | None, str]]:
        """Every `*.engine` with its sidecar, or None and the reason the sidecar cannot be used."""
        out: list[tuple[Path, EngineInfo | None, str]] = []
        for p in sorted(self.path.glob("*.engine")):
            side = p.with_name(p.name + ".json")
            try:
                out.append((p, EngineInfo.from_json(read_json(side, "engine sidecar")), ""))
            except MnetError as e:
                out.append((p, None, str(e)))
        return out


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle directory, validating its card; errors name the file and say what to do."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"bundle not found: {path} (expected a directory with {CARD_FILE} and {ONNX_FILE}, "
                              "written by `mnet export onnx`)")
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise CheckpointError(f"{path}: no {CARD_FILE}, so not a bundle; export one with `mnet export onnx`")
    try:
        card = BundleCard.from_json(read_json(card_path, "bundle card"))
    except ConfigError as e:
        raise CheckpointError(f"{card_path}: {e}") from None
    if not (path / ONNX_FILE).is_file():
        raise CheckpointError(f"{path}: {ONNX_FILE} is missing; copy the whole bundle directory or re-export it")
    return Bundle(path, card)


def write_card(path: str | os.PathLike, card: BundleCard) -> None:
    """Write `mnet.json` atomically into the bundle directory `path`."""
    write_json(Path(path) / CARD_FILE, card.to_json())


def update_card(path: str | os.PathLike, **changes: Any) -> BundleCard:
    """Change card fields atomically and return the new card.

    `metrics` and `latency` are merged key by key (so stages filling different keys do not clobber
    each other); any other field is replaced. The result is validated before anything is written.
    """
    bundle = load_bundle(path)
    names = {f.name for f in dataclasses.fields(BundleCard)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigError(f"update_card: unknown card field(s) {unknown}; known: {sorted(names)}")
    new: dict[str, Any] = {}
    for k, v in changes.items():
        if k in _MERGED:
            if not _is_json_object(v):
                raise ConfigError(f"bundle card field '{k}' = {v!r} is invalid: expected a JSON object")
            new[k] = {**getattr(bundle.card, k), **v}
        else:
            new[k] = v
    card = dataclasses.replace(bundle.card, **new)
    write_card(bundle.path, card)
    return card
