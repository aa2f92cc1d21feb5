"""The `Arch` contract (arch.json), the MNet macro search space and its presets.

An architecture is plain data: input size, width, stem stride, where the reductions are, and per
layer a (kernel, dilation, skip) triple. One builder (`mnet.search.model.MNet`) turns it into a
network, and the supernet runs the same ops, so everything that counts parameters or MACs lives here
and is shared with the model (a test checks `num_params()` against the built model).

Geometry (DESIGN "Search space"): node 0 is the stem output, node i the output of layer i. Layer i
runs at the resolution of its input; a reduction after layer r halves the running tensor (2x2 average
pool) before layer r+1, and a skip source consumed at a lower resolution is pooled the same way.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from mnet.errors import ConfigError

__all__ = [
    "SCHEMA_VERSION",
    "KERNELS",
    "DILATIONS",
    "OPS",
    "Layer",
    "Arch",
    "SearchSpace",
    "PRESETS",
    "get_preset",
    "cropped_kernel",
    "op_key",
    "build_space",
    "parse_hw",
    "parse_ints",
]

SCHEMA_VERSION = 1
KERNELS: tuple[int, ...] = tuple(range(3, 40, 4))  # 3, 7, ..., 39 (paper §3.2)
DILATIONS: tuple[int, ...] = (1, 2)
# The 20 ops, in the order the controller indexes them.
OPS: tuple[tuple[int, int], ...] = tuple((k, d) for k in KERNELS for d in DILATIONS)


def op_key(kernel: int, dilation: int, h: int, w: int) -> tuple[int, int, int]:
    """What an op computes at an h×w map: (kh, kw, dilation) after cropping, the dilation 1 where the
    kernel is 1×1. Ops with equal keys are the same function (and share weights in the supernet)."""
    kh, kw = cropped_kernel(kernel, dilation, h, w)
    return kh, kw, dilation if (kh, kw) != (1, 1) else 1


def cropped_kernel(kernel: int, dilation: int, h: int, w: int) -> tuple[int, int]:
    """Kernel extent (kh, kw) after removing taps that only ever see zero padding.

    With 'same' padding a tap at offset o = dilation*(i - (k-1)/2) reads input y+o for outputs y in
    [0, h); if |o| > h-1 every read is padding, so the tap contributes exactly zero and can go.
    What remains is symmetric about the centre, so padding stays 'same'.
    """
    half = (kernel - 1) // 2
    return (2 * min(half, (h - 1) // dilation) + 1, 2 * min(half, (w - 1) // dilation) + 1)


@dataclass(frozen=True)
class Layer:
    kernel: int
    dilation: int
    skip: int | None = None

    @property
    def op_index(self) -> int:
        return OPS.index((self.kernel, self.dilation))


def _need(cond: bool, field_name: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"arch field '{field_name}' = {value!r} is invalid: {fix}")


@dataclass(frozen=True)
class Arch:
    """One MNet architecture; validated on construction (the bad field is named)."""

    input_hw: tuple[int, int]
    width: int
    stem_stride: int
    reductions: tuple[int, ...]
    num_classes: int
    layers: tuple[Layer, ...]
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _need(self.schema_version == SCHEMA_VERSION, "schema_version", self.schema_version,
              f"this mnet reads schema_version {SCHEMA_VERSION}")
        hw = self.input_hw
        _need(isinstance(hw, tuple) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw),
              "input_hw", hw, "expected [height, width], two positive integers")
        _need(isinstance(self.width, int) and self.width > 0, "width", self.width, "expected a positive integer")
        _need(self.stem_stride in (1, 2), "stem_stride", self.stem_stride, "expected 1 or 2")
        _need(isinstance(self.num_classes, int) and self.num_classes >= 2, "num_classes", self.num_classes,
              "expected an integer >= 2")
        n = len(self.layers)
        _need(n >= 1, "layers", list(self.layers), "expected at least one layer")
        red = self.reductions
        _need(all(isinstance(r, int) and 1 <= r < n for r in red) and list(red) == sorted(set(red)),
              "reductions", list(red), f"expected increasing distinct layer numbers in 1..{n - 1}")
        for i, layer in enumerate(self.layers, start=1):
            _need(isinstance(layer, Layer), f"layers[{i - 1}]", layer, "expected {kernel, dilation, skip}")
            # any odd kernel and positive dilation: a search space may choose its own op set (--kernels)
            _need(isinstance(layer.kernel, int) and layer.kernel >= 1 and layer.kernel % 2 == 1,
                  f"layers[{i - 1}].kernel", layer.kernel, "expected an odd positive integer (e.g. 3, 7, ..., 39)")
            _need(isinstance(layer.dilation, int) and layer.dilation >= 1, f"layers[{i - 1}].dilation", layer.dilation,
                  "expected a positive integer (e.g. 1 or 2)")
            _need(layer.skip is None or (isinstance(layer.skip, int) and 0 <= layer.skip < i),
                  f"layers[{i - 1}].skip", layer.skip, f"expected null or a node in 0..{i - 1} (0 = stem)")
        h, w = self.node_hw(n)
        _need(h >= 1 and w >= 1, "input_hw", hw, "too small for the stem stride and reductions")

    # --- geometry -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def level(self, node: int) -> int:
        """How many reductions come before layer `node` runs (node 0, the stem, is level 0)."""
        return sum(1 for r in self.reductions if r < node)

    def node_hw(self, node: int) -> tuple[int, int]:
        h = math.ceil(self.input_hw[0] / self.stem_stride)
        w = math.ceil(self.input_hw[1] / self.stem_stride)
        for _ in range(self.level(node)):
            h, w = h // 2, w // 2
        return h, w

    def layer_kernel_hw(self, i: int) -> tuple[int, int]:
        """Cropped depthwise kernel extent of layer i (1-based)."""
        layer = self.layers[i - 1]
        return cropped_kernel(layer.kernel, layer.dilation, *self.node_hw(i))

    # --- cost -----------------------------------------------------------------------------
    def num_params(self) -> int:
        """Trainable parameters of the built model (cropped kernels, BN affine, head)."""
        c = self.width
        total = 3 * 9 * c + 2 * c  # stem conv (no bias) + BN
        for i in range(1, self.num_layers + 1):
            kh, kw = self.layer_kernel_hw(i)
            total += c * kh * kw + 2 * c + c * c + 2 * c  # depthwise + BN + pointwise + BN
        return total + c * self.num_classes + self.num_classes

    def macs(self) -> int:
        """Multiply-accumulates of one image (convs and the linear head; adds and pools are free)."""
        c = self.width
        h, w = self.node_hw(0)
        total = h * w * c * 27
        for i in range(1, self.num_layers + 1):
            kh, kw = self.layer_kernel_hw(i)
            h, w = self.node_hw(i)
            total += h * w * c * (kh * kw + c)
        return total + c * self.num_classes

    # --- json -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "input_hw": list(self.input_hw),
            "width": self.width,
            "stem_stride": self.stem_stride,
            "reductions": list(self.reductions),
            "num_classes": self.num_classes,
            "layers": [asdict(x) for x in self.layers],
        }

    @classmethod
    def from_json(cls, d: Any) -> "Arch":
        if not isinstance(d, dict):
            raise ConfigError(f"arch must be a JSON object, got {type(d).__name__}")
        known = {"schema_version", "input_hw", "width", "stem_stride", "reductions", "num_classes", "layers"}
        missing = known - {"schema_version"} - set(d)
        if missing:
            raise ConfigError(f"arch is missing field(s) {sorted(missing)}")
        layers = d["layers"]
        _need(isinstance(layers, list), "layers", layers, "expected a list of {kernel, dilation, skip}")
        parsed = []
        for i, x in enumerate(layers):
            _need(isinstance(x, dict) and {"kernel", "dilation"} <= set(x), f"layers[{i}]", x,
                  "expected {kernel, dilation, skip}")
            parsed.append(Layer(kernel=x["kernel"], dilation=x["dilation"], skip=x.get("skip")))
        hw, red = d["input_hw"], d["reductions"]
        _need(isinstance(hw, list), "input_hw", hw, "expected [height, width]")
        _need(isinstance(red, list), "reductions", red, "expected a list of layer numbers")
        return cls(
            schema_version=d.get("schema_version", SCHEMA_VERSION),
            input_hw=tuple(hw),
            width=d["width"],
            stem_stride=d["stem_stride"],
            reductions=tuple(red),
            num_classes=d["num_classes"],
            layers=tuple(parsed),
        )

    def replace_layers(self, layers: Sequence[Layer]) -> "Arch":
        return Arch(self.input_hw, self.width, self.stem_stride, self.reductions, self.num_classes, tuple(layers))


@dataclass(frozen=True)
class SearchSpace:
    """The macro skeleton (everything but the per-layer choices) plus the choices themselves."""

    name: str
    num_layers: int
    width: int
    input_hw: tuple[int, int]
    stem_stride: int
    num_classes: int = 3
    ops: tuple[tuple[int, int], ...] = OPS
    reductions: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.reductions:
            # DESIGN: reductions after layers L/3 and 2L/3.
            red = tuple(sorted({max(1, self.num_layers // 3), max(1, 2 * self.num_layers // 3)} - {self.num_layers}))
            object.__setattr__(self, "reductions", red)
        if not self.ops or len(set(self.ops)) != len(self.ops):
            raise ConfigError(f"search space '{self.name}': ops {list(self.ops)} must be distinct and non-empty")
        for op in self.ops:  # validates the skeleton and every op (Arch names the bad field)
            self.skeleton([Layer(*op)] * self.num_layers)

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    def size(self) -> int:
        """Number of architectures: |ops|^L x (L+1)! (layer i has i+1 skip choices)."""
        return self.num_ops ** self.num_layers * math.factorial(self.num_layers + 1)

    def op_keys(self, layer: int) -> list[tuple[int, int, int]]:
        """`op_key` of every op at layer `layer` (1-based): equal keys are the same function there."""
        hw = self.skeleton([Layer(*self.ops[0])] * self.num_layers).node_hw(layer)
        return [op_key(k, d, *hw) for k, d in self.ops]

    def effective_size(self) -> int:
        """Distinct networks: exact cropping makes some ops identical at small maps (a 39x39 kernel on
        6x8 is an 11x15), so each layer counts its distinct functions, not its ops."""
        n = math.factorial(self.num_layers + 1)
        for i in range(1, self.num_layers + 1):
            n *= len(set(self.op_keys(i)))
        return n

    def skeleton(self, layers: Sequence[Layer]) -> Arch:
        return Arch(self.input_hw, self.width, self.stem_stride, self.reductions, self.num_classes, tuple(layers))

    def arch(self, ops: Sequence[int], skips: Sequence[int | None]) -> Arch:
        """Arch from per-layer op indices and skip choices."""
        return self.skeleton([Layer(*self.ops[o], skip=s) for o, s in zip(ops, skips, strict=True)])

    def sample(self, rng: random.Random) -> Arch:
        """Uniformly random architecture (each layer: op uniform, skip uniform over i+1 choices)."""
        ops = [rng.randrange(self.num_ops) for _ in range(self.num_layers)]
        skips = [rng.choice([None, *range(i)]) for i in range(1, self.num_layers + 1)]
        return self.arch(ops, skips)

    def contains(self, arch: Arch) -> bool:
        return (
            arch.num_layers == self.num_layers
            and arch.width == self.width
            and arch.input_hw == self.input_hw
            and arch.stem_stride == self.stem_stride
            and arch.reductions == self.reductions
            and all((x.kernel, x.dilation) in self.ops for x in arch.layers)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_layers": self.num_layers,
            "width": self.width,
            "input_hw": list(self.input_hw),
            "stem_stride": self.stem_stride,
            "num_classes": self.num_classes,
            "ops": [list(op) for op in self.ops],
            "reductions": list(self.reductions),
        }

    @classmethod
    def from_json(cls, d: Any) -> "SearchSpace":
        try:
            return cls(name=str(d["name"]), num_layers=int(d["num_layers"]), width=int(d["width"]),
                       input_hw=tuple(int(v) for v in d["input_hw"]), stem_stride=int(d["stem_stride"]),
                       num_classes=int(d["num_classes"]), ops=tuple(tuple(int(v) for v in op) for op in d["ops"]),
                       reductions=tuple(int(v) for v in d["reductions"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"search space: missing or bad field ({type(e).__name__}: {e})") from None

    def with_classes(self, num_classes: int) -> "SearchSpace":
        return SearchSpace(self.name, self.num_layers, self.width, self.input_hw, self.stem_stride,
                           num_classes, self.ops, self.reductions)

    def describe(self) -> str:
        """One line naming the skeleton, for error messages."""
        return (f"'{self.name}' ({self.num_layers} layers, width {self.width}, input {self.input_hw[0]}x"
                f"{self.input_hw[1]}, stem stride {self.stem_stride}, kernels {sorted({k for k, _ in self.ops})}, "
                f"dilations {sorted({d for _, d in self.ops})})")


PRESETS: dict[str, SearchSpace] = {
    "tiny": SearchSpace("tiny", num_layers=4, width=16, input_hw=(24, 32), stem_stride=1),
    "mnet-24-32": SearchSpace("mnet-24-32", num_layers=12, width=256, input_hw=(24, 32), stem_stride=1),
    "mnet-120-160": SearchSpace("mnet-120-160", num_layers=12, width=256, input_hw=(120, 160), stem_stride=2),
}


def get_preset(name: str) -> SearchSpace:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}") from None


def build_space(preset: str = "tiny", *, input_hw: Sequence[int] | None = None, layers: int | None = None,
                width: int | None = None, stem_stride: int | None = None, kernels: Sequence[int] | None = None,
                dilations: Sequence[int] | None = None) -> SearchSpace:
    """A preset with any of its skeleton or op set replaced (`mnet search --input-size 28x28 --layers 6 ...`).

    A user's crops are not 24x32 and 28x28 data should not be stretched, so every part of the space
    can be chosen; a space that differs from its preset is named "<preset>+custom" so that no report
    calls it by the preset's name.
    """
    base = get_preset(preset)
    # checked here, not left to Arch, so that the message names the option rather than an arch field
    for name, values, ok, want in (("kernels", kernels, lambda v: v >= 1 and v % 2 == 1, "odd positive integers"),
                                   ("dilations", dilations, lambda v: v >= 1, "positive integers")):
        if values is not None and not values:
            raise ConfigError(f"--{name}: expected at least one value")
        if values is not None and (len(set(values)) != len(values) or not all(ok(v) for v in values)):
            raise ConfigError(f"--{name} {','.join(map(str, values))}: expected distinct {want}, e.g. "
                              f"{'3,5,7' if name == 'kernels' else '1,2'}")
    if stem_stride not in (None, 1, 2):
        raise ConfigError(f"--stem-stride {stem_stride!r}: expected 1 or 2")
    ops = base.ops
    if kernels is not None or dilations is not None:
        ks = tuple(kernels) if kernels is not None else tuple(sorted({k for k, _ in base.ops}))
        ds = tuple(dilations) if dilations is not None else tuple(sorted({d for _, d in base.ops}))
        ops = tuple((k, d) for k in ks for d in ds)
    num_layers = layers if layers is not None else base.num_layers
    kw = dict(num_layers=num_layers, width=width if width is not None else base.width,
              input_hw=tuple(input_hw) if input_hw is not None else base.input_hw,
              stem_stride=stem_stride if stem_stride is not None else base.stem_stride, ops=ops)
    same = all(getattr(base, k) == v for k, v in kw.items())
    for name, v in (("layers", num_layers), ("width", kw["width"])):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"--{name} {v!r}: expected a positive integer")
    return SearchSpace(base.name if same else f"{base.name}+custom", **kw,
                       reductions=base.reductions if same else ())


def parse_hw(text: str, option: str = "--input-size") -> tuple[int, int]:
    """'28x28' or '24,32' → (28, 28)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
        if h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected HEIGHTxWIDTH, e.g. 28x28") from None
    return h, w


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """'3,5,7' → (3, 5, 7)."""
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated integers, e.g. 3,5,7") from None
    if not values:
        raise ConfigError(f"{option} {text!r}: expected at least one integer")
    return values
