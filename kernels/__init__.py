"""Triton kernels of calgan_fast (installed as ``calgan_fast.kernels``); launchers only, no autograd."""
