"""The vLLM host's pieces that need no vLLM (the engine tests live in tests/serving_vllm/,
run in their own environment): routing from a V1- and a V2-style batch view, the request
spec and its errors, and the norm carrier's fused add + steer + norm against the math."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import fasteer as fs
from fasteer.hosts.vllm import routing
from fasteer.hosts.vllm.spec import Registry, SpecError, canonical, parse, raw_spec, salt
from fasteer.plan import CLASS_GENERATED as G, CLASS_LAST_PROMPT as LP, CLASS_PROMPT as P


# --------------------------------------------------------------------------- routing
def test_token_classes_under_chunked_prefill_and_decode():
    # request 0: prompt of 5, second chunk (3 computed) -> tokens at 3, 4
    # request 1: decoding (prompt 2, 4 computed) -> one token at 4
    # request 2: new prompt of 3 -> tokens 0, 1, 2
    qsl = np.array([0, 2, 3, 6])
    req, cls = routing.token_classes(qsl, np.array([3, 4, 0]), np.array([5, 2, 3]))
    assert req.tolist() == [0, 0, 1, 2, 2, 2]
    assert cls.tolist() == [P, LP, G, P, P, LP]


def test_token_slots_reads_the_lut_per_request():
    lut = np.array([[0, 1, 2], [3, 3, -1], [-1, -1, -1]], dtype=np.int32)
    qsl = np.array([0, 3, 4, 5])
    slots = routing.token_slots(lut, np.array([1, 0, 2]), qsl, np.array([0, 7, 9]),
                                np.array([3, 5, 4]))
    assert slots.dtype == np.int32
    assert slots.tolist() == [3, 3, 3, 2, -1]


def test_v2_batch_view_gathers_by_idx_mapping():
    """The V2 runner keeps per-request-state arrays and a batch-row -> state mapping."""
    computed_by_state = np.array([10, 0, 4])
    plen_by_state = np.array([6, 3, 4])
    row_by_state = np.array([2, 0, 1])
    idx_mapping = np.array([2, 0])          # batch row 0 is state 2, row 1 is state 0
    nc, pl, rows = routing.gather_v2(idx_mapping, computed_by_state, plen_by_state,
                                     row_by_state)
    assert nc.tolist() == [4, 10] and pl.tolist() == [4, 6] and rows.tolist() == [1, 2]
    lut = np.array([[0, 0, 0], [5, 6, 7], [8, 8, 9], [-1, -1, -1]], dtype=np.int32)
    slots = routing.token_slots(lut, rows, np.array([0, 1, 2]), nc, pl)
    assert slots.tolist() == [7, 9]       # both decoding: the generated class


def test_routing_rejects_a_decreasing_query_start_loc():
    with pytest.raises(ValueError, match="non-decreasing"):
        routing.token_classes(np.array([0, 3, 2]), np.array([0, 0]), np.array([1, 1]))


# --------------------------------------------------------------------------- spec
@pytest.fixture
def registry(tmp_path):
    g = torch.Generator().manual_seed(3)
    fs.SteeringVector({1: torch.randn(16, generator=g), 2: torch.randn(16, generator=g)}
                      ).save(tmp_path / "v.safetensors")
    fs.SteeringVector({1: torch.randn(8, generator=g)}).save(tmp_path / "narrow.safetensors")
    (tmp_path / "r.json").write_text(json.dumps(
        {"vectors": {"v": "v.safetensors", "narrow": "narrow.safetensors"}}))
    return Registry.from_file(tmp_path / "r.json")


def test_spec_parses_to_fasteer_interventions(registry):
    raw = raw_spec({"fasteer": json.dumps([
        {"add": "v", "alpha": 2.5, "positions": "generated"},
        {"clamp": "v", "value": 1.0, "layers": [2]},
        {"ablate": "v", "layers": [1]},
        {"scale": 0.5, "layers": [0]}])})
    ivs = parse(raw, registry, n_layers=4, hidden=16)
    assert [type(iv).__name__ for iv in ivs] == ["Add", "Clamp", "Ablate", "Scale"]
    assert ivs[0].alpha == 2.5 and ivs[0].positions == "generated" and ivs[0].layers == (1, 2)
    assert ivs[1].value == 1.0 and ivs[1].layers == (2,)
    assert raw_spec({"fasteer": {"add": "v"}}) == [{"add": "v"}]
    assert raw_spec({"other": 1}) is None and raw_spec(None) is None


def test_equal_steering_has_one_canonical_form_and_salt():
    a = [{"add": "v", "alpha": 1.0, "layers": [1]}]
    b = [{"layers": [1], "alpha": 1.0, "add": "v"}]
    assert canonical(a) == canonical(b) and salt(a) == salt(b)
    assert salt(a) != salt([{"add": "v", "alpha": 2.0, "layers": [1]}])


@pytest.mark.parametrize("raw, words", [
    ("[{", "not valid JSON"),
    (7, "expected a list"),
    ([{"add": "nope"}], "unknown vector id 'nope'"),
    ([{"add": "narrow"}], "width 8"),
    ([{"add": "v", "alpha": "lots"}], "alpha: expected a real number"),
    ([{"add": "v", "alpha": float("inf")}], "finite"),
    ([{"add": "v", "layers": [9]}], "out of range"),
    ([{"add": "v", "layers": "1"}], "list of ints"),
    ([{"add": "v", "positions": "sometimes"}], "positions"),
    ([{"add": "v", "clamp": "v"}], "exactly one of"),
    ([{"add": "v", "colour": "red"}], "unknown keys"),
    ([{"scale": 0.5}], "needs 'layers'"),
    ([{"scale": 0.5, "layers": [1], "site": "mlp_out"}], "Hugging Face models only"),
    ([{"feature": 1, "sae": "missing"}], "unknown SAE id"),
    ([{"add": "v"}] * 17, "at most 16"),
])
def test_bad_specs_are_one_clear_error(registry, raw, words):
    with pytest.raises(SpecError, match=words.replace("(", r"\(").replace("[", r"\[")):
        parse(raw_spec({"fasteer": raw}), registry, n_layers=4, hidden=16)


def test_registry_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        Registry.from_file(tmp_path / "bad.json")
    (tmp_path / "missing.json").write_text(json.dumps({"vectors": {"x": "nope.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Registry.from_file(tmp_path / "missing.json")


# --------------------------------------------------------------------------- carrier
class RMSNorm(nn.Module):
    """Stands in for vLLM's RMSNorm (the carrier reads these attributes)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = 1e-6


