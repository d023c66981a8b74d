"""`cuda` backend: fasteer._cuda, raw CUDA kernels for launch-bound (decode-size) work.

The extension takes pointers, shapes, strides and the caller's stream as integers, so it
does not link torch; these wrappers derive those from tensors. Importing this package
does not import fasteer._cuda nor initialise CUDA: that happens on the first launch.
"""
