"""Benchmarks: speed and memory targets, reported as ratios. Run as `python -m benchmarks.NAME`."""
