"""SteeringVector: validation, arithmetic, safetensors I/O, corrupt files, interop objects."""
from __future__ import annotations

import dataclasses
import json
import struct
import sys
import types

import numpy as np
import pytest
import torch

from fasteer.vectors import (
    SteeringVector,
    from_repeng,
    from_steering_vectors,
    to_repeng,
    to_steering_vector,
    to_steering_vectors,
)

D = 13  # odd on purpose


def rand_dirs(layers, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(d, generator=g) for l in layers}


# ------------------------------------------------------------- construction
def test_construction_stores_float32_copies_and_fills_metadata():
    src = {5: torch.randn(D, dtype=torch.float64), 2: np.arange(D, dtype=np.float32), 9: [0.5] * D}
    v = SteeringVector(src, metadata={"model_name": "tiny", "method": "caa", "note": [1, 2]})
    assert v.layers == [2, 5, 9]
    assert v.hidden_size == D and len(v) == 3 and 5 in v and 4 not in v
    assert all(v[l].dtype == torch.float32 and v[l].shape == (D,) for l in v)
    assert torch.allclose(v[5].double(), src[5], atol=1e-6)
    src[5].zero_()  # a copy was stored
    assert v[5].abs().sum() > 0
    meta = v.metadata
    assert meta["hidden_size"] == D and meta["layers"] == [2, 5, 9]
    assert meta["model_name"] == "tiny" and meta["note"] == [1, 2]
    assert meta["created"][:4].isdigit() and "T" in meta["created"]
    assert v.site == "resid_post"


@pytest.mark.parametrize(
    "directions, err, match",
    [
        ({}, ValueError, "at least one layer"),
        ([torch.zeros(D)], TypeError, "mapping"),
        ({-1: torch.ones(D)}, ValueError, ">= 0"),
        ({"3": torch.ones(D)}, TypeError, "ints"),
        ({True: torch.ones(D)}, TypeError, "ints"),
        ({0: torch.ones(D, 2)}, ValueError, "1-D"),
        ({0: torch.ones(0)}, ValueError, "non-empty"),
        ({0: torch.ones(D), 1: torch.ones(D + 1)}, ValueError, "D=13"),
        ({0: torch.tensor([1.0, float("nan"), 2.0])}, ValueError, "NaN/inf"),
        ({0: torch.tensor([1.0, float("inf")])}, ValueError, "NaN/inf"),
        ({0: "abc"}, TypeError, "directions\\[0\\]"),
        ({0: torch.ones(D, dtype=torch.complex64)}, TypeError, "real"),
    ],
)
def test_bad_directions_raise(directions, err, match):
    with pytest.raises(err, match=match):
        SteeringVector(directions)


def test_bad_site_metadata_dtype():
    with pytest.raises(ValueError, match="site"):
        SteeringVector(rand_dirs([0]), site="resid_middle")
    with pytest.raises(ValueError, match="hidden_size"):
        SteeringVector(rand_dirs([0]), metadata={"hidden_size": D + 1})
    with pytest.raises(TypeError, match="JSON"):
        SteeringVector(rand_dirs([0]), metadata={"x": object()})
    with pytest.raises(TypeError, match="dtype"):
        SteeringVector(rand_dirs([0]), dtype=torch.int32)


def test_getitem_missing_layer_names_available_layers():
    v = SteeringVector(rand_dirs([1, 4]))
    with pytest.raises(KeyError, match=r"\[1, 4\]"):
        v[2]


# --------------------------------------------------------------- arithmetic
def test_scalar_arithmetic():
    v = SteeringVector(rand_dirs([0, 3], seed=1), metadata={"method": "caa"})
    for w in (v * 2.5, 2.5 * v, v / 0.4, v * torch.tensor(2.5)):
        for l in v:
            assert torch.allclose(w[l], v[l] * 2.5, rtol=1e-6)
    assert torch.equal((-v)[3], -v[3])
    assert (v * 3).metadata["method"] == "caa"
    with pytest.raises(ZeroDivisionError):
        v / 0
    with pytest.raises(ValueError, match="finite"):
        v * float("nan")
    with pytest.raises(TypeError, match="real scalar"):
        v * "2"
    with pytest.raises(TypeError):
        v * v


def test_add_sub_union_of_layers_missing_counts_as_zero():
    a = SteeringVector(rand_dirs([0, 2], seed=2))
    b = SteeringVector(rand_dirs([2, 5], seed=3))
    s, d = a + b, a - b
    assert s.layers == d.layers == [0, 2, 5]
    assert torch.equal(s[0], a[0]) and torch.equal(s[5], b[5])
    assert torch.allclose(s[2], a[2] + b[2]) and torch.allclose(d[2], a[2] - b[2])
    assert torch.equal(d[5], -b[5])
    # operands untouched
    assert a.layers == [0, 2] and b.layers == [2, 5]


