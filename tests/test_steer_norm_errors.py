"""Bad input to the op raises a clear error naming the argument, before anything is written."""
from __future__ import annotations

import pytest
import torch

import fasteer.ops as ops
from fasteer.ops import layout as L


def good(n=4, d=8, s=2, e=1, dtype=torch.float32):
    torch.manual_seed(0)
    meta = torch.full((s, e, 4), -1, dtype=torch.int32)
    meta[:, :, 0] = L.ADD
    meta[:, :, 1] = 0
    return dict(h=torch.randn(n, d, dtype=dtype), out=torch.empty(n, d, dtype=dtype),
                slot=torch.zeros(n, dtype=torch.int32), gate=torch.ones(n, dtype=torch.uint8),
                meta=meta, params=torch.ones(s, e, 8), bank=torch.randn(3, d),
                weight=torch.ones(d, dtype=dtype))


def call(a, **kw):
    return ops.steer_norm_(a["h"], a["out"], a["slot"], a["gate"], a["meta"], a["params"],
                           a["bank"], a["weight"], backend=kw.pop("backend", "cpu"), **kw)


CASES = {
    "wrong D in bank": (lambda a: a.update(bank=torch.randn(3, 9)), ValueError, "bank"),
    "wrong D in weight": (lambda a: a.update(weight=torch.ones(9)), ValueError, "weight"),
    "weight dtype": (lambda a: a.update(weight=torch.ones(8, dtype=torch.float16)), TypeError, "weight"),
    "h dtype": (lambda a: a.update(h=a["h"].double(), out=a["out"].double()), TypeError, "h"),
    "out dtype": (lambda a: a.update(out=a["out"].half()), TypeError, "out"),
    "out shape": (lambda a: a.update(out=torch.empty(4, 7)), ValueError, "out"),
    "slot dtype": (lambda a: a.update(slot=a["slot"].long()), TypeError, "slot"),
    "slot count": (lambda a: a.update(slot=torch.zeros(3, dtype=torch.int32)), ValueError, "slot"),
    "slot out of range": (lambda a: a["slot"].__setitem__(1, 2), ValueError, "slot"),
    "slot below -1": (lambda a: a["slot"].__setitem__(1, -2), ValueError, "slot"),
    "gate dtype": (lambda a: a.update(gate=a["gate"].float()), TypeError, "gate"),
    "NaN in bank": (lambda a: a["bank"].__setitem__((1, 2), float("nan")), ValueError, "bank"),
    "inf in params": (lambda a: a["params"].__setitem__((0, 0, 0), float("inf")), ValueError, "params"),
    "bank index out of range": (lambda a: a["meta"].__setitem__((0, 0, 1), 3), ValueError, "meta"),
    "unknown kind": (lambda a: a["meta"].__setitem__((0, 0, 0), 77), ValueError, "meta"),
    "params shape": (lambda a: a.update(params=torch.ones(2, 1, 7)), ValueError, "params"),
    "meta dtype": (lambda a: a.update(meta=a["meta"].long()), TypeError, "meta"),
    "non-contiguous h": (lambda a: a.update(h=torch.randn(8, 4).t()), ValueError, "h"),
    "non-contiguous bank": (lambda a: a.update(bank=torch.randn(8, 3).t()), ValueError, "bank"),
    "device mismatch": (lambda a: a.update(bank=torch.randn(3, 8, device="meta")), ValueError, "bank"),
    "out aliases h": (lambda a: a.update(out=a["h"]), ValueError, "out"),
    "not a tensor": (lambda a: a.update(slot=[0, 0, 0, 0]), TypeError, "slot"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_before_writing(name):
    mutate, exc, arg = CASES[name]
    a = good()
    mutate(a)
    h_before = a["h"].clone()
    out_before = a["out"].clone() if isinstance(a["out"], torch.Tensor) else None
    with pytest.raises(exc, match=arg):
        call(a)
    assert torch.equal(a["h"], h_before), "h was written before the error"
    if out_before is not None and a["out"] is not a["h"]:
        assert torch.equal(a["out"].nan_to_num(), out_before.nan_to_num())


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        call(good(), backend="tpu")


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with pytest.raises(RuntimeError, match="cuda"):
        call(good(), backend="cuda")


def test_env_backend_is_honoured(monkeypatch):
    monkeypatch.setenv("FASTEER_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        call(good(), backend=None)


def _overlapping(a):
    buf = torch.zeros(2 * 4 * 8, dtype=a["h"].dtype)
    h = buf[:32].view(4, 8)
    h.copy_(a["h"])
    a.update(h=h, out=buf[12:44].view(4, 8))            # shares 20 elements with h


LAYOUT_CASES = {
    "out partially overlaps h": (_overlapping, "out"),
    "stride-0 (expanded) h": (lambda a: a.update(h=a["h"][:1].expand(4, 8)), "h"),
    "stride-0 (expanded) out": (lambda a: a.update(out=a["out"][:1].expand(4, 8)), "out"),
    "weight shorter than D": (lambda a: a.update(weight=torch.ones(7)), "weight"),
    "gate shorter than N": (lambda a: a.update(gate=a["gate"][:3]), "gate"),
    "out smaller than h": (lambda a: a.update(out=torch.empty(3, 8)), "out"),
    "params smaller than meta": (lambda a: a.update(params=torch.ones(1, 1, 8)), "params"),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_CASES))
@pytest.mark.parametrize("entry", ["public", "carrier", "library op"])
def test_layout_errors_raise_on_every_entry_point(name, entry):
    """No entry point -- not the carriers' private one that trusts table values, nor the
    registered torch.library op -- hands the kernel buffers it would overrun or race on."""
    mutate, arg = LAYOUT_CASES[name]
    a = good()
    mutate(a)
    h_before = a["h"].clone()
    args = (a["h"], a["out"], a["slot"], a["gate"], a["meta"], a["params"], a["bank"], a["weight"])
    with pytest.raises(ValueError, match=arg):
        if entry == "public":
            call(a)
        elif entry == "carrier":
            ops._steer_norm_fast_(*args, backend="cpu")
        else:
            torch.ops.fasteer.steer_norm_(*args, None, L.NORM_RMS, 1e-6, 0.0, True, "cpu")
    assert torch.equal(a["h"], h_before)


def test_out_in_other_half_of_a_shared_buffer_is_fine():
    """Interleaved row views of one buffer that share no element are not an overlap."""
    a = good()
    buf = torch.zeros(4, 16)
    buf[:, :8] = a["h"]
    h, out = buf[:, :8], buf[:, 8:]
    ref_h, ref_out = a["h"].clone(), torch.empty(4, 8)
    ops.steer_norm_(ref_h, ref_out, a["slot"], a["gate"], a["meta"], a["params"], a["bank"],
                    a["weight"], backend="reference")
    ops.steer_norm_(h, out, a["slot"], a["gate"], a["meta"], a["params"], a["bank"], a["weight"],
                    backend="cpu")
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(out, ref_out)


def test_corrupted_table_values_on_the_carrier_path_do_not_crash():
    """The carriers' entry point trusts table values; the C++ kernel skips an edit whose
    bank index or condition is out of range instead of reading outside the bank."""
    for idx in ((0, 0, 1, 1000), (0, 0, 3, -5), (0, 0, 0, 77)):
        a = good()
        if idx[2] == 3:
            a["meta"][0, 0] = torch.tensor([L.pack_code(L.ADD, condition=L.COND_PROJ), 0, -1, -5])
        else:
            a["meta"][idx[:3]] = idx[3]
        h = a["h"].clone()
        ops._steer_norm_fast_(h, a["out"], a["slot"], a["gate"], a["meta"], a["params"],
                              a["bank"], a["weight"], backend="cpu")
        assert torch.equal(h, a["h"]), "an invalid edit must be skipped"


def test_validate_is_not_a_public_keyword():
    a = good()
    with pytest.raises(TypeError):
        call(a, validate=False)
    with pytest.raises(TypeError):
        ops.steer_(a["h"], a["slot"], a["gate"], a["meta"], a["params"], a["bank"], validate=False)
    with pytest.raises(TypeError):
        ops.sae_replace_(a["h"], a["slot"], a["gate"], torch.zeros(8, 2), torch.zeros(2),
                         torch.zeros(2, 8), torch.zeros(8), torch.empty(0),
                         torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                         torch.zeros(1, 1, 2), torch.ones(1, dtype=torch.uint8), activation=0,
                         validate_inputs=False)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_zero_rows_are_accepted(backend, shape):
    a = good()
    h, out = torch.randn(*shape), torch.empty(*shape)
    empty_i, empty_g = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.uint8)
    assert ops.steer_norm_(h, out, empty_i, empty_g, a["meta"], a["params"], a["bank"],
                           a["weight"], backend=backend) is out
    ops.steer_(h, empty_i, empty_g, a["meta"], a["params"], a["bank"], backend=backend)
    x = torch.randn(*shape)
    ops.add_steer_norm_(h, x, out, empty_i, empty_g, a["meta"], a["params"], a["bank"],
                        a["weight"], backend=backend)
