"""`cpu` backend: fasteer._C, fused C++ kernels multithreaded over rows."""
