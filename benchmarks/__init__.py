"""Performance benchmarks of sparsemoe: ``python -m benchmarks.run``."""
