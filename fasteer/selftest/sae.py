"""SAE kernel checks for the self-test: the full SAE replace (`sae_replace_`) of every
GPU backend vs the `reference` backend (float32 math) at real sizes, both sides of the
fused/two-phase row threshold, every activation, with and without the error term."""
from __future__ import annotations

import itertools

import torch

from ..ops import layout as L
from ..ops import _sae_replace_fast_, sae_replace_

# bf16 weights round the activation side of each product to bf16 (see kernels/sae_fused.py)
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}


def _case(n, d, f, dtype, act, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    to = dict(device=device)
    w_enc = (torch.randn(d, f, generator=g) / d ** 0.5).to(dtype).to(**to)
    w_dec = (torch.randn(f, d, generator=g) / f ** 0.5).to(dtype).to(**to)
    b_enc = (torch.randn(f, generator=g) * 0.05).to(dtype).to(**to)
    b_dec = (torch.randn(d, generator=g) * 0.05).to(dtype).to(**to)
    thr = (torch.rand(f, generator=g) * 0.2).to(dtype).to(**to)
    h = torch.randn(n, d, generator=g).to(dtype).to(**to)
    s, k_edits = 3, 4
    feat = torch.randint(0, f, (s, k_edits), generator=g, dtype=torch.int32).to(**to)
    code = torch.randint(0, 4, (s, k_edits), generator=g, dtype=torch.int32).to(**to)
    lo = torch.randn(s, k_edits, generator=g)
    val = torch.stack([lo, lo + 1], -1).to(**to)
    keep = torch.tensor([1, 0, 1], dtype=torch.uint8, device=device)
    slot = torch.randint(-1, s, (n,), generator=g, dtype=torch.int32).to(**to)
    gate = torch.ones(n, dtype=torch.uint8, device=device)
    return h, (slot, gate, w_enc, b_enc, w_dec, b_dec, thr, feat, code, val, keep)


def check_sae(backends, device, log, quick=False, sizes=None):
    if sizes is None:
        sizes = [(1, 4096, 16384), (16, 4096, 65536), (64, 2304, 16384), (1, 8192, 131072)]
        if quick:
            sizes = [(1, 4096, 16384), (64, 2304, 16384)]
    acts = [L.ACT_RELU, L.ACT_JUMPRELU, L.ACT_TOPK]
    results = []
    for (n, d, f), act, dtype in itertools.product(sizes, acts, (torch.bfloat16,)):
        h, args = _case(n, d, f, dtype, act, device, seed=n + d + f + act)
        k = min(64, f // 2)
        ref = h.clone()
        sae_replace_(ref, *args, activation=act, k=k, in_scale=1.0, backend="reference")
        for backend in backends:
            rec = dict(op="sae_replace", backend=backend, rows=n, d=d, d_sae=f,
                       activation=act, dtype=str(dtype).split(".")[-1])
            try:
                out = h.clone()
                sae_replace_(out, *args, activation=act, k=k, in_scale=1.0, backend=backend)
                scale = ref.float().abs().amax(-1, keepdim=True) + 1
                err = float(((out.float() - ref.float()).abs() / scale).max())
                rec["err_vs_reference"] = err
                rec["ok"] = err <= TOL[dtype]
            except Exception as exc:  # noqa: BLE001
                rec["ok"] = False
                rec["error"] = f"{type(exc).__name__}: {exc}"
            results.append(rec)
            if not rec["ok"]:
                log(f"  FAIL {rec}")
    return results


def bench_sae(backend, device="cuda", d=4096, f=65536, dtype=torch.bfloat16):
    """µs per call and achieved weight bandwidth of a decode-size (1 row) SAE replace."""
    from .bench import _time_cuda
    rows = []
    for act in (L.ACT_JUMPRELU, L.ACT_TOPK):
        h, args = _case(1, d, f, dtype, act, device, seed=1)
        us = _time_cuda(lambda: _sae_replace_fast_(h, *args, activation=act, k=64,
                                                   backend=backend), 50)
        weight_bytes = 2 * d * f * torch.tensor([], dtype=dtype).element_size()
        rows.append(dict(op="sae_replace", backend=backend, activation=act, d=d, d_sae=f,
                         us=us, weight_gbps=weight_bytes / (us * 1e-6) / 1e9))
    return rows
