"""`reference` backend: plain PyTorch, any device, autograd. It defines the semantics."""
from .add_steer_norm import add_steer_norm
from .steer_norm import steer_norm

__all__ = ["add_steer_norm", "steer_norm"]
