"""jaxslim compress --print-recipe [NAME] [CKPT]: the example, a ready recipe, a model's paths."""

import json
import re

import jax
import pytest

from jaxslim import cli, models, recipe

HF = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "vocab_size": 50,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def test_example_lists_the_ready_recipes(capsys):
    assert cli.main(["compress", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(recipe.EXAMPLE)
    assert all(n in out.splitlines()[-1] for n in recipe.NAMED)


@pytest.mark.parametrize("name", sorted(recipe.NAMED))
def test_ready_recipe_text_parses_to_the_named_recipe(capsys, name):
    assert cli.main(["compress", "--print-recipe", name]) == 0
    out = capsys.readouterr().out
    assert out == recipe.NAMED[name]
    assert recipe.parse(out) == recipe.named(name)


def test_unknown_name_is_one_line_exit_2(capsys):
    assert cli.main(["compress", "--print-recipe", "w4a17"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "w4a17" in err[0] and "w4a16-gptq" in err[0]


def test_checkpoint_paths_follow_and_the_ready_where_selects_its_kernels(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    cfg = models.Config.from_hf(HF)
    params = models.init(
        jax.random.key(0), cfg, vocab=50, hidden=32, layers=3, heads=4, kv_heads=2,
        intermediate=64,
    )  # fmt: skip
    d = tmp_path / "m"
    d.mkdir()
    save_file(models.to_hf_tensors(params, cfg), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(HF))
    for argv in (["--print-recipe", "w4a16-gptq", str(d)], ["--print-recipe", str(d)]):
        assert cli.main(["compress", *argv]) == 0
        out = capsys.readouterr().out
        assert "(3 layers;" in out and "for i in 0..2" in out
        assert "layers/<i>/{attn_norm,q,k,v,o,mlp_norm,gate,up,down,q_bias,k_bias,v_bias}" in out
        assert "lm_head" not in out.split("Leaf paths")[1]  # tied
    # the ready recipe's where selects exactly the kernels and biases of the layers
    where = re.compile(re.search(r"where = '(.*)'", recipe.NAMED["w4a16-gptq"]).group(1))
    assert not where.search("embed") and where.search("layers/0/down")
