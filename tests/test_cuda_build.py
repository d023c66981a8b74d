"""The CUDA steer+norm, checked on a machine without a GPU.

* The build: `fasteer._cuda` imports, exports `steer_norm`, `limits` and `archs` (the
  configured SM list), and turns a refused launch into a RuntimeError with CUDA's text.
* ptxas: csrc/cuda/steer_norm.cu compiled once with the build's nvcc flags plus
  ``-Xptxas -v``; every steer_norm kernel instantiation, on every arch, has a 0-byte
  stack frame, no spill stores / loads and no local memory.
* The wrapper: the argument tuple `fasteer.ops.cuda.steer_norm` hands the module
  (pointers, row strides, dtype code, table sizes, norm kind, stream), recorded by a
  stand-in module.
* The kernel itself, emulated: the .cu source compiled by g++ against a small CUDA
  emulation (EMU_HEADER below: each block's threads are fibers, ``__syncthreads`` and
  warp shuffles are real barriers, warps run in random order and ahead of each other,
  so a missing barrier gives wrong results), driven through the real wrapper and compared
  with the reference backend and the float64 oracle: every dtype, odd D (1, 7, 4099,
  16401), misaligned views, padded row strides, every norm variant, the warp-per-row,
  block-per-row and loop kernels, aligned and element-wise paths.

The same comparison on a real GPU is tests/test_cuda_steer_norm.py.
Run ``python tests/test_cuda_build.py`` to print the ptxas table of docs/build_notes.md.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fasteer.ops import dispatch
from fasteer.ops import layout as L
from fasteer.ops.cuda import steer_norm as wrapper
from fasteer.ops.reference.steer_norm import steer_norm as reference
from steer_oracle import (assert_only_row_1_written, assert_rows_close, oracle, random_case,
                          random_tables, skipped_rows_case)

ROOT = Path(__file__).resolve().parent.parent

NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
KERNEL_SOURCE = ROOT / "csrc" / "cuda" / "steer_norm.cu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def configured_archs() -> list[str]:
    """The SM list setup.py builds for (same parsing as setup.cuda_archs)."""
    raw = os.environ.get("FASTEER_CUDA_ARCHS", "8.0;8.9;9.0")
    items = raw.replace(",", ";").replace(" ", ";").split(";")
    return [i.strip().lower().replace("sm_", "").replace("+ptx", "").replace(".", "")
            for i in items if i.strip()]


# --------------------------------------------------------------------------- the module

@pytest.fixture(scope="module")
def cuda_module():
    if NVCC is None:
        pytest.skip("no nvcc on this machine: the CUDA module is not built")
    mod = dispatch.cuda_module()
    assert mod is not None, ("nvcc is present but fasteer._cuda does not import: "
                             f"{dispatch._import('fasteer._cuda')[1]}")
    return mod


def test_module_exports_steer_norm_and_archs(cuda_module):
    assert cuda_module.archs() == configured_archs()
    for name in ("steer_norm", "limits", "add_rows", "device_count"):
        assert callable(getattr(cuda_module, name)), name
    limits = cuda_module.limits()
    assert limits == {"max_register_row": 16384, "max_loop_edits": 2048}
    assert "stream" in cuda_module.steer_norm.__doc__


def test_refused_launch_raises_runtime_error_with_cuda_text(cuda_module):
    h = torch.zeros(2, 8)
    slot = torch.zeros(2, dtype=torch.int32)
    gate = torch.ones(2, dtype=torch.uint8)
    base = [h.data_ptr(), h.data_ptr(), 2, 8, 8, 8, 0, slot.data_ptr(), gate.data_ptr(), 0, 0, 0,
            0, 0, 0, 0, 0, L.NORM_RMS, 1e-5, 0.0, True, 0, 0, 0]
    for index, bad in ((17, 7), (6, 9), (1, 0)):   # norm kind, dtype code, out missing
        args = list(base)
        args[index] = bad
        with pytest.raises(RuntimeError, match="steer_norm launch failed: invalid argument"):
            cuda_module.steer_norm(*args)
    args = list(base)
    args[2] = 0                                    # no rows: nothing to launch
    assert cuda_module.steer_norm(*args) is None
    if not torch.cuda.is_available():
        # a well-formed launch without a usable GPU fails cleanly (never dereferences)
        with pytest.raises(RuntimeError, match="steer_norm launch failed: "):
            cuda_module.steer_norm(*base)


# --------------------------------------------------------------------------- the wrapper

class RecordingModule:
    """Stands in for fasteer._cuda: records each steer_norm call's arguments."""

    def __init__(self):
        self.calls = []

    def steer_norm(self, *args):
        self.calls.append(args)

    def limits(self):
        return {"max_register_row": 16384, "max_loop_edits": 2048}


