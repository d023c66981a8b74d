"""Layer stacks of any model (issue 21): the scan of the module tree, ``layers_path=``,
encoder-decoder models, and steering encoders (BERT, post-LN; T5's encoder) equal to the
forward-hook reference.

Tiny random configs (hidden 32, 2-3 layers). Encoders have no table entry and no table
carrier shape fits them, so they are steered through hooks on their layers: resid_pre is
the layer input (pre-hook), resid_post of the last layer its output (a tensor for BERT in
transformers 5, a tuple for T5 and older BERTs -- both handled).
"""
import warnings

import pytest
import torch
import torch.nn as nn
import transformers as tf

import fasteer as fs
import fasteer.sites as sites_mod
from fasteer.layer_discovery import find_layers, layer_stacks
from fasteer.sites import decoder_layers, model_sites
from hook_reference import (HookReference, cached_model, one_thread, pair,  # noqa: F401
                            prompt_batch, random_vectors)

D = 32


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(sites_mod, "_warned_types", set())
    from fasteer import carrier_probe
    carrier_probe.clear_cache()
    yield
    carrier_probe.clear_cache()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _bert(cls=tf.BertModel, seed=0):
    torch.manual_seed(seed)
    config = tf.BertConfig(hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=48, vocab_size=97, max_position_embeddings=64,
                           pad_token_id=0)
    return cls(config).eval()


def _t5(cls=tf.T5EncoderModel, seed=0):
    torch.manual_seed(seed)
    config = tf.T5Config(d_model=D, d_ff=48, num_layers=2, num_heads=4, d_kv=8, vocab_size=97,
                         pad_token_id=0, decoder_start_token_id=0)
    return cls(config).eval()


# --------------------------------------------------------------------------- hand-made models

class _Block(nn.Module):
    def __init__(self, d, tuple_out):
        super().__init__()
        self.ln, self.lin, self.tuple_out = nn.LayerNorm(d), nn.Linear(d, d), tuple_out

    def forward(self, hidden_states, attention_mask=None):
        h = hidden_states + torch.tanh(self.lin(self.ln(hidden_states)))
        return (h, None) if self.tuple_out else h


class _Stack(nn.Module):
    def __init__(self, d, n, tuple_out=False):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d, tuple_out) for _ in range(n))

    def forward(self, h):
        for b in self.blocks:
            out = b(h)
            h = out[0] if isinstance(out, tuple) else out
        return h


class _Toy(nn.Module):
    """A plain nn.Module: embeddings, a block list at a path fasteer does not know, a head."""

    def __init__(self, d=D, n=3, vocab=97, tuple_out=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.trunk = _Stack(d, n, tuple_out)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.trunk(self.embed(input_ids)))


class _VisionLanguage(nn.Module):
    """A vision tower (more, wider blocks, first in the module tree) and a language model."""

    def __init__(self):
        super().__init__()
        self.vision_tower = _Stack(D, 5)
        self.language_model = _Toy(n=3)

    def forward(self, input_ids, attention_mask=None):
        return self.language_model(input_ids)


# --------------------------------------------------------------------------- discovery

def test_known_paths_unchanged():
    model = cached_model("llama")
    assert find_layers(model)[0] == "model.layers"
    assert find_layers(model.model)[0] == "layers"
    assert model_sites(model, layers_path="model.layers").layers is model.model.layers


def test_scan_finds_a_stack_at_an_unknown_path():
    model = _Toy()
    assert [s.path for s in layer_stacks(model)] == ["trunk.blocks"]
    path, layers = find_layers(model)
    assert path == "trunk.blocks" and layers is model.trunk.blocks
    sites = _quiet(model_sites, model)
    assert sites.is_fallback and sites.n_layers == 3 and sites.hidden == D
    assert sites.base is model            # the module whose forward takes input_ids


def test_lists_of_leaves_and_nested_lists_are_not_stacks():
    model = cached_model("mixtral")      # experts inside each layer: not a stack of its own
    assert [s.path for s in layer_stacks(model)] == ["model.layers"]
    leaves = nn.Module()
    leaves.heads = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    assert layer_stacks(leaves) == []
    with pytest.raises(ValueError, match="model: cannot find the decoder layers"):
        find_layers(leaves)


def test_vision_tower_never_wins_over_the_language_model():
    model = _VisionLanguage()
    assert {s.path for s in layer_stacks(model)} == {"vision_tower.blocks",
                                                      "language_model.trunk.blocks"}
    assert find_layers(model)[0] == "language_model.trunk.blocks"
    sites = _quiet(model_sites, model)
    assert sites.layers is model.language_model.trunk.blocks
    assert sites.base is model.language_model


def test_llava_wrapper_picks_the_language_model():
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                                 num_attention_heads=4, image_size=16, patch_size=8)
    text = tf.LlamaConfig(hidden_size=D, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision,
                                                            text_config=text)).eval()
    paths = [s.path for s in layer_stacks(model)]
    assert any("vision" in p for p in paths) and "model.language_model.layers" in paths
    sites = _quiet(model_sites, model)
    assert sites.layers is model.model.language_model.layers and sites.hidden == D


