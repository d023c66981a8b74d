"""Steering vectors: the `SteeringVector` container and the file formats people already use."""
from .steering_vector import SITES, SteeringVector
from .gguf_io import read_gguf, write_gguf
from .interop import from_repeng, from_steering_vectors, to_repeng, to_steering_vectors, to_steering_vector

__all__ = [
    "SITES",
    "SteeringVector",
    "read_gguf",
    "write_gguf",
    "from_repeng",
    "from_steering_vectors",
    "to_repeng",
    "to_steering_vectors",
    "to_steering_vector",
]
