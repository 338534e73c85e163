"""Hydra configs of fusion-bench-statsmerging (shipped as fusion_bench_statsmerging.config)."""