@pytest.fixture
def recorder(monkeypatch):
    rec = RecordingModule()
    monkeypatch.setattr(dispatch, "cuda_module", lambda: rec)
    monkeypatch.setattr(wrapper, "_raw_stream", lambda index: 0x5EED0 + index)
    monkeypatch.setattr(wrapper, "_current_device", lambda: 0)
    wrapper._limits.cache_clear()
    yield rec
    wrapper._limits.cache_clear()


def tables(d, n_slots=2, n_edits=3, n_bank=5):
    return random_tables(torch.Generator().manual_seed(d), d, n_slots, n_edits, n_bank)


@pytest.mark.parametrize("dtype,code",
                         [(torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 2)])
@pytest.mark.parametrize("norm_kind", [L.NORM_RMS, L.NORM_LAYER])
def test_wrapper_marshals_pointers_strides_and_stream(recorder, dtype, code, norm_kind):
    d = 33
    h = torch.zeros(3, 40, dtype=dtype)[:, :d]          # row stride 40
    out = torch.zeros(3, 48, dtype=dtype)[:, :d]        # row stride 48
    slot = torch.tensor([0, -1, 1], dtype=torch.int32)
    gate = torch.tensor([True, True, False])
    meta, params, bank = tables(d)
    weight = torch.ones(d, dtype=dtype)
    bias = torch.zeros(d, dtype=dtype)
    wrapper.steer_norm_cuda(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind,
                            1e-5, 1.0, False)
    expected = (h.data_ptr(), out.data_ptr(), 3, d, 40, 48, code, slot.data_ptr(),
                gate.data_ptr(), meta.data_ptr(), params.data_ptr(), bank.data_ptr(), 2, 3, 5,
                weight.data_ptr(), bias.data_ptr() if norm_kind == L.NORM_LAYER else 0,
                norm_kind, 1e-5, 1.0, False, 0, 0, 0x5EED0)      # no addend: 0, 0
    assert recorder.calls == [expected]
    assert [type(a) for a in recorder.calls[0]] == [type(a) for a in expected]
    # the add-first path (add_steer_norm_): the addend's pointer and its own row stride
    recorder.calls.clear()
    addend = torch.zeros(3, 56, dtype=dtype)[:, :d]     # row stride 56
    wrapper.steer_norm_cuda(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind,
                            1e-5, 1.0, False, addend)
    assert recorder.calls == [expected[:21] + (addend.data_ptr(), 56, 0x5EED0)]


def test_wrapper_norm_none_and_empty_batches(recorder):
    d = 7
    h = torch.zeros(4, d, dtype=torch.bfloat16)
    slot = torch.zeros(4, dtype=torch.int32)
    gate = torch.ones(4, dtype=torch.uint8)
    meta, params, bank = tables(d)
    wrapper.steer_norm_cuda(h, None, slot, gate, meta, params, bank, None, None, L.NORM_NONE,
                            0.0, 0.0, True)
    (args,) = recorder.calls
    assert args[1] == 0 and args[5] == 0 and args[15] == 0 and args[16] == 0
    assert args[17] == L.NORM_NONE and args[2:5] == (4, d, d)
    recorder.calls.clear()
    empty = h[:0]
    wrapper.steer_norm_cuda(empty, torch.zeros_like(empty), slot[:0], gate[:0], meta, params, bank,
                            None, None, L.NORM_RMS, 1e-6, 0.0, True)
    assert recorder.calls == []


