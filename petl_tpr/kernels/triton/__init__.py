"""Fused Triton kernels of the routed mixture-of-adapters op (`routed_adapters(..., impl="triton")`).

Importing this package imports triton. On CPU tensors the kernels run only under the Triton
interpreter (`TRITON_INTERPRET=1`, set before triton is first imported); that is how the tests run
them. See `launch.py` for the plan, what is saved and how the k picks are combined.
"""

from .launch import interpreting, moa_routed_bwd, moa_routed_fwd, routed_adapters_triton

__all__ = ["interpreting", "moa_routed_bwd", "moa_routed_fwd", "routed_adapters_triton"]
