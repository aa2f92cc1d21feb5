"""The one preprocessing function shared by training, export metadata and the runtime.

numpy + OpenCV only (the runtime imports it on a Jetson without torch). Two halves so that datasets
can cache the expensive geometric half as uint8 and apply the cheap photometric half per batch:

    bgr uint8 HxWx3 --resize()--> rgb uint8 at input_hw --normalize()--> float32 NCHW
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from mnet.errors import ConfigError

__all__ = ["Preprocess", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERP = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """BGR uint8 → rotate if portrait → resize → RGB → /255 → (x-mean)/std → NCHW float32."""

    input_hw: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rotate_portrait: bool = True
    interpolation: str = "area"
    schema_version: int = 1

    def __post_init__(self) -> None:
        if len(self.input_hw) != 2 or any(int(v) != v or v <= 0 for v in self.input_hw):
            raise ConfigError(f"preprocess field 'input_hw' = {self.input_hw!r}: expected two positive integers")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess fields 'mean'/'std' = {self.mean}/{self.std}: expected 3 values, std > 0")
        if self.interpolation not in _INTERP:
            raise ConfigError(f"preprocess field 'interpolation' = {self.interpolation!r}: choose from {list(_INTERP)}")

    def resize(self, bgr: np.ndarray) -> np.ndarray:
        """Geometric half: HxWx3 BGR uint8 → input_hw RGB uint8 (what datasets cache)."""
        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        elif bgr.shape[2] == 4:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_BGRA2BGR)
        h, w = bgr.shape[:2]
        if self.rotate_portrait and h > w:
            bgr = cv2.rotate(bgr, cv2.ROTATE_90_CLOCKWISE)
        out_h, out_w = self.input_hw
        small = cv2.resize(bgr, (out_w, out_h), interpolation=_INTERP[self.interpolation])
        return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)

    def normalize(self, rgb_uint8: np.ndarray) -> np.ndarray:
        """Photometric half: (N)HWC RGB uint8 → (N)CHW float32 normalised."""
        x = rgb_uint8.astype(np.float32) * (1.0 / 255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        """One BGR image → 1x3xHxW float32."""
        return self.normalize(self.resize(bgr))[None]

    def batch(self, images_bgr: list[np.ndarray]) -> np.ndarray:
        if not images_bgr:
            return np.zeros((0, 3, *self.input_hw), np.float32)
        return self.normalize(np.stack([self.resize(im) for im in images_bgr]))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "input_hw": list(self.input_hw),
            "mean": list(self.mean),
            "std": list(self.std),
            "rotate_portrait": self.rotate_portrait,
            "interpolation": self.interpolation,
            "color": "RGB",
            "layout": "NCHW",
            "scale": 1 / 255,
        }

    @classmethod
    def from_json(cls, d: Any) -> "Preprocess":
        if not isinstance(d, dict) or "input_hw" not in d:
            raise ConfigError(f"preprocess must be an object with 'input_hw', got {d!r}")
        try:
            return cls(
                input_hw=tuple(int(v) for v in d["input_hw"]),
                mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
                std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
                rotate_portrait=bool(d.get("rotate_portrait", True)),
                interpolation=str(d.get("interpolation", "area")),
                schema_version=int(d.get("schema_version", 1)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"preprocess: bad value ({e})") from None
