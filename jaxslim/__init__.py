"""jaxslim: composable model compression for JAX.

Pruning (``jaxslim.prune``), quantization (``jaxslim.quant``), layer splicing
(``jaxslim.splice``), sparsity regularizers as Optax transforms (``jaxslim.regularize``),
learning-rate decays (``jaxslim.schedules``), distillation losses (``jaxslim.distill``),
calibration statistics of any function (``jaxslim.calibrate``), per-leaf reports
(``jaxslim.report``) and the weight structures they share (``Unstructured``, ``Channels``, ``NM``,
``Blocks``). Pretrained checkpoints (Hugging Face safetensors directories, GGUF files) are read and
written by ``jaxslim.checkpoints``; ``jaxslim.models`` is a Llama-family decoder (Llama, Qwen2/3,
Mistral, SmolLM2) with perplexity and generation. Flax NNX and Linen glue is in ``jaxslim.flax``.
"""

from jaxslim import (
    calibrate,
    checkpoints,
    distill,
    models,
    prune,
    quant,
    regularize,
    report,
    schedules,
    splice,
    structures,
)
from jaxslim.quant import QArray, QuantSpec
from jaxslim.structures import NM, Blocks, Channels, Unstructured

__version__ = "0.1.0"

__all__ = [
    "calibrate",
    "checkpoints",
    "models",
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
