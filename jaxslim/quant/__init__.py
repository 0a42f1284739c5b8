"""Quantization: specs, QArray, quantize/dequantize, fake-quant (STE and LSQ), packing, observers,
tree-wide mixed-precision rules, GPTQ and a quantized ``dot_general``."""

from jaxslim.quant.dot import (
    BLOCK_ROWS,
    BLOCKED_BACKENDS,
    INT_MIN_ROWS,
    blocked_path_applies,
    int_path_applies,
    qdot_general,
)
from jaxslim.quant.gptq import gptq, gptq_hessian
from jaxslim.quant.lsq import fake_quant_lsq, lsq_init_scale
from jaxslim.quant.numerics import EPS, fake_quant_affine, qparams, qparams_from_range
from jaxslim.quant.observers import (
    Observer,
    RangeState,
    minmax_observer,
    moving_average_observer,
    mse_observer,
    percentile_observer,
)
from jaxslim.quant.packing import pack, packed_shape, unpack
from jaxslim.quant.params import LeafSize, SizeReport, dequantize_params, quantize_params
from jaxslim.quant.qarray import QArray, dequantize, fake_quant, is_qarray, quantize
from jaxslim.quant.spec import Layout, QuantSpec, layout, qrange

__all__ = [
    "QuantSpec",
    "qrange",
    "Layout",
    "layout",
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
    "EPS",
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
    "int_path_applies",
    "INT_MIN_ROWS",
    "blocked_path_applies",
    "BLOCKED_BACKENDS",
    "BLOCK_ROWS",
    "gptq",
    "gptq_hessian",
]
