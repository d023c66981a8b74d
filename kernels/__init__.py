"""`fasteer.kernels`: the Triton kernels (installed from the top-level ``kernels/`` dir).

Kernels only: each takes raw tensors, strides and compile-time flags and knows nothing
of models, carriers or dispatch (that is `fasteer.ops`). Importing this package does
not touch CUDA. On CPU tensors the kernels run under Triton's interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before a kernel module is imported.
"""
