"""Sparse-inference latency benchmark; the same as `fastprune bench sparse` (see
fastprune/benchmarks/sparse.py for what it measures)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastprune.benchmarks.sparse import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
