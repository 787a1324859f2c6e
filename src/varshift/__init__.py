"""varshift: the variance shift between Dropout and BatchNorm, as a toolkit and a laboratory.

Subpackages, in import order (each imports only those before it):
``theory`` ← ``layers`` ← ``diagnose`` / ``fix`` ← ``lab`` ← ``cli``; ``data`` holds the
built-in datasets and imports nothing of ours.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
