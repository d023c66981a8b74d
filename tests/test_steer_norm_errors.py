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
