"""Custom ops of calgan_fast: the routed head, its routing metadata and backend dispatch."""

from .backends import BACKENDS, available_backends, resolve_backend
from .routed_head import RoutedHeadOutput, backend_ops, check_routed_head_inputs, routed_head
from .routing import routing_metadata

__all__ = [
    "BACKENDS",
    "RoutedHeadOutput",
    "available_backends",
    "backend_ops",
    "check_routed_head_inputs",
    "resolve_backend",
    "routed_head",
    "routing_metadata",
]
