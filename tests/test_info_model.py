"""`fasteer info --model`: which carrier each site gets, per layer, and why (issue 21).

The demo model (a table entry), tiny models saved to tmp_path: an unknown-type Llama clone
(the probe), BERT (hooks), T5 (an encoder-decoder: asks for --layers-path); bad input is
one line and exit code 2.
"""
import json
import warnings

import torch
import transformers as tf

from fasteer.cli import main


class MyLlamaInfoConfig(tf.LlamaConfig):
    model_type = "my_llama_info"


class MyLlamaInfoForCausalLM(tf.LlamaForCausalLM):
    config_class = MyLlamaInfoConfig


try:
    tf.AutoConfig.register("my_llama_info", MyLlamaInfoConfig)
    tf.AutoModelForCausalLM.register(MyLlamaInfoConfig, MyLlamaInfoForCausalLM)
except ValueError:          # registered already (the module imported twice)
    pass


from test_carrier_probe import _fresh  # noqa: E402,F401 (autouse: probe on, caches fresh)


def _run(capsys, *argv):
    capsys.readouterr()           # drop what came before (save_pretrained's progress bar)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["info", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _save(model, tmp_path, name):
    folder = tmp_path / name
    model.save_pretrained(folder)
    return str(folder)


def test_demo_model_carriers_come_from_the_table(capsys):
    rc, out, _ = _run(capsys, "--model", "demo")
    assert rc == 0
    assert "model type 'llama'" in out and "layers at model.layers" in out
    assert "carriers from fasteer's table [llama]" in out
    assert "resid_pre   layers 0-3: norm input_layernorm (LlamaRMSNorm, RMS)" in out
    assert "resid_mid   layers 0-3: norm post_attention_layernorm (LlamaRMSNorm, RMS)" in out
    assert "layer 3: norm norm of model (LlamaRMSNorm, RMS)" in out
    assert "attn_out    layers 0-3: output hook on self_attn (LlamaAttention)" in out
    assert "mlp_out     layers 0-3: output hook on mlp (LlamaMLP)" in out


def test_unknown_type_clone_shows_the_probe_verdict(capsys, tmp_path):
    config = MyLlamaInfoConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    torch.manual_seed(0)
    folder = _save(MyLlamaInfoForCausalLM(config), tmp_path, "my_llama")
    rc, out, _ = _run(capsys, "--model", folder)
    assert rc == 0, out
    assert "model type 'my_llama_info'" in out
    assert "carriers verified by a probe [" in out and "carriers (probed)]" in out
    assert "a probe forward matched the '" in out and "resid_pre: norm input_layernorm" in out
    assert "resid_pre   layers 0-1: norm input_layernorm (LlamaRMSNorm, RMS)" in out
    assert "resid_mid   unavailable:" in out and "attn_out    unavailable:" in out
    rc, out, _ = _run(capsys, "--model", folder, "--json")
    report = json.loads(out)
    assert report["source"] == "probe" and report["model_type"] == "my_llama_info"
    assert report["sites"]["resid_pre"]["carriers"] == [
        {"layers": "layers 0-1", "carrier": "norm input_layernorm (LlamaRMSNorm, RMS)"}]


def test_encoder_shows_the_hook_fallback(capsys, tmp_path):
    config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, vocab_size=97)
    folder = _save(tf.BertModel(config), tmp_path, "bert")
    rc, out, _ = _run(capsys, "--model", folder)
    assert rc == 0, out
    assert "model type 'bert'" in out and "layers at " in out and "encoder.layer" in out
    assert "hook fallback" in out and "no table carrier shape fits" in out
    assert "resid_pre   layers 0-1: input hook on the layer (BertLayer)" in out
    assert "layer 1: output hook on the last layer (BertLayer)" in out


def test_encoder_decoder_needs_layers_path(capsys, tmp_path):
    config = tf.T5Config(d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, vocab_size=97,
                         decoder_start_token_id=0)
    folder = _save(tf.T5ForConditionalGeneration(config), tmp_path, "t5")
    rc, _, err = _run(capsys, "--model", folder)
    assert rc == 2 and "encoder-decoder model with several layer stacks" in err
    assert "layers_path=" in err and len(err.strip().splitlines()) == 1
    rc, out, _ = _run(capsys, "--model", folder, "--layers-path", "encoder.block")
    assert rc == 0 and "layers at encoder.block" in out
    rc, _, err = _run(capsys, "--model", folder, "--layers-path", "encoder.blocks")
    assert rc == 2 and "'encoder.blocks' does not exist" in err and "encoder.block (2 x " in err


def test_bad_input_is_one_line(capsys, tmp_path):
    rc, _, err = _run(capsys, "--model", str(tmp_path / "nothing"))
    assert rc == 2 and "--model: no such path" in err
    rc, _, err = _run(capsys, "--layers-path", "model.layers")
    assert rc == 2 and "--layers-path needs --model" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(capsys, "--model", str(tmp_path / "empty"))
    assert rc == 2 and "cannot load" in err and len(err.strip().splitlines()) == 1
