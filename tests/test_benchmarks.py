"""The benchmark harness (benchmarks/bench_peers.py, bench_gpu.py, run_gpu.sh) on tiny models.

What must hold for the published figures to mean anything: every timed method really
steers (a no-op peer, or one that steers the wrong thing, is caught and not timed),
fasteer equals the plain-hook steering in the benchmark setup, ratios are taken against
the unsteered baseline of the same run, runs are interleaved, and the GPU command exits 0
with a clear message where there is no GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu as bg  # noqa: E402
import bench_peers as bp  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The benchmark runs on one thread by default (steady on a shared 2-core machine);
    so do these tests. Restored afterwards for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = bp.Workload("tiny", 3, 48, 80, 4, 2, 211, 3, 7, 3,
                   cases=("add_1", "add_all", "clamp_all", "features", "sae_replace"))
CASES = TINY.cases
TINY_MIXED = bp.Workload("tiny_mixed", 3, 48, 80, 4, 2, 211, 6, 5, 2, cases=(), mixed_k=3)


class NoopPeer(bp.Method):
    """A peer whose steering silently does nothing (e.g. hooks on the wrong module)."""
    name = "noop"

    def activate(self, case, batch):
        pass


class RowZeroPeer(bp.Method):
    """Steers batch row 0 only: nnsight's ``output[0][:] +=`` idiom on a layer that returns
    a tensor. It changes the output, but not as the plain hooks do."""
    name = "row0"

    def activate(self, case, batch):
        p = next(self.model.parameters())
        fns = bp.layer_edit_fns(case, batch, p.device, p.dtype)
        layers = bp.decoder_layers(self.model)

        def hook(fn):
            def h(m, a, out):
                t = bp._out_tensor(out)
                t[0] = fn(t[0:1])[0]
                return out
            return h
        self.handles = [layers[l].register_forward_hook(hook(fn)) for l, fn in fns.items()]

    def deactivate(self):
        for h in self.handles:
            h.remove()


class HookPeer(bp.Hooks):
    """A correct peer without per-row steering: runs mixed batches as sub-batches."""
    name = "hookpeer"
    per_row = False


def fake_peers():
    return {"noop": {"ok": True, "version": "0", "cls": NoopPeer},
            "row0": {"ok": True, "version": "0", "cls": RowZeroPeer},
            "hookpeer": {"ok": True, "version": "0", "cls": HookPeer},
            "missing": {"ok": False, "error": "ModuleNotFoundError: No module named 'missing'",
                        "cls": None}}


def by_key(res):
    return {(r["case"], r["method"]): r for r in res["records"]}


def test_workload_records_checks_and_ratios():
    torch.manual_seed(0)
    res = bp.bench_workload(TINY, ["fasteer", "hooks", "noop", "row0", "hookpeer", "missing"],
                            fake_peers(), rounds=2, warmup=1, budget_s=None, log=lambda m: None)
    recs = by_key(res)
    assert not res["unavailable_cases"]
    assert len(res["records"]) == len(CASES) * 6
    base = res["unsteered"]
    assert base["rounds"] == 2 and base["decode_s"] > 0 and base["prefill_s"] > 0
    for case in CASES:
        fa = recs[(case, "fasteer")]
        assert fa["status"] == "timed", fa
        # fasteer equals the plain-hook steering in the benchmark setup, and it steers
        assert fa["check"]["max_abs_diff_vs_hooks"] <= bp.MATCH_TOL
        assert fa["check"]["change_vs_unsteered"] > bp.CHANGE_MARGIN
        # ratios are of medians against the same run's unsteered median
        assert fa["decode_ratio"] == pytest.approx(fa["decode_s"] / base["decode_s"])
        assert fa["prefill_ratio"] == pytest.approx(fa["prefill_s"] / base["prefill_s"])
        assert recs[(case, "hooks")]["status"] == "timed"
        assert recs[(case, "hookpeer")]["status"] == "timed"
        # a no-op peer is reported, never timed
        noop = recs[(case, "noop")]
        assert noop["status"] == "failed check" and "decode_s" not in noop
        assert not noop["check"]["changes_output"] and "moved by only" in noop["reason"]
        # a peer that steers something else (row 0 only, batch of 3) changes the output
        # but does not match the hooks: reported, not timed
        r0 = recs[(case, "row0")]
        assert r0["status"] == "failed check" and "decode_s" not in r0
        assert r0["check"]["changes_output"] and not r0["check"]["matches_hooks"]
        miss = recs[(case, "missing")]
        assert miss["status"] == "skipped" and "not installed" in miss["reason"]


def test_mixed_rows_native_and_as_sub_batches():
    res = bp.bench_workload(TINY_MIXED, ["fasteer", "hooks", "hookpeer", "noop"], fake_peers(),
                            rounds=1, warmup=0, budget_s=None, log=lambda m: None)
    recs = by_key(res)
    fa, hp = recs[("mixed", "fasteer")], recs[("mixed", "hookpeer")]
    assert fa["mode"] == "native" and fa["status"] == "timed"
    assert fa["check"]["max_abs_diff_vs_hooks"] <= bp.MATCH_TOL
    # without per-row steering the peer runs one sub-batch per configuration, in row order
    assert hp["mode"].startswith("3 sub-batches") and hp["status"] == "timed"
    assert hp["check"]["max_abs_diff_vs_hooks"] <= 1e-6
    assert recs[("mixed", "noop")]["status"] == "failed check"


def test_many_row_configs_in_one_plan_match_hooks():
    """K > 8 configurations go to fasteer in one plan (see Fasteer.activate)."""
    w = bp.Workload("tiny_k11", 2, 32, 48, 4, 2, 97, 11, 4, 1, cases=(), mixed_k=11)
    res = bp.bench_workload(w, ["fasteer", "hooks"], {}, rounds=1, warmup=0, budget_s=None,
                            log=lambda m: None)
    fa = by_key(res)[("mixed", "fasteer")]
    assert fa["status"] == "timed", fa
    assert fa["check"]["max_abs_diff_vs_hooks"] <= bp.MATCH_TOL


def test_mixed_case_gives_rows_distinct_steering():
    case = bp.make_case("mixed", TINY_MIXED, 2.0, seed=3)
    rows = [r for g in case.groups for r in g.rows]
    assert sorted(rows) == list(range(TINY_MIXED.batch)) and len(case.groups) == 3
    fns = bp.layer_edit_fns(case, TINY_MIXED.batch, "cpu", torch.float32)
    h = torch.zeros(TINY_MIXED.batch, 1, TINY_MIXED.hidden)
    out = fns[0](h)
    g0, g1 = case.groups[0], case.groups[1]
    assert torch.allclose(out[g0.rows[0], 0], g0.edits[0].scalar * g0.edits[0].vectors[0])
    assert not torch.allclose(out[g0.rows[0]], out[g1.rows[0]])


def test_clamp_reference_pins_the_projection():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(48, generator=g)
    e = bp.Edit("clamp", {0: v}, 1.7)
    h = torch.randn(2, 5, 48, generator=g, dtype=torch.float64).float()
    out = bp._uniform_fn(e, v, "cpu", torch.float32)(h)
    u = v / v.norm()
    assert torch.allclose(out @ u, torch.full((2, 5), 1.7), atol=1e-5)
    # the orthogonal part is untouched
    assert torch.allclose(out - (out @ u)[..., None] * u, h - (h @ u)[..., None] * u, atol=1e-5)


def test_feature_edit_reference_matches_sae_math():
    import fasteer as fs
    g = torch.Generator().manual_seed(11)
    D, F = 24, 40
    sae = fs.SAE(torch.randn(D, F, generator=g), torch.randn(F, generator=g) * 0.1,
                 torch.randn(F, D, generator=g), torch.randn(D, generator=g) * 0.1,
                 activation="jumprelu", threshold=torch.rand(F, generator=g) * 0.5,
                 layer=1, site="resid_post")
    feats = (3, 17, 38)
    e = bp.Edit("feature", {1: None}, 2.5, sae=sae, features=feats)
    h = torch.randn(4, 6, D, generator=g)
    out = bp._uniform_fn(e, None, "cpu", torch.float32)(h)
    z = sae.encode(h)
    want = h.double().clone()
    for k in feats:
        want += (2.5 - z[..., k:k + 1].double()) * sae.W_dec[k].double()
    assert torch.allclose(out.double(), want, atol=1e-4)


def test_interleaved_rounds_rotate_and_take_medians():
    calls = []

    def cand(name, values):
        it = iter(values)

        def fn(warmup=False):
            calls.append((name, warmup))
            return (0.0, 0.0) if warmup else (next(it), 10 * next(it))
        return fn

    times = bp.interleaved_sessions({"a": cand("a", [1, 1, 5, 5, 2, 2]),
                                     "b": cand("b", [3, 3, 1, 1, 9, 9])}, rounds=3, warmup=1)
    assert calls[:2] == [("a", True), ("b", True)]
    timed = [n for n, w in calls if not w]
    assert timed == ["a", "b", "b", "a", "a", "b"]          # order rotates each round
    assert times["a"]["prefill_s"] == 2 and times["a"]["decode_s"] == 20
    assert times["b"]["prefill_s"] == 3 and times["b"]["rounds"] == 3


def test_decode_median_is_over_every_timed_step():
    # one slow step per session (another process ran) does not move the median
    rounds = iter([[1.0, 1.0, 9.0], [1.0, 8.0, 1.0], [7.0, 1.0, 1.0]])

    def fn(warmup=False):
        steps = [1.0] * 3 if warmup else next(rounds)
        return 0.5, sum(steps) / 3, None, steps

    t = bp.interleaved_sessions({"a": fn}, rounds=3, warmup=1)
    assert t["a"]["decode_s"] == 1.0 and t["a"]["decode_samples"] == 9
    assert t["a"]["decode_mean_s"] == pytest.approx(10 / 3)   # the per-session means: 11/3, 10/3, 9/3


def test_main_writes_json_and_markdown(tmp_path):
    rc = bp.main(["--quick", "--rounds", "1", "--methods", "fasteer,hooks,steering-vectors",
                  "--workloads", "L4_D128_b16_mixed", "--out", str(tmp_path), "--stem", "t"])
    assert rc == 0
    payload = json.loads((tmp_path / "t.json").read_text())
    md = (tmp_path / "t.md").read_text()
    m = payload["machine"]
    assert m["cpu"] and m["torch"] == torch.__version__ and m["date"]
    assert payload["command"].startswith("python benchmarks/bench_peers.py") or \
        "FASTEER_BENCH_COMMAND" in os.environ
    assert "load_before" in payload and "Load average" in md and "Command:" in md
    recs = by_key(payload["results"][0])
    assert recs[("mixed", "fasteer")]["status"] == "timed"
    sv = recs[("mixed", "steering-vectors")]
    # the project's environment has no peers: reported, not a crash
    assert sv["status"] in ("timed", "skipped")
    assert "| mixed | fasteer |" in md and "Targets" in md


def test_gpu_bench_eager_smoke_on_cpu(tmp_path):
    rc = bg.main(["--tiny", "--device", "cpu", "--modes", "eager", "--rounds", "1",
                  "--scenarios", "b1,mixed_b8_k8", "--dtype", "float32", "--out", str(tmp_path)])
    assert rc == 0
    (j,) = tmp_path.glob("gpu_tiny_*.json")
    payload = json.loads(j.read_text())
    scen = {s["name"]: s for s in payload["scenarios"]}
    for name, case in (("b1", "add_all"), ("mixed_b8_k8", "mixed")):
        recs = {(r["case"], r["method"]): r for r in scen[name]["modes"]["eager"]["records"]}
        fa = recs[(case, "fasteer")]
        assert fa["status"] == "timed", fa
        assert fa["check"]["rel_diff_vs_hooks"] < 1e-5 and fa["check"]["changes_output"]
        assert fa["decode_ratio"] > 0
    assert "Targets" in (tmp_path / j.name.replace(".json", ".md")).read_text()


def _no_cuda_env():
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_bench_gpu_without_gpu_says_so_and_exits_0():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], cwd=ROOT,
                       env=_no_cuda_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout and "Nothing to do" in r.stdout


def test_run_gpu_sh_without_gpu_says_so_and_exits_0():
    env = _no_cuda_env()
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout and "nothing to do" in r.stdout


def test_captured_decode_static_cache_step():
    """The static-cache step (graph / compile modes) steps the cache like eager decoding."""
    model = bg.build_llama(bg.TINY, "cpu", torch.float32)
    ids = torch.randint(1, bg.TINY.vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    forced = ids[:, :1]
    cd = bg.CapturedDecode(model, bp.Unsteered(model), None, ids, 16, forced, compiled=False,
                           graph=False, sync=lambda: None)
    with torch.inference_mode():
        ref = model(torch.cat([ids, forced], 1)).logits[:, -1]
    assert torch.allclose(cd.first_logits, ref, atol=1e-4)
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4's StaticCache keeps its length on the host: the harness says so
        with pytest.raises(NotImplementedError, match="transformers >= 5"):
            cd.run(3, lambda: None)
        return
    _, per_step = cd.run(3, lambda: None)
    assert per_step > 0
    assert int(cd.cache.layers[0].cumulative_length) == 9 + 3


def test_graph_mode_fasteer_tables_fit_every_case():
    """The GPU set's graph/compile modes patch fasteer armed ahead with fixed tables sized
    from the scenario's cases; every case must fit them and still equal the hooks."""
    model = bg.build_llama(bg.TINY, "cpu", torch.float32)
    sc = bg.Scenario("t", 6, 7, 2, ("add_all", "features", "sae_replace"), mixed_k=6)
    w = sc.workload(bg.TINY)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, bg.TINY.vocab, (6, 7), generator=g)
    tok = torch.randint(1, bg.TINY.vocab, (6, 1), generator=g)
    cases, missing = bp.cases_for(w, bp.stream_scale(model, ids[:1]), model)
    assert not missing and [c.name for c in cases] == ["add_all", "features", "sae_replace", "mixed"]
    import copy
    steered = copy.deepcopy(model)
    fa, hooks = bg.static_fasteer(steered, cases), bp.Hooks(model)
    try:
        assert fa.st.always_armed
        base = bg.CapturedDecode(model, bp.Unsteered(model), None, ids, 16, tok, compiled=False,
                                 graph=False, sync=lambda: None).first_logits
        for case in cases:
            ref = bg.CapturedDecode(model, hooks, case, ids, 16, tok, compiled=False, graph=False,
                                    sync=lambda: None)
            got = bg.CapturedDecode(steered, fa, case, ids, 16, tok, compiled=False, graph=False,
                                    sync=lambda: None)
            chk = bg.logits_check(got.first_logits, base, ref.first_logits, 1e-5)
            assert chk["ok"] and chk["matches_hooks"], (case.name, chk)
            ref.release()
            got.release()
    finally:
        fa.close()


