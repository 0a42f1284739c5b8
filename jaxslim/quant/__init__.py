"""Quantization: specs, the format registry, QArray, quantize/dequantize, fake-quant (STE and LSQ),
packing, observers, tree-wide mixed-precision rules, GPTQ, AWQ, SmoothQuant, HQQ, ``oneshot`` and a
quantized ``dot_general``.

The names below are the public surface; the implementation modules (``quant/_gptq.py``, ...) are
private, and their tunables (block sizes, the scale floor) are not part of the API.
"""

from jaxslim._oneshot import KernelRow, OneshotReport
from jaxslim.quant import formats, storage
from jaxslim.quant._allocate import allocate, sensitivities
from jaxslim.quant._awq import ScaleGroup, apply_scales, awq_scales, find_absorbers
from jaxslim.quant._dot import qdot_general
from jaxslim.quant._gptq import gptq, gptq_hessian
from jaxslim.quant._hadamard import hadamard, hadamard_matrix, random_hadamard
from jaxslim.quant._hqq import hqq
from jaxslim.quant._interpret import quantized
from jaxslim.quant._lsq import fake_quant_lsq, lsq_init_scale
from jaxslim.quant._methods import AWQ, GPTQ, HQQ, RTN, SmoothQuant
from jaxslim.quant._numerics import fake_quant_affine, qparams, qparams_from_range
from jaxslim.quant._observers import (
    Observer,
    RangeState,
    minmax_observer,
    moving_average_observer,
    mse_observer,
    percentile_observer,
)
from jaxslim.quant._oneshot import oneshot
from jaxslim.quant._packing import pack, packed_shape, unpack
from jaxslim.quant._params import LeafSize, SizeReport, dequantize_params, quantize_params
from jaxslim.quant._qarray import QArray, dequantize, fake_quant, is_qarray, quantize
from jaxslim.quant._qep import qep_correct
from jaxslim.quant._rotate import rotate_model
from jaxslim.quant._rotate_fn import RotateReport, rotate
from jaxslim.quant._rules import Rule
from jaxslim.quant._smoothquant import smooth_scales, w8a8_dot
from jaxslim.quant._spec import QuantSpec, qrange
from jaxslim.quant._tokens import TokenQuant
from jaxslim.quant.formats import Format

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
    "Rule",
    "quantize_params",
    "dequantize_params",
    "SizeReport",
    "LeafSize",
    "qdot_general",
    "quantized",
    "gptq",
    "gptq_hessian",
    "qep_correct",
    "hqq",
    "awq_scales",
    "find_absorbers",
    "apply_scales",
    "ScaleGroup",
    "smooth_scales",
    "w8a8_dot",
    "oneshot",
    "allocate",
    "sensitivities",
    "OneshotReport",
    "KernelRow",
    "RTN",
    "GPTQ",
    "AWQ",
    "HQQ",
    "SmoothQuant",
    "hadamard",
    "hadamard_matrix",
    "random_hadamard",
    "TokenQuant",
    "rotate_model",
    "rotate",
    "RotateReport",
]
