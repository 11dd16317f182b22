"""The ``reference`` backend: the dense oracle of :mod:`calgan_fast.reference`, differentiated by
plain autograd (no custom ops)."""

from __future__ import annotations

from ..reference import routed_head_ref as head
from ..reference import routing_metadata_ref as routing_metadata

__all__ = ["head", "routing_metadata"]
