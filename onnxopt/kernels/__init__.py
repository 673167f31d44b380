"""Compute kernels, apart from graph code: numba bit-packed convolution and numpy references."""
