"""cxrstudy: reproducible chest X-ray transfer learning with class decomposition (DeTraC)."""

import warnings

__version__ = "0.1.0"

# fastai calls torch.jit.script at import time and torch 2.14 deprecates it: noise in every notebook.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
