"""Benchmarks of daskptycho (never timed tests): ``python -m benchmarks NAME``."""
