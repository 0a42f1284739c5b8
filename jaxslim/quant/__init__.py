"""Quantization: specs, the format registry, QArray, quantize/dequantize, fake-quant (STE and LSQ),
packing, observers, tree-wide mixed-precision rules, GPTQ, AWQ, SmoothQuant, HQQ, ``oneshot`` and a
quantized ``dot_general``.

The names below are the public surface. Tunables and helpers stay in their modules
(``quant.spec.layout``, ``quant.numerics.EPS``, ``quant.dot.INT_MIN_ROWS``, ...): importable, but
not part of the API.
"""

from jaxslim.quant import formats, storage
from jaxslim.quant.awq import ScaleGroup, apply_scales, awq_scales, find_absorbers
from jaxslim.quant.dot import qdot_general
from jaxslim.quant.formats import Format
from jaxslim.quant.gptq import gptq, gptq_hessian
from jaxslim.quant.hqq import hqq
from jaxslim.quant.interpret import quantized
from jaxslim.quant.lsq import fake_quant_lsq, lsq_init_scale
from jaxslim.quant.numerics import fake_quant_affine, qparams, qparams_from_range
from jaxslim.quant.observers import (
    Observer,
    RangeState,
    minmax_observer,
    moving_average_observer,
    mse_observer,
    percentile_observer,
)
from jaxslim.quant.oneshot import KernelReport, OneshotReport, oneshot
from jaxslim.quant.packing import pack, packed_shape, unpack
from jaxslim.quant.params import LeafSize, SizeReport, dequantize_params, quantize_params
from jaxslim.quant.qarray import QArray, dequantize, fake_quant, is_qarray, quantize
from jaxslim.quant.smoothquant import smooth_scales, w8a8_dot
from jaxslim.quant.spec import QuantSpec, qrange

__all__ = [
    "QuantSpec",
    "qrange",
    "formats",
    "storage",
    "Format",
    "QArray",
    "is_qarray",
    "quantize",
    "dequantize",
    "fake_quant",
    "fake_quant_affine",
    "fake_quant_lsq",
    "lsq_init_scale",
    "qparams",
    "qparams_from_range",
    "pack",
    "unpack",
    "packed_shape",
    "Observer",
    "RangeState",
    "minmax_observer",
    "moving_average_observer",
    "percentile_observer",
    "mse_observer",
    "quantize_params",
    "dequantize_params",
    "SizeReport",
    "LeafSize",
    "qdot_general",
    "quantized",
    "gptq",
    "gptq_hessian",
    "hqq",
    "awq_scales",
    "find_absorbers",
    "apply_scales",
    "ScaleGroup",
    "smooth_scales",
    "w8a8_dot",
    "oneshot",
    "OneshotReport",
    "KernelReport",
]
