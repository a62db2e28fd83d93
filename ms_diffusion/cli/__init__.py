"""Command-line entry points (``train.py``, ``sample.py`` at the repository root are thin wrappers)."""
