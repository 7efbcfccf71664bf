"""losses package (see module docstrings)."""