def test_wrapper_refuses_too_many_edits_for_wide_rows(recorder):
    d = 16385
    h = torch.zeros(1, d)
    slot = torch.zeros(1, dtype=torch.int32)
    gate = torch.ones(1, dtype=torch.uint8)
    params, bank = torch.zeros(1, 2049, 8), torch.zeros(1, d)
    meta = torch.zeros(1, 2049, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"meta: .*at most 2048 edits.*got 2049"):
        wrapper.steer_norm_cuda(h, None, slot, gate, meta, params, bank, None, None,
                                L.NORM_NONE, 0.0, 0.0, True)
    assert recorder.calls == []
    wrapper.steer_norm_cuda(h, None, slot, gate, meta[:, :2048], params[:, :2048], bank, None,
                            None, L.NORM_NONE, 0.0, 0.0, True)
    assert len(recorder.calls) == 1


# --------------------------------------------------------------------------- the emulated kernel

EMU_HEADER = r"""
// Minimal CUDA emulation for testing csrc/cuda/steer_norm.cu on a CPU (see the test's
// docstring). Blocks run one after the other; a block's threads are ucontext fibers.
#pragma once
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4,
       cudaErrorInvalidConfiguration = 9 };
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
struct Fiber { ucontext_t ctx; std::vector<char> stack; bool done = false; };
inline emu_dim3 thread_idx, block_idx, block_dim;
inline ucontext_t sched;
inline std::vector<Fiber> fibers;
inline size_t current = 0;
inline std::function<void()> body;
inline int live_block = 0, block_arrived = 0;
inline unsigned block_gen = 0;
inline std::vector<int> live_warp, warp_arrived;
inline std::vector<unsigned> warp_gen, block_wait;  // block_wait: generation waited on, or ~0u
inline std::vector<float> lanes;
inline std::vector<char> smem;
inline int error = 0;
inline bool drop_barriers = false;  // test of the emulation itself: __syncthreads does nothing
inline char last_kernel[512] = "";
inline unsigned long long rng = 0x9e3779b97f4a7c15ull;
inline std::map<const void*, size_t> max_dyn_smem;  // kernel -> opted-in bytes (default 48 KB)

inline unsigned next_rand() {
  rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
  return unsigned(rng >> 32);
}
inline void fail(const char* why) {
  if (!error) { error = cudaErrorLaunchFailure; std::fprintf(stderr, "emu: %s\n", why); }
}
inline void yield() { swapcontext(&fibers[current].ctx, &sched); }
inline void warp_barrier(int w) {
  const unsigned g = warp_gen[w];
  if (++warp_arrived[w] == live_warp[w]) { warp_arrived[w] = 0; ++warp_gen[w]; return; }
  while (warp_gen[w] == g) yield();
}
inline void sync_block() {
  if (drop_barriers) return;
  const unsigned g = block_gen;
  if (++block_arrived == live_block) { block_arrived = 0; ++block_gen; return; }
  block_wait[current] = g;
  while (block_gen == g) yield();
  block_wait[current] = ~0u;
}
inline float shfl_xor(float v, int offset) {
  const int t = int(thread_idx.x), w = t / 32, l = t % 32;
  if (live_warp[w] != 32) fail("shuffle in a partial warp");
  lanes[size_t(t)] = v;
  warp_barrier(w);
  const float r = lanes[size_t(w * 32 + (l ^ offset))];
  warp_barrier(w);
  return r;
}
inline void trampoline() {
  body();
  fibers[current].done = true;
}
// Run warp w's lanes until every one of them waits at __syncthreads or has exited.
inline bool run_warp(unsigned w, unsigned& remaining) {
  bool ran_any = false;
  for (bool ran = true; ran;) {
    ran = false;
    for (unsigned t = w * 32; t < w * 32 + 32; ++t) {
      if (fibers[t].done || block_wait[t] == block_gen) continue;
      current = t;
      thread_idx.x = t;
      swapcontext(&sched, &fibers[t].ctx);
      ran = ran_any = true;
      if (fibers[t].done) {
        --remaining;
        --live_block;
        --live_warp[w];
        if (block_arrived) fail("a thread exited while others wait at __syncthreads");
        if (warp_arrived[w]) fail("a lane exited while its warp waits at a shuffle");
      }
    }
  }
  return ran_any;
}
inline void launch(const char* name, const void* fn, unsigned grid, unsigned block,
                   size_t dyn_smem, std::function<void()> kernel) {
  std::snprintf(last_kernel, sizeof last_kernel, "%s grid=%u block=%u smem=%zu", name, grid,
                block, dyn_smem);
  const auto limit = max_dyn_smem.find(fn);
  const size_t max_dyn = limit == max_dyn_smem.end() ? 48 * 1024 : limit->second;
  if (grid == 0 || block == 0 || block > 1024 || block % 32 || dyn_smem > max_dyn) {
    error = cudaErrorInvalidConfiguration;
    return;
  }
  body = std::move(kernel);
  block_dim.x = block;
  smem.assign(dyn_smem + 16, char(0x7f));
  if (fibers.size() < block) fibers.resize(block);
  const unsigned n_warps = block / 32;
  std::vector<unsigned> order(n_warps);
  for (unsigned b = 0; b < grid && !error; ++b) {
    block_idx.x = b;
    live_block = int(block);
    block_arrived = 0;
    live_warp.assign(n_warps, 32);
    warp_arrived.assign(n_warps, 0);
    warp_gen.assign(n_warps, 0);
    block_wait.assign(block, ~0u);
    lanes.assign(block, 0.0f);
    for (unsigned t = 0; t < block; ++t) {
      Fiber& f = fibers[t];
      f.stack.resize(128 * 1024);
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &sched;
      makecontext(&f.ctx, trampoline, 0);
    }
    unsigned remaining = block;
    while (remaining) {
      for (unsigned w = 0; w < n_warps; ++w) order[w] = w;
      for (unsigned w = n_warps; w > 1; --w) std::swap(order[w - 1], order[next_rand() % w]);
      bool progress = false;
      for (unsigned w : order) progress |= run_warp(w, remaining);
      if (!progress) { fail("deadlock: every thread waits at a barrier"); break; }
    }
  }
}
inline void* dynamic_smem() { return smem.data(); }
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
inline void __syncthreads() { emu::sync_block(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) { return emu::shfl_xor(v, offset); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline cudaError_t cudaGetLastError() { int e = emu::error; emu::error = 0; return e; }
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024)
    return cudaErrorInvalidValue;
  emu::max_dyn_smem[reinterpret_cast<const void*>(fn)] = size_t(value);
  return cudaSuccess;
}
"""

