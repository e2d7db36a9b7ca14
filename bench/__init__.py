"""wqd benchmarks: each measures wqd and its baseline in the same run (``python -m bench``)."""
