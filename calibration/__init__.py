"""mnet.calibration"""
