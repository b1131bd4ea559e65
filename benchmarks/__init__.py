"""Throughput and memory benchmarks of rlver_jax, side by side with transformers (torch)."""