EMU_EXPORTS = r"""
extern "C" int emu_steer_norm(void* h, void* out, int64_t n, int64_t d, int64_t h_stride,
    int64_t out_stride, int32_t dtype, const int32_t* slot, const uint8_t* gate,
    const int32_t* meta, const float* params, const float* bank, int64_t s, int64_t e, int64_t v,
    const void* weight, const void* bias, int32_t norm_kind, double eps, double weight_offset,
    bool cast_before_weight, const void* addend, int64_t addend_stride, uintptr_t stream) {
  return fasteer::cuda::launch_steer_norm(h, out, n, d, h_stride, out_stride, dtype, slot, gate,
      meta, params, bank, s, e, v, weight, bias, norm_kind, float(eps), float(weight_offset),
      cast_before_weight, addend, addend_stride, stream);
}
extern "C" const char* emu_last_kernel() { return emu::last_kernel; }
extern "C" void emu_drop_barriers(int drop) { emu::drop_barriers = drop != 0; }
extern "C" int64_t emu_limit(int which) {
  return which == 0 ? fasteer::cuda::kMaxRegisterRow : fasteer::cuda::kMaxLoopEdits;
}
"""


def emulated_source() -> str:
    """steer_norm.cu made host C++: dynamic shared memory and <<<>>> launches rewritten."""
    src = KERNEL_SOURCE.read_text().replace('#include "../common/', '#include "common/')
    src, n_extern = re.subn(r"extern __shared__ (\w+) (\w+)\[\];",
                            r"\1* \2 = static_cast<\1*>(emu::dynamic_smem());", src)
    src, n_launch = re.subn(
        r"(\w+<[^;<>]*>)\s*<<<([^,]+),([^,]+),([^,]+),([^>]+)>>>\(([^;]*)\);",
        r"emu::launch(__PRETTY_FUNCTION__, reinterpret_cast<const void*>(&\1), \2, \3, \4, "
        r"[&] { \1(\6); });", src)
    assert n_extern >= 1 and n_launch >= 2, "steer_norm.cu changed shape: update emulated_source"
    return src + EMU_EXPORTS


