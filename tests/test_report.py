"""report: sparsity, per-leaf summary and table formatting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import report


@pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_sparsity_counts_selected_leaves(variant):
    tree = {"w": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "b": jnp.zeros(3), "n": 4}
    assert float(variant(report.sparsity)(tree)) == 0.75
    assert float(variant(lambda t: report.sparsity(t, where="b"))(tree)) == 1.0


def test_summary_rows_and_bytes():
    tree = {
        "w": jnp.array([[0.0, 1.0], [2.0, 0.0]], jnp.bfloat16),
        "i": jnp.arange(3),
        "k": jax.random.key(0),
        "none": None,
    }
    rows = {r["path"]: r for r in report.summary(tree)}
    assert rows["w"]["nonzeros"] == 2 and rows["w"]["bits"] == 16 and rows["w"]["bytes"] == 8
    assert rows["w"]["sparsity"] == 0.5 and rows["w"]["shape"] == (2, 2)
    assert rows["i"]["nonzeros"] == 2 and rows["k"]["bits"] == "key"
    assert "none" not in rows


def test_format_table_has_header_and_rows():
    text = report.format_table([{"a": 1234, "b": "x"}, {"a": 0.25, "b": "y"}])
    lines = text.splitlines()
    assert lines[0] == "| a | b |" and lines[2] == "| 1,234 | x |" and lines[3] == "| 0.2500 | y |"
    assert report.format_table([]) == ""


def test_sparsity_where_nothing_raises():
    with pytest.raises(ValueError, match="selects no"):
        report.sparsity({"b": jnp.ones(3)})


def test_summary_of_nnx_state_sees_zeros():
    from flax import nnx

    lin = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    lin.kernel[...] = jnp.zeros((4, 2)).at[0, 0].set(1.0)
    rows = {r["path"]: r for r in report.summary(nnx.state(lin, nnx.Param))}
    assert rows["kernel"]["nonzeros"] == 1
    np.testing.assert_equal(rows["bias"]["size"], 2)


def test_summary_rows_of_quantized_odd_and_empty_leaves():
    from jaxslim.quant import QuantSpec, quantize

    x = jnp.arange(1.0, 33.0).reshape(8, 4)
    tree = {
        "q4": quantize(x, QuantSpec(4, axis=-1)),
        "q2": quantize(x, QuantSpec(2, symmetric=False)),
        "f8": quantize(x.astype(jnp.bfloat16), QuantSpec(fmt="e4m3")),
        "empty": jnp.zeros((0, 3)),
        "flags": jnp.array([True, False, True]),
        "count": 7,
        "rate": 0.0,
        "key": jax.random.key(1),
        "raw_key": jax.random.PRNGKey(1),
        "none": None,
        "name": "dense",
    }
    rows = {r["path"]: r for r in report.summary(tree)}
    assert set(rows) == set(tree) - {"none", "name"}
    q4 = rows["q4"]
    assert (q4["bits"], q4["dtype"], q4["size"], q4["bytes"]) == (4, "int4 (float32)", 32, 16 + 16)
    # x[0, 0] = 1 and x[0, 1] = 2 round to code 0 (scales 29 / 7.5 and 30 / 7.5, 0.5 to even).
    assert q4["nonzeros"] == np.count_nonzero(np.asarray(tree["q4"].codes())) == 30
    assert q4["shape"] == (8, 4)
    # int2 affine, per tensor: 32 codes in 8 bytes + one float32 scale + one int8 zero point.
    assert (rows["q2"]["bits"], rows["q2"]["bytes"]) == (2, 8 + 4 + 1)
    assert rows["q2"]["dtype"] == "int2 (float32)"
    assert (rows["f8"]["bits"], rows["f8"]["dtype"]) == (8, "e4m3 (bfloat16)")
    assert rows["f8"]["bytes"] == 32 + 4
    assert (rows["empty"]["size"], rows["empty"]["nonzeros"], rows["empty"]["sparsity"]) == (
        0,
        0,
        0,
    )
    assert (rows["flags"]["nonzeros"], rows["flags"]["bits"]) == (2, 8)
    assert (rows["count"]["shape"], rows["count"]["nonzeros"], rows["count"]["bytes"]) == ((), 1, 8)
    assert (rows["rate"]["nonzeros"], rows["rate"]["sparsity"]) == (0, 1.0)
    assert rows["key"]["bits"] == "key" and rows["raw_key"]["dtype"] == "uint32"
    text = report.format_table(report.summary(tree))
    assert "| q4 | (8, 4) | int4 (float32) | 4 | 32 | 30 | 0.0625 | 32 |" in text
