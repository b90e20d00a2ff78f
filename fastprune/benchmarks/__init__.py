"""Benchmarks shipped with the package (so that `fastprune bench` works when installed); the
scripts in bench/ call them."""