def test_two_unmarked_stacks_ask_for_a_choice():
    model = nn.Module()
    model.first, model.second = _Stack(D, 2), _Stack(D, 3)
    with pytest.raises(ValueError, match=r"cannot tell which layer stack.*first\.blocks "
                                         r"\(2 x _Block\); second\.blocks \(3 x _Block\).*"
                                         r"layers_path="):
        find_layers(model)
    assert find_layers(model, "second.blocks")[1] is model.second.blocks


@pytest.mark.parametrize("make", [
    lambda: _t5(tf.T5ForConditionalGeneration),
    lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=97)),
], ids=["t5", "bart"])
def test_encoder_decoder_asks_for_a_choice(make):
    model = make()
    with pytest.raises(ValueError, match=r"encoder-decoder model with several layer stacks "
                                         r"\(.*encoder.*decoder.*\); choose one with "
                                         r"layers_path="):
        fs.patch(model)
    enc = "encoder.block" if hasattr(model, "encoder") and hasattr(model.encoder, "block") \
        else "model.encoder.layers"
    st = _quiet(fs.patch, model, layers_path=enc)
    try:
        assert st.sites.layers_path == enc and st.sites.is_fallback
    finally:
        st.unpatch()


def test_bad_layers_path_names_what_exists():
    model = _bert()
    for bad, what in (("encoder.layers", "does not exist"), ("encoder", "is a BertEncoder"),
                      ("embeddings.word_embeddings", "is an Embedding")):
        for call in (lambda: fs.patch(model, layers_path=bad),
                     lambda: fs.steer(model, fs.Add(torch.ones(D), 1.0, layers=[0]),
                                      layers_path=bad),
                     lambda: model_sites(model, layers_path=bad)):
            with pytest.raises(ValueError, match=rf"layers_path: '{bad}' {what}.*layer stacks "
                                                 r"found: encoder\.layer \(3 x BertLayer\)"):
                call()
    with pytest.raises(ValueError, match="layers_path: expected an attribute path"):
        fs.patch(model, layers_path="")
    assert decoder_layers(model, "encoder.layer") is model.encoder.layer
    _quiet(fs.patch, model, layers_path="encoder.layer").unpatch()


# --------------------------------------------------------------------------- encoders steer

def _encoder_case(model, layers, forward, ivs, edits, mask):
    with _steer_quiet(model, ivs):
        with torch.no_grad():
            got = forward()
    ref = HookReference(model, layers, None, [edits] * mask.shape[0])
    with ref, torch.no_grad():
        ref.begin(mask)
        want = forward()
    with torch.no_grad():
        plain = forward()
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"differs from the hook reference by {diff:.3g}"
    assert float((want - plain).abs().max()) > 1e-2, "steering had no visible effect"


def _steer_quiet(model, ivs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fs.steer(model, *ivs)


def _ivs(n_layers):
    v = random_vectors(range(n_layers), D, seed=7, scale=2.0)
    pairs = [pair("add", [0, n_layers - 1], vectors=v, value=1.5),            # last: output hook
             pair("clamp", [1], site="resid_pre", vectors=v, value=1.0),
             pair("add", [0], site="resid_pre", vectors=v, value=-1.0, positions="prompt"),
             pair("scale", [n_layers - 1], site="resid_pre", value=0.8)]
    return [a for a, _ in pairs], [b for _, b in pairs]


@pytest.mark.parametrize("cls", [tf.BertModel, tf.BertForMaskedLM])
def test_bert_post_ln_equals_hook_reference(cls):
    model = _bert(cls)
    sites = _quiet(model_sites, model)
    assert sites.is_fallback and sites.source == "hooks"
    assert "no table carrier shape fits" in sites.verdict
    assert {p.kind for p in sites.points.values()} == {"input", "output"}
    layers = decoder_layers(model)
    ids, mask = prompt_batch(3, 7, "right", seed=3)
    ivs, edits = _ivs(len(layers))

    def forward():
        out = model(input_ids=ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state
    _encoder_case(model, layers, forward, ivs, edits, mask)


def test_t5_encoder_equals_hook_reference():
    model = _t5()                    # T5Block returns a tuple: the last layer's output carrier
    layers = decoder_layers(model)
    assert layers is model.encoder.block
    ids, mask = prompt_batch(3, 7, "right", seed=4)
    ivs, edits = _ivs(len(layers))
    _encoder_case(model, layers,
                  lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state,
                  ivs, edits, mask)


@pytest.mark.parametrize("tuple_out", [False, True], ids=["tensor", "tuple"])
def test_last_layer_output_carrier_takes_a_tensor_or_a_tuple(tuple_out):
    torch.manual_seed(1)
    model = _Toy(tuple_out=tuple_out).eval()
    layers = model.trunk.blocks
    sites = _quiet(model_sites, model)
    assert sites.points[("pre", 3)].kind == "output" and sites.points[("pre", 3)].module \
        is layers[2]
    ids, mask = prompt_batch(2, 6, "none", seed=5)
    ivs, edits = _ivs(3)
    _encoder_case(model, layers, lambda: model(ids), ivs, edits, mask)
