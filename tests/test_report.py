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
