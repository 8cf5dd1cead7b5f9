"""Kernels: the routed mixture-of-adapters op (`routed_adapters`) and its implementations."""

from .checks import RoutingError
from .ops import ENV_VAR, IMPLS, routed_adapters, routed_adapters_triton, select_impl, triton_available, triton_runnable
from .reference import dense_all_experts, routed_adapters_reference
from .torch_fast import routed_adapters_torch

__all__ = ["ENV_VAR", "IMPLS", "RoutingError", "dense_all_experts", "routed_adapters", "routed_adapters_reference",
           "routed_adapters_torch", "routed_adapters_triton", "select_impl", "triton_available", "triton_runnable"]
