"""fasteer: activation steering fused into the kernels a model already runs."""
from ._version import __version__
from ._files import FileFormatError
from .interventions import Ablate, Add, Clamp, Condition, Cosine, DynScale, Projection, Scale
from .patch import Steerer, patch, steer
from .sae import SAE
from .sae.interventions import FeatureEdit, SAEReplace
from .vectors import SteeringVector
from . import extract

__all__ = ["__version__", "Ablate", "Add", "Clamp", "Condition", "Cosine", "DynScale",
           "Projection", "Scale", "SAE", "Steerer", "SteeringVector", "extract", "patch", "steer"]
__all__ += ["FeatureEdit", "FileFormatError", "SAEReplace"]
