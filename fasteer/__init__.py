"""fasteer: activation steering fused into the kernels a model already runs."""
from ._version import __version__

__all__ = ["__version__"]