class EmulatedModule:
    """fasteer._cuda's steer_norm / limits, backed by the emulated kernel."""

    def __init__(self, lib):
        self.lib = lib
        i64, i32, p = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        lib.emu_steer_norm.argtypes = [p, p, i64, i64, i64, i64, i32, p, p, p, p, p, i64, i64,
                                       i64, p, p, i32, ctypes.c_double, ctypes.c_double,
                                       ctypes.c_bool, p, i64, ctypes.c_size_t]
        lib.emu_steer_norm.restype = ctypes.c_int
        lib.emu_last_kernel.restype = ctypes.c_char_p
        lib.emu_limit.restype = ctypes.c_int64

    def steer_norm(self, *args):
        err = self.lib.emu_steer_norm(*args)
        if err:
            raise RuntimeError(f"steer_norm launch failed: emulated error {err}")

    def limits(self):
        return {"max_register_row": self.lib.emu_limit(0), "max_loop_edits": self.lib.emu_limit(1)}

    def last_kernel(self) -> str:
        return self.lib.emu_last_kernel().decode()


def compile_emulated(source: str, tmp: Path) -> ctypes.CDLL:
    """Build `source` (from emulated_source) against the emulation header; load it."""
    (tmp / "shim").mkdir(exist_ok=True)
    (tmp / "shim" / "cuda_runtime.h").write_text("#pragma once\n")
    (tmp / "emu_cuda.h").write_text(EMU_HEADER)
    (tmp / "steer_norm_emu.cpp").write_text(source)
    lib = tmp / "libsteer_norm_emu.so"
    # __CUDACC__ / __CUDA_ARCH__: csrc/common takes its device code paths (as under nvcc);
    # -ffp-contract=off: no FMA contraction, like the device code's __fmul_rn / __fadd_rn
    cmd = [CXX, "-O1", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared", "-D__CUDACC__",
           "-D__CUDA_ARCH__=900", "-include", str(tmp / "emu_cuda.h"), f"-I{tmp / 'shim'}",
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'cuda'}", str(tmp / "steer_norm_emu.cpp"),
           "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def emulated_lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    return compile_emulated(emulated_source(), tmp_path_factory.mktemp("emu"))


def use_module(monkeypatch, mod) -> None:
    """Route the cuda wrapper to `mod` (stream 0, device 0)."""
    monkeypatch.setattr(dispatch, "cuda_module", lambda: mod)
    monkeypatch.setattr(wrapper, "_raw_stream", lambda index: 0)
    monkeypatch.setattr(wrapper, "_current_device", lambda: 0)
    wrapper._limits.cache_clear()


