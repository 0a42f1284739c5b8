"""jaxslim: composable model compression for JAX.

Pruning (``jaxslim.prune``), quantization (``jaxslim.quant``), layer splicing
(``jaxslim.splice``), sparsity regularizers as Optax transforms (``jaxslim.regularize``),
learning-rate decays (``jaxslim.schedules``), distillation losses (``jaxslim.distill``), per-leaf
reports (``jaxslim.report``) and the weight structures they share (``Unstructured``,
``Channels``, ``NM``, ``Blocks``). Flax NNX and Linen glue is in ``jaxslim.flax``.
"""

from jaxslim import distill, prune, quant, regularize, report, schedules, splice, structures
from jaxslim.quant import QArray, QuantSpec
from jaxslim.structures import NM, Blocks, Channels, Unstructured

__version__ = "0.1.0"

__all__ = [
    "prune",
    "quant",
    "splice",
    "regularize",
    "schedules",
    "distill",
    "report",
    "structures",
    "QuantSpec",
    "QArray",
    "Unstructured",
    "Channels",
    "NM",
    "Blocks",
]
