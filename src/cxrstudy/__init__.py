"""cxrstudy: reproducible chest X-ray transfer learning with class decomposition (DeTraC)."""

__version__ = "0.1.0"