@pytest.fixture
def emulated(emulated_lib, monkeypatch):
    mod = EmulatedModule(emulated_lib)
    use_module(monkeypatch, mod)
    yield mod
    wrapper._limits.cache_clear()




def strided_rows(values: torch.Tensor, offset: int, pad: int) -> torch.Tensor:
    """A copy of [n, d] `values` whose first element sits `offset` elements into its
    storage and whose rows are d + pad apart (offset 1: no 16-byte access possible)."""
    n, d = values.shape
    store = torch.empty(offset + n * (d + pad), dtype=values.dtype)
    view = store[offset:].view(n, d + pad)[:, :d]
    view.copy_(values)
    return view


def make_case(seed, n, d, dtype, norm, n_slots=3, n_edits=3, kinds=None, with_conditions=True):
    return random_case(seed, n, d, n_slots, n_edits, dtype, norm, kinds, with_conditions,
                       edit_first_row=True)


def run_emulated(case, offset=0, pad=0):
    h = strided_rows(case["h"], offset, pad)
    out = None
    if case["norm_kind"] != L.NORM_NONE:
        out = strided_rows(torch.full_like(case["h"], float("nan")), offset, pad)  # poisoned
    wrapper.steer_norm_cuda(h, out, case["slot"], case["gate"], case["meta"], case["params"],
                            case["bank"], case["weight"], case["bias"], case["norm_kind"],
                            case["eps"], case["weight_offset"], case["cast_before_weight"])
    return h, out


