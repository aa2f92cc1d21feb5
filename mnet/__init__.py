"""MNet: ENAS-searched ConvNets for fruit grading, exported to ONNX / TensorRT for Jetson.

Import root for the stage packages: mnet.search, mnet.calibration, mnet.export, mnet.runtime.
"""

__version__ = "0.1.0"
