"""Command-line tools: ``wqctl``."""