def test_lockstep_interleaves_steps_and_pairs_them(monkeypatch):
    """Every round: all prefills, then step 1 of every candidate, step 2, ...; the order
    rotates per round; split candidates step all their parts in their turn."""
    monkeypatch.setattr(bp, "new_cache", lambda model: None)
    calls = []

    class Fake(bp.Method):
        def __init__(self, tag):
            super().__init__(None)
            self.tag = tag

        def forward(self, input_ids, cache, attention_mask, position_ids):
            calls.append((self.tag, input_ids.shape[1]))
            return torch.zeros(input_ids.shape[0], 1, 5)

    ids = torch.ones(4, 3, dtype=torch.long)
    cands = [bp.Candidate("base", [(Fake("base"), None)]),
             bp.Candidate("x", [(Fake("x"), None)]),
             bp.Candidate("split", [(Fake("s0"), (0, 2)), (Fake("s1"), (1, 3))])]
    t = bp.lockstep(cands, ids, n_decode=2, rounds=2, warmup=0)
    # round 0: prefills (length-3 inputs) base, x, s0, s1; then steps (length 1) in the same order
    r0 = [("base", 3), ("x", 3), ("s0", 3), ("s1", 3)] + [("base", 1), ("x", 1), ("s0", 1), ("s1", 1)] * 2
    # round 1 rotates by one: x, split, base
    r1 = [("x", 3), ("s0", 3), ("s1", 3), ("base", 3)] + [("x", 1), ("s0", 1), ("s1", 1), ("base", 1)] * 2
    assert calls == r0 + r1
    assert t["x"]["rounds"] == 2 and t["x"]["decode_samples"] == 4
    assert t["base"]["decode_paired_ratio"] == 1.0
    assert t["split"]["decode_s"] > 0


def test_sae_ops_bench_checks_and_times_every_path(capsys):
    """The SAE microbenchmark checks each candidate against float64 before timing it."""
    import bench_sae_ops
    assert bench_sae_ops.main(["--quick", "--no-write", "--rounds", "2", "--features", "3"]) == 0
    table = capsys.readouterr().out
    assert "| 1 | 64 | 512 |" in table and "cpu fused" in table
