"""Flax glue (NNX and Linen): quantized layers, in-place module surgery, distillation helpers.

The only part of jaxslim that imports flax; the core works on any pytree.
"""

from jaxslim.flax import distill, quant, splice

__all__ = ["quant", "splice", "distill"]