def test_add_refuses_other_site_or_width_and_warns_on_other_model():
    a = SteeringVector(rand_dirs([1]), metadata={"model_name": "m1"})
    with pytest.raises(ValueError, match="sites differ"):
        a + SteeringVector(rand_dirs([1]), site="resid_pre")
    with pytest.raises(ValueError, match="hidden sizes differ"):
        a - SteeringVector(rand_dirs([1], d=D + 2))
    with pytest.warns(UserWarning, match="different models"):
        a + SteeringVector(rand_dirs([1]), metadata={"model_name": "m2"})
    with pytest.raises(TypeError):
        a + 1.0


def test_normalized_select_norms_and_to():
    v = SteeringVector(rand_dirs([0, 1, 7], seed=4))
    n = v.normalized()
    assert all(abs(x - 1.0) < 1e-6 for x in n.norms().values())
    assert torch.allclose(n[7] * v[7].norm(), v[7], atol=1e-6)
    assert v.select([7, 0]).layers == [0, 7]
    with pytest.raises(KeyError):
        v.select([2])
    with pytest.raises(ValueError, match="zero vector"):
        SteeringVector({3: torch.zeros(D)}).normalized()
    h = v.to(dtype=torch.float16)
    assert h.dtype == torch.float16 and h.layers == v.layers and v.dtype == torch.float32
    assert v.to("cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="overflow"):
        (v * 1e6).to(dtype=torch.float16)
    with pytest.raises(ValueError, match="NaN/inf"):
        v * 1e38 * 1e38


def test_check_compatible_with_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    SteeringVector(rand_dirs([0, 2], d=16)).check_compatible(model)
    with pytest.raises(ValueError, match="hidden size D=13"):
        SteeringVector(rand_dirs([0])).check_compatible(model)
    with pytest.raises(ValueError, match=r"layers \[3\] out of range"):
        SteeringVector(rand_dirs([1, 3], d=16)).check_compatible(model)


# ------------------------------------------------------------ safetensors I/O
def test_safetensors_round_trip_is_exact(tmp_path):
    v = SteeringVector(rand_dirs([0, 3, 11], seed=5), site="resid_pre",
                       metadata={"model_name": "org/tiny", "model_type": "llama", "method": "caa",
                                 "extra": {"alpha": 4.0, "tags": ["a", "b"]}})
    path = v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(path)
    assert w.site == "resid_pre" and w.layers == v.layers
    assert all(torch.equal(w[l], v[l]) for l in v)
    assert w.metadata == v.metadata
    # the header is plain strings (JSON-encoded metadata) and the tensors are named layer.N
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["layer.0", "layer.11", "layer.3"]
        header = f.metadata()
    assert header["site"] == "resid_pre" and json.loads(header["meta.extra"]) == {"alpha": 4.0, "tags": ["a", "b"]}
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind


def test_load_detects_format_by_magic_not_extension(tmp_path):
    v = SteeringVector(rand_dirs([1, 2], seed=6))
    v.save(tmp_path / "v.gguf")
    (tmp_path / "v.gguf").rename(tmp_path / "renamed.bin")
    w = SteeringVector.load(tmp_path / "renamed.bin")
    assert all(torch.equal(w[l], v[l]) for l in v)


def test_plain_safetensors_without_fasteer_header(tmp_path):
    from safetensors.torch import save_file

    dirs = rand_dirs([4, 6], seed=7)
    save_file({"4": dirs[4], "layer.6": dirs[6]}, str(tmp_path / "plain.safetensors"))
    w = SteeringVector.load(tmp_path / "plain.safetensors")
    assert w.layers == [4, 6] and w.site == "resid_post" and torch.equal(w[4], dirs[4])


def test_save_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors or \.gguf"):
        SteeringVector(rand_dirs([0])).save(tmp_path / "v.pt")


def _write_raw_safetensors(path, header: dict, payload: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)


@pytest.mark.parametrize("case", ["truncated", "garbage", "short", "bad_name", "nan", "bad_json_meta",
                                  "wrong_format", "ragged"])
def test_corrupt_safetensors_raise_clear_errors(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    good = SteeringVector(rand_dirs([0, 1], seed=8))
    good.save(path)
    raw = path.read_bytes()
    f32 = np.arange(4, dtype=np.float32)
    if case == "truncated":
        path.write_bytes(raw[: len(raw) - 9])
    elif case == "garbage":
        path.write_bytes(b"\x07" * 64)
    elif case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "bad_name":
        _write_raw_safetensors(path, {"weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32.tobytes())
    elif case == "nan":
        x = f32.copy(); x[2] = np.nan
        _write_raw_safetensors(path, {"layer.0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, x.tobytes())
    elif case == "bad_json_meta":
        _write_raw_safetensors(path, {"__metadata__": {"meta.method": "{not json"},
                                      "layer.0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32.tobytes())
    elif case == "wrong_format":
        _write_raw_safetensors(path, {"__metadata__": {"format": "pt"},
                                      "layer.0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32.tobytes())
    elif case == "ragged":
        _write_raw_safetensors(path, {"layer.0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                      "layer.1": {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]}},
                               f32.tobytes() + f32[:3].tobytes())
    with pytest.raises(ValueError, match="bad.safetensors"):
        SteeringVector.load(path)


def test_load_missing_file():
    with pytest.raises(FileNotFoundError):
        SteeringVector.load("/nonexistent/dir/v.safetensors")


# ------------------------------------------------------------------ interop
# Stand-ins with the same public attributes as the real classes (repeng/extract.py
# ControlVector; steering_vectors/steering_vector.py SteeringVector).
@dataclasses.dataclass
class FakeRepengControlVector:
    model_type: str
    directions: dict


@dataclasses.dataclass
class FakeSVSteeringVector:
    layer_activations: dict
    layer_type: str = "decoder_block"


def test_from_repeng_object():
    rng = np.random.default_rng(9)
    dirs = {3: rng.standard_normal(D).astype(np.float32), 1: rng.standard_normal(D).astype(np.float32)}
    v = from_repeng(FakeRepengControlVector("mistral", dirs))
    assert v.layers == [1, 3] and v.site == "resid_post"
    assert np.array_equal(v[3].numpy(), dirs[3])
    assert v.metadata["model_type"] == "mistral"
    assert to_steering_vector(FakeRepengControlVector("mistral", dirs)).layers == [1, 3]
    with pytest.raises(ValueError, match="num_layers"):
        from_repeng(FakeRepengControlVector("llama", {-1: dirs[1]}))
    assert from_repeng(FakeRepengControlVector("llama", {-1: dirs[1]}), num_layers=8).layers == [7]


def test_from_steering_vectors_object():
    acts = rand_dirs([0, 5], seed=10)
    v = from_steering_vectors(FakeSVSteeringVector(acts))
    assert v.layers == [0, 5] and torch.equal(v[5], acts[5]) and v.site == "resid_post"
    assert to_steering_vector(FakeSVSteeringVector(acts)).layers == [0, 5]
    with pytest.raises(ValueError, match="decoder_block"):
        from_steering_vectors(FakeSVSteeringVector(acts, layer_type="mlp"))
    with pytest.raises(ValueError, match="out of range"):
        from_steering_vectors(FakeSVSteeringVector(acts), num_layers=4)
    with pytest.raises(TypeError, match="layer_activations"):
        from_steering_vectors(object())
    with pytest.raises(TypeError, match="repeng ControlVector"):
        to_steering_vector(3.0)


def test_export_to_repeng_and_steering_vectors_via_installed_packages(monkeypatch):
    # Pretend the packages are installed, with classes shaped like the real ones.
    monkeypatch.setitem(sys.modules, "repeng", types.SimpleNamespace(ControlVector=FakeRepengControlVector))
    monkeypatch.setitem(sys.modules, "steering_vectors", types.SimpleNamespace(SteeringVector=FakeSVSteeringVector))
    v = SteeringVector(rand_dirs([2, 4], seed=11), metadata={"model_type": "gemma2"})
    cv = to_repeng(v)
    assert cv.model_type == "gemma2" and sorted(cv.directions) == [2, 4]
    assert cv.directions[4].dtype == np.float32 and np.array_equal(cv.directions[4], v[4].numpy())
    sv = to_steering_vectors(v)
    assert sv.layer_type == "decoder_block" and torch.equal(sv.layer_activations[2], v[2])
    # resid_pre[l] is resid_post[l-1]
    pre = SteeringVector(rand_dirs([1, 3], seed=12), site="resid_pre")
    assert sorted(to_repeng(pre).directions) == [0, 2]
    with pytest.raises(ValueError, match="resid_pre\\[0\\]"):
        to_repeng(SteeringVector(rand_dirs([0]), site="resid_pre"))
    # and the round trip back in
    assert from_repeng(cv).allclose(v)


def test_export_without_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "repeng", None)  # import fails
    with pytest.raises(ImportError, match="pip install repeng"):
        to_repeng(SteeringVector(rand_dirs([1])))
