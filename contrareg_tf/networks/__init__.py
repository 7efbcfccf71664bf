"""networks package (see module docstrings)."""
