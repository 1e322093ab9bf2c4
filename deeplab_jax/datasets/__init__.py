"""Data sets: builders for real benchmarks and the synthetic default."""
