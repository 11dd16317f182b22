"""Triton kernels of calgan_fast (installed as ``calgan_fast.kernels``); launchers only, no autograd.

Importing this package imports Triton and defines the kernels; whether they are compiled or run
by the interpreter is fixed at that moment by ``TRITON_INTERPRET`` (see :data:`INTERPRET`).
"""

from ._config import INTERPRET
from .routed_head import routed_head_bwd, routed_head_fwd
from .routing import routing_metadata, segment_map, segment_maps, segment_sum

__all__ = ["INTERPRET", "routed_head_bwd", "routed_head_fwd", "routing_metadata", "segment_map",
           "segment_maps", "segment_sum"]
