"""Merging: the config format, the per-tensor plan, the streaming engine, and the data-driven engine
with its calibration data and features.
"""