def check_case(case, h_new, out):
    """Untouched rows bitwise; edited rows and the norm vs reference and float64."""
    keys = ("slot", "gate", "meta", "params", "bank", "weight", "bias", "norm_kind", "eps",
            "weight_offset", "cast_before_weight")
    args = [case[k] for k in keys]
    h_ref, out_ref = reference(case["h"], *args)
    h64, out64, margins = oracle(case["h"], *args)
    n = case["h"].shape[0]
    inactive = (case["gate"] == 0) | (case["slot"] < 0) | (case["slot"] >= case["meta"].shape[0])
    if case["meta"].shape[1] == 0:
        inactive[:] = True
    assert torch.equal(h_new[inactive], case["h"][inactive]), "untouched rows must not change"
    rows = [r for r, m in enumerate(margins) if m > 1e-3]
    assert len(rows) >= max(1, n // 2), "too few rows away from a threshold: change the seed"
    dtype = case["h"].dtype
    scale = [float(case["h"][r].double().abs().max() + h64[r].abs().max()) for r in range(n)]
    assert_rows_close(h_new, h_ref, dtype, rows, "edited h vs reference", scale)
    assert_rows_close(h_new, h64, dtype, rows, "edited h vs float64", scale)
    if out is not None:
        assert not torch.isnan(out).any(), "out: some elements were not written"
        assert_rows_close(out, out_ref, dtype, rows, "norm output vs reference")
        assert_rows_close(out, out64, dtype, rows, "norm output vs float64")


# (n, d, norm, offset, pad, expected launch): odd D, misaligned views, padded strides;
# every kernel shape (warp / block rows, aligned / element-wise, loop kernel)
EMU_CASES = [
    (5, 1, "rms_plain", 0, 0, "WARP_ROWS = true"),
    (9, 7, "layer", 1, 0, "ALIGNED = false; bool WARP_ROWS = true"),
    (6, 33, "none", 0, 3, "WARP_ROWS = true"),
    (9, 64, "rms_llama", 0, 0, "ALIGNED = true; bool WARP_ROWS = true"),
    (5, 256, "rms_gemma", 0, 8, "ALIGNED = true"),
    (4, 300, "layer_plain", 1, 0, "ALIGNED = false"),
    (3, 1000, "rms_olmo2", 0, 0, "ALIGNED = true; bool WARP_ROWS = false"),
    (3, 4099, "rms_llama", 1, 0, "ALIGNED = false; bool WARP_ROWS = false"),
    (2, 4096, "layer", 0, 0, "ALIGNED = true; bool WARP_ROWS = false"),
    (2, 8192, "rms_gemma", 0, 0, "ALIGNED = true; bool WARP_ROWS = false"),
    (2, 8192, "layer", 1, 0, "ALIGNED = false; bool WARP_ROWS = false"),
    (1, 16384, "none", 0, 0, "block=1024"),
    (1, 16400, "rms_llama", 0, 0, "launch_typed"),       # the loop kernel
    (2, 16401, "layer", 1, 0, "launch_typed"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,d,norm,offset,pad,launch", EMU_CASES,
                         ids=[f"{c[0]}x{c[1]}-{c[2]}-off{c[3]}" for c in EMU_CASES])
def test_emulated_kernel_matches_reference_and_float64(emulated, dtype, n, d, norm, offset, pad,
                                                       launch):
    case = make_case(d * 31 + n, n, d, dtype, norm)
    h_new, out = run_emulated(case, offset, pad)
    assert launch in emulated.last_kernel(), emulated.last_kernel()
    check_case(case, h_new, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_emulated_slots_beyond_table_bool_gates_and_empty_tables(emulated, dtype):
    case = make_case(11, 6, 40, dtype, "rms_llama", n_slots=2)
    case["slot"] = torch.tensor([2, 3, 100, -1, 0, 1], dtype=torch.int32)
    case["gate"] = torch.tensor([True, True, True, True, True, False])
    h_new, out = run_emulated(case)
    check_case(case, h_new, out)
    assert not torch.equal(h_new[4], case["h"][4]), "slot 0 row should be edited"
    for n_slots, n_edits in ((0, 3), (2, 0)):
        empty = make_case(12, 5, 40, dtype, "layer", n_slots=n_slots, n_edits=n_edits)
        h_new, out = run_emulated(empty, offset=1)
        check_case(empty, h_new, out)


@pytest.mark.parametrize("d", [40, 20000])
def test_emulated_rows_whose_edits_all_skip_are_not_written(emulated, d):
    """A float16 NaN with a payload changes bits if a row is stored back (conversions make
    NaNs canonical), so it shows whether the kernel wrote the row at all."""
    h, meta, params, bank, slot = skipped_rows_case(d)
    before = h.clone()
    out = torch.full_like(h, float("nan"))
    wrapper.steer_norm_cuda(h, out, slot, torch.ones(3, dtype=torch.uint8), meta, params, bank,
                            None, None, L.NORM_RMS, 1e-5, 0.0, True)
    assert_only_row_1_written(h, before)


def test_emulation_catches_missing_barriers(emulated, emulated_lib):
    """The emulation is strict enough to matter: with __syncthreads turned into a no-op,
    warps that run ahead read partial sums before the other warps wrote them, and the
    same kernel gives wrong results (or a reported divergence at a barrier)."""
    case = make_case(3, 2, 4096, torch.float32, "rms_llama", n_edits=4)
    case["meta"][..., 0] &= ~(0xF << 16)            # no conditions: every edit applies
    case["meta"][..., 3] = -1
    emulated_lib.emu_drop_barriers(1)
    try:
        with pytest.raises((AssertionError, RuntimeError)):
            check_case(case, *run_emulated(case))
    finally:
        emulated_lib.emu_drop_barriers(0)
    check_case(case, *run_emulated(case))            # and with barriers it is right


# --------------------------------------------------------------------------- ptxas

PTXAS_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
# (setup.py's device flags + -Xptxas -v)


def ptxas_command(out_dir: Path) -> list[str]:
    """Compile steer_norm.cu once for the configured archs, as setup.py does, with -v."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in configured_archs()]
    # -fatbin: the device code only (ptxas runs exactly as in the build), no host compile
    return [NVCC, *PTXAS_FLAGS, *gencode, f"-I{ROOT / 'csrc'}", "--threads", "0", "-fatbin",
            str(KERNEL_SOURCE), "-o", str(out_dir / "steer_norm.fatbin")]


def parse_ptxas(log: str) -> list[dict]:
    """One record per compiled kernel: arch, registers, stack, spills, lmem, smem."""
    records, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": m.group(2)}
            records.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            lmem = re.search(r"(\d+) bytes lmem", line)
            current["lmem"] = int(lmem.group(1)) if lmem else 0
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    names = demangle([r["mangled"] for r in records])
    for r, name in zip(records, names):
        r["kernel"] = short_kernel_name(name)
    return records


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return names
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if len(out) == len(names) else names


def short_kernel_name(name: str) -> str:
    """'void fasteer::cuda::(anonymous namespace)::steer_norm_reg_kernel<fasteer::bf16_t, 2,
    true, false>(...)' -> 'steer_norm_reg_kernel<bf16_t, 2, true, false>'."""
    m = re.search(r"(steer_norm_\w+_kernel<[^>]*>)", name)
    return (m.group(1) if m else name).replace("fasteer::", "")


@pytest.fixture(scope="module", autouse=True)
def nvcc_job(tmp_path_factory):
    """Start the ptxas compile (tens of seconds) when the module starts, so that it runs
    while the other tests do; test_ptxas_* (last in the file) collect it."""
    if NVCC is None:
        yield None
        return
    out_dir = tmp_path_factory.mktemp("ptxas")
    log_path = out_dir / "nvcc.log"
    with open(log_path, "w") as log:   # a file, not a pipe: nvcc never blocks on output
        proc = subprocess.Popen(ptxas_command(out_dir), stdout=log, stderr=subprocess.STDOUT)
    yield proc, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def ptxas_records(nvcc_job):
    if nvcc_job is None:
        pytest.skip("no nvcc on this machine")
    proc, log_path = nvcc_job
    proc.wait(timeout=900)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-4000:]
    return parse_ptxas(log)


def test_ptxas_no_spills_no_local_memory(ptxas_records):
    kernels = [r for r in ptxas_records if "steer_norm" in r["kernel"]]
    archs = {f"sm_{a}" for a in configured_archs()}
    assert {r["arch"] for r in kernels} == archs
    # every dtype has register kernels (both alignments, warp and block rows) and a loop kernel
    for arch in archs:
        names = {r["kernel"] for r in kernels if r["arch"] == arch}
        for dtype in ("float", "bf16_t", "f16_t"):
            assert f"steer_norm_loop_kernel<{dtype}>" in names, (arch, dtype, names)
            for aligned in ("true", "false"):
                for warp_rows in ("true", "false"):
                    assert any(n.startswith(f"steer_norm_reg_kernel<{dtype}, ")
                               and n.endswith(f", {aligned}, {warp_rows}>") for n in names), \
                        (arch, dtype, aligned, warp_rows, names)
    for r in kernels:
        assert {"stack", "registers"} <= r.keys(), r
        what = f"{r['kernel']} on {r['arch']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{what} spills: {r}"
        assert r["stack"] == 0, f"{what} uses a stack frame: {r}"
        assert r["lmem"] == 0, f"{what} uses local memory: {r}"
        # 1024-thread blocks need <= 64 registers per thread (64K registers per SM)
        assert r["registers"] <= 64, f"{what}: {r['registers']} registers"



if __name__ == "__main__":
    # the ptxas table of docs/build_notes.md
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(ptxas_command(Path(tmp)), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    records = parse_ptxas(res.stdout + res.stderr)
    print("| kernel | arch | registers | stack | spill st/ld | lmem | smem |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(records, key=lambda r: (r["kernel"], r["arch"])):
        if "steer_norm" not in r["kernel"]:
            continue
        print(f"| `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['stack']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['lmem']} | {r['smem']} |")