class GemmaRMSNorm(RMSNorm):
    pass


@pytest.mark.parametrize("norm_cls", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_carrier_adds_steers_and_normalises(norm_cls, with_residual):
    from fasteer.hosts.vllm.carriers import NormCarrier, StepBuffers
    from fasteer.ops import layout as L
    from fasteer.plan import SlotTables

    d, n = 13, 5
    g = torch.Generator().manual_seed(11)
    norm = norm_cls(d)
    tables = SlotTables(d, torch.device("cpu"), slots=2, edits=1, bank_rows=1)
    v = torch.randn(d, generator=g)
    tables.bank[0] = v
    tables.meta[1, 0] = torch.tensor([L.pack_code(L.ADD), 0, -1, -1], dtype=torch.int32)
    tables.params[1, 0, 0] = 2.0
    buffers = StepBuffers.allocate(16, "cpu")
    buffers.slot[:n] = torch.tensor([-1, 1, 0, 1, -1], dtype=torch.int32)
    carrier = NormCarrier(norm, tables, buffers, backend="reference")
    x = torch.randn(n, d, generator=g)
    res = torch.randn(n, d, generator=g)
    h = (x + res) if with_residual else x.clone()
    want_h = h.double().clone()
    want_h[[1, 3]] += 2.0 * v.double()
    rms = torch.rsqrt(want_h.pow(2).mean(-1, keepdim=True) + 1e-6)
    w = norm.weight.detach().double() + (1.0 if norm_cls is GemmaRMSNorm else 0.0)
    want_out = want_h * rms * w
    carrier.install()
    try:
        got = norm(x, res.clone()) if with_residual else norm(x)
    finally:
        carrier.remove()
    out, stream = (got if with_residual else (got, x))
    assert torch.allclose(stream.double(), want_h, atol=1e-5)
    assert torch.allclose(out.double(), want_out, atol=1e-5)
    assert "forward" not in norm.__dict__     # removed: the class's forward again
