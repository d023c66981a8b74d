"""`reference` backend: plain PyTorch, any device, autograd. It defines the semantics."""
from .steer_norm import steer_norm

__all__ = ["steer_norm"]
