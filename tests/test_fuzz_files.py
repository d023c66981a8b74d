"""Fuzz tests for every file format fasteer reads (docs/design.md, "Bad input").

Each input either loads into a valid object or raises `fasteer.FileFormatError` (a
``ValueError``) naming the file.  Every load runs under a SIGALRM watchdog, so a hang fails the
test instead of stalling CI; an unexpected exception type (OverflowError, RecursionError,
MemoryError, ...) fails it too.  The whole file is sized to run in a few seconds.
"""
from __future__ import annotations

import io
import json
import signal
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fasteer import SAE, FileFormatError, SteeringVector

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WATCHDOG_S = 5.0


class Hung(BaseException):
    """Raised by the watchdog; a BaseException so no loader's ``except Exception`` eats it."""


@contextmanager
def watchdog(seconds: float = WATCHDOG_S):
    def fire(signum, frame):
        raise Hung(f"load did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_or_format_error(load, path):
    """Run ``load()`` under the watchdog: the object, or None after a FileFormatError naming
    ``path``.  Any other exception propagates and fails the test."""
    with watchdog():
        try:
            return load()
        except FileFormatError as exc:
            assert isinstance(exc, ValueError)
            assert Path(path).name in str(exc), str(exc)
            return None


def check_vector(vec):
    if vec is not None:
        assert isinstance(vec, SteeringVector) and len(vec) >= 1
        for layer, t in vec.items():
            assert torch.isfinite(t).all() and t.dim() == 1 and t.numel() == vec.hidden_size


def check_sae(sae):
    if sae is not None:
        assert isinstance(sae, SAE)
        for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            assert torch.isfinite(t).all()


# ------------------------------------------------------------------ mutations
mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "dup"]), st.integers(0, 1 << 16),
              st.integers(0, 255)),
    min_size=1, max_size=4,
)


def mutate(raw: bytes, ops) -> bytes:
    b = bytearray(raw)
    for op, pos, val in ops:
        if not b:
            break
        i = pos % len(b)
        if op == "flip":
            b[i] ^= 1 << (val % 8)
        elif op == "set":
            b[i] = val
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = bytes([val]) * (1 + val % 9)
        else:  # overwrite 8 bytes with a huge little-endian count
            b[i:i + 8] = struct.pack("<Q", (1 << 62) + val)
    return bytes(b)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def vectors(draw):
    d = draw(st.integers(1, 6))
    layers = draw(st.lists(st.integers(0, 40), min_size=1, max_size=4, unique=True))
    dirs = {layer: np.array(draw(st.lists(finite, min_size=d, max_size=d)), np.float32) for layer in layers}
    return SteeringVector(dirs, metadata={"model_name": "m", "method": draw(st.sampled_from(["mean", "pca"]))})


# ------------------------------------------------------------------ safetensors vectors
@FUZZ
@given(vec=vectors(), ops=mutations)
def test_fuzz_safetensors_vector(tmp_path, vec, ops):
    path = tmp_path / "v.safetensors"
    vec.save(path)
    loaded = load_or_format_error(lambda: SteeringVector.load(path), path)
    assert loaded is not None and loaded.allclose(vec, rtol=0, atol=0)  # the clean file round-trips
    path.write_bytes(mutate(path.read_bytes(), ops))
    check_vector(load_or_format_error(lambda: SteeringVector.load(path), path))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.text(max_size=8),
                      st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                             st.dictionaries(st.text(max_size=5), kids, max_size=3)),
                           max_leaves=8)


@FUZZ
@given(
    entries=st.dictionaries(
        st.sampled_from(["1", "layer.1", "01", "layer.01", "2", "layer.٣", "x", "__metadata__"]),
        st.fixed_dictionaries({
            "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "F8_E4M3", "I32", "BOOL", "Q4", 7]),
            "shape": st.one_of(st.lists(st.integers(-1, 1 << 40), max_size=3), json_values),
            "data_offsets": st.one_of(st.lists(st.integers(-8, 1 << 62), min_size=2, max_size=2), json_values),
        }),
        max_size=3,
    ),
    payload=st.binary(max_size=64),
)
def test_fuzz_safetensors_header(tmp_path, entries, payload):
    """Hand-made headers: bad dtypes, shapes and offsets (overlapping, past the end, huge)."""
    header = json.dumps(entries).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)
    check_vector(load_or_format_error(lambda: SteeringVector.load(path), path))


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["hidden_size", "layers", "created", "extra"]), json_values, max_size=3),
       raw=st.sampled_from(["1e400", "Infinity", "-Infinity", "NaN", "[" * 5000 + "]" * 5000, "{", '"x"', "3"]))
def test_fuzz_safetensors_metadata(tmp_path, meta, raw):
    path = tmp_path / "m.safetensors"
    header = {f"meta.{k}": json.dumps(v) for k, v in meta.items()}
    header["meta.hidden_size" if "hidden_size" not in meta else "meta.extra2"] = raw
    save_file({"layer.1": torch.ones(3)}, str(path), metadata=header)
    check_vector(load_or_format_error(lambda: SteeringVector.load(path), path))


# ------------------------------------------------------------------ GGUF control vectors
def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def gguf_file(kvs: list[bytes], infos: list[bytes], data: bytes = b"", n_kv=None, n_tensors=None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


def kv_str(key: str, value: bytes) -> bytes:
    return gguf_string(key.encode()) + struct.pack("<I", 8) + gguf_string(value)


ARCH_KV = kv_str("general.architecture", b"controlvector")


def tensor_info(name: str, dims, ttype=0, offset=0) -> bytes:
    return gguf_string(name.encode()) + struct.pack("<I", len(dims)) + b"".join(
        struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, offset)


@FUZZ
@given(vec=vectors(), ops=mutations)
def test_fuzz_gguf_bytes(tmp_path, vec, ops):
    path = tmp_path / "v.gguf"
    vec.save(path, allow_layer_zero=True)
    loaded = load_or_format_error(lambda: SteeringVector.load(path), path)
    assert loaded is not None and loaded.allclose(vec, rtol=0, atol=0)
    path.write_bytes(mutate(path.read_bytes(), ops))
    check_vector(load_or_format_error(lambda: SteeringVector.load(path), path))


@FUZZ
@given(
    n_kv=st.one_of(st.none(), st.integers(0, 1 << 64 - 1)),
    n_tensors=st.one_of(st.none(), st.integers(0, 1 << 64 - 1)),
    count=st.integers(0, (1 << 64) - 1),
    etype=st.integers(0, 13),
    names=st.lists(st.sampled_from(["direction.1", "direction.01", "direction.٣", "direction.2", "w"]),
                   min_size=1, max_size=3),
    dims=st.lists(st.integers(0, (1 << 64) - 1) | st.integers(1, 8), min_size=1, max_size=2),
    ttype=st.sampled_from([0, 1, 2, 30, 1 << 31]),
    offsets=st.lists(st.integers(0, 96) | st.integers(0, (1 << 64) - 1), min_size=3, max_size=3),
    hint=st.sampled_from([b"llama", b"\xff\xfe", b""]),
)
def test_fuzz_gguf_structure(tmp_path, n_kv, n_tensors, count, etype, names, dims, ttype, offsets, hint):
    """Declared counts, lengths, dims and offsets far beyond the file (the 2^62-element array)."""
    arr = gguf_string(b"big") + struct.pack("<IIQ", 9, etype, count)
    kvs = [ARCH_KV, kv_str("controlvector.model_hint", hint), arr]
    infos = [tensor_info(n, dims, ttype, off) for n, off in zip(names, offsets)]
    path = tmp_path / "s.gguf"
    path.write_bytes(gguf_file(kvs, infos, bytes(128), n_kv, n_tensors))
    check_vector(load_or_format_error(lambda: SteeringVector.load(path), path))


# ------------------------------------------------------------------ SAEs
D, F = 4, 6


def small_sae(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return SAE(torch.randn(D, F, generator=g), torch.randn(F, generator=g), torch.randn(F, D, generator=g),
               torch.randn(D, generator=g), hook_name="blocks.1.hook_resid_post", model_name="m", **kw)


def saelens_folder(root: Path) -> Path:
    folder = root / "saelens"
    if not (folder / "cfg.json").exists():
        small_sae().save(folder)
    return folder


cfg_keys = st.sampled_from(["d_in", "d_sae", "dtype", "architecture", "activation_fn_str", "activation_fn_kwargs",
                            "hook_name", "hook_layer", "model_name", "apply_b_dec_to_input", "normalize_activations",
                            "metadata", "fasteer", "k", "finetuning_scaling_factor", "hook_head_index"])


@FUZZ
@given(edits=st.dictionaries(cfg_keys, json_values, min_size=1, max_size=3), deep=st.booleans())
def test_fuzz_saelens_cfg(tmp_path, edits, deep):
    folder = saelens_folder(tmp_path)
    cfg_path = folder / "cfg.json"
    original = cfg_path.read_text()
    cfg = json.loads(original)
    cfg.update(edits)
    text = json.dumps(cfg)
    if deep:
        text = text[:-1] + ', "nested": ' + "[" * 100_000 + "]" * 100_000 + "}"
    cfg_path.write_text(text)
    try:
        check_sae(load_or_format_error(lambda: SAE.load(folder), cfg_path))
    finally:
        cfg_path.write_text(original)


def load_sae_with_mutated_file(folder: Path, file: Path, ops) -> None:
    """Mutate ``file`` of the SAE in ``folder``, load it (a clean SAE or a FileFormatError),
    then restore the file for the next example."""
    original = file.read_bytes()
    file.write_bytes(mutate(original, ops))
    try:
        check_sae(load_or_format_error(lambda: SAE.load(folder), file))
    finally:
        file.write_bytes(original)


@FUZZ
@given(ops=mutations, which=st.sampled_from(["saelens", "sparsify"]))
def test_fuzz_sae_safetensors_bytes(tmp_path, ops, which):
    if which == "saelens":
        folder = saelens_folder(tmp_path)
        weights = folder / "sae_weights.safetensors"
    else:
        folder = sparsify_folder(tmp_path)
        weights = folder / "sae.safetensors"
    load_sae_with_mutated_file(folder, weights, ops)


def sparsify_folder(root: Path) -> Path:
    folder = root / "run" / "layers.3"
    if not folder.exists():
        folder.mkdir(parents=True)
        sae = small_sae()
        save_file({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc,
                   "W_dec": sae.W_dec, "b_dec": sae.b_dec}, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"d_in": D, "num_latents": F, "k": 2}))
    return folder


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(["d_in", "num_latents", "k", "expansion_factor", "activation",
                                              "transcode", "skip_connection", "signed"]),
                             json_values, min_size=1, max_size=3))
def test_fuzz_sparsify_cfg(tmp_path, edits):
    folder = sparsify_folder(tmp_path)
    cfg_path = folder / "cfg.json"
    cfg_path.write_text(json.dumps({"d_in": D, "num_latents": F, "k": 2, **edits}))
    check_sae(load_or_format_error(lambda: SAE.load(folder), cfg_path))


def gemma_folder(root: Path) -> Path:
    folder = root / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_7"
    if not folder.exists():
        folder.mkdir(parents=True)
        sae = small_sae()
        np.savez(folder / "params.npz", W_enc=sae.W_enc.numpy(), W_dec=sae.W_dec.numpy(), b_enc=sae.b_enc.numpy(),
                 b_dec=sae.b_dec.numpy(), threshold=np.zeros(F, np.float32))
    return folder


@FUZZ
@given(ops=mutations, compressed=st.booleans())
def test_fuzz_gemma_scope_bytes(tmp_path, ops, compressed):
    folder = gemma_folder(tmp_path / ("z" if compressed else "s"))
    params = folder / "params.npz"
    if compressed and not (folder / "z").exists():
        with np.load(params) as a:
            arrays = {k: a[k] for k in a.files}
        np.savez_compressed(params, **arrays)
        (folder / "z").mkdir()
    load_sae_with_mutated_file(folder, params, ops)


npy_headers = st.one_of(
    st.builds(lambda d, f, s: np.lib.format.magic(1, 0) + _npy_dict(d, f, s),
              st.sampled_from(["<f4", ">f8", "<f2", "|O", "<i4", "<c8", "<f16", "V4", "zz"]),
              st.booleans(), st.lists(st.integers(-2, 1 << 42), max_size=3)),
    st.builds(lambda t: np.lib.format.magic(1, 0) + struct.pack("<H", len(t)) + t,
              st.sampled_from([b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,", b"{(((", b"{'descr'",
                               b"x" * 20, "{'descr': '<f4', 'fortran_order': False, 'shape': (٣,), }".encode()])),
    st.binary(max_size=40),
)


def _npy_dict(descr, fortran, shape) -> bytes:
    text = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return struct.pack("<H", len(text)) + text


@FUZZ
@given(header=npy_headers, body=st.binary(max_size=48),
       name=st.sampled_from(["W_enc.npy", "w_enc.npy", "threshold.npy", "x.txt"]))
def test_fuzz_npz_headers(tmp_path, header, body, name):
    """Hand-made .npy members: TiB shapes, object dtypes, malformed header text."""
    folder = gemma_folder(tmp_path)
    params = folder / "params.npz"
    original = params.read_bytes()
    buf = io.BytesIO(original)
    with zipfile.ZipFile(buf, "a") as z:
        z.writestr(name, header + body)
    params.write_bytes(buf.getvalue())
    try:
        check_sae(load_or_format_error(lambda: SAE.load(folder), params))
    finally:
        params.write_bytes(original)


# ------------------------------------------------------------------ named regressions
def test_gguf_array_of_2_pow_62_elements_is_refused_at_once(tmp_path):
    path = tmp_path / "hang.gguf"
    arr = gguf_string(b"general.big") + struct.pack("<IIQ", 9, 8, 1 << 62)
    path.write_bytes(gguf_file([ARCH_KV, arr], []).ljust(128, b"\0"))
    assert path.stat().st_size == 128
    with watchdog(1.0), pytest.raises(FileFormatError, match="general.big.*elements"):
        SteeringVector.load(path)


def test_gguf_names_that_would_collide_are_refused(tmp_path):
    for names in (["direction.1", "direction.01"], ["direction.٣"]):
        path = tmp_path / "c.gguf"
        infos = [tensor_info(n, [4], 0, 32 * i) for i, n in enumerate(names)]
        path.write_bytes(gguf_file([ARCH_KV], infos, bytes(64)))
        with pytest.raises(FileFormatError, match="direction"):
            SteeringVector.load(path)


def test_gguf_overlapping_and_out_of_file_tensor_data_is_refused(tmp_path):
    path = tmp_path / "o.gguf"
    path.write_bytes(gguf_file([ARCH_KV], [tensor_info("direction.1", [8], 0, 0),
                                           tensor_info("direction.2", [8], 0, 0)], bytes(64)))
    with pytest.raises(FileFormatError, match="overlaps"):
        SteeringVector.load(path)
    path.write_bytes(gguf_file([ARCH_KV], [tensor_info("direction.1", [8], 0, 1 << 40)], bytes(64)))
    with pytest.raises(FileFormatError, match="past the end"):
        SteeringVector.load(path)


def test_gguf_non_string_model_hint_and_bad_metadata(tmp_path):
    path = tmp_path / "h.gguf"
    info = [tensor_info("direction.1", [2], 0, 0)]
    hint = gguf_string(b"controlvector.model_hint") + struct.pack("<II", 4, 7)
    path.write_bytes(gguf_file([ARCH_KV, hint], info, bytes(8)))
    with pytest.raises(FileFormatError, match="model_hint"):
        SteeringVector.load(path, expected_model="llama")
    for meta in (b'{"hidden_size": 1e400}', b'{"hidden_size": Infinity}', b"[" * 100_000 + b"]" * 100_000):
        path.write_bytes(gguf_file([ARCH_KV, kv_str("fasteer.metadata", meta)], info, bytes(8)))
        with pytest.raises(FileFormatError, match="fasteer.metadata"):
            SteeringVector.load(path)


def test_safetensors_layer_names_that_would_collide_are_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    for tensors in ({"1": torch.ones(2), "01": torch.ones(2)}, {"layer.٣": torch.ones(2)}):
        save_file(tensors, str(path))
        with pytest.raises(FileFormatError, match="tensor"):
            SteeringVector.load(path)


def test_float16_overflow_and_float8_tensors_are_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    SteeringVector({1: torch.tensor([1e6, 1.0])}).save(path)
    with pytest.raises(ValueError, match="float16"):
        SteeringVector.load(path, dtype=torch.float16)
    save_file({"layer.1": torch.ones(4).to(torch.float8_e4m3fn)}, str(path))
    with pytest.raises(FileFormatError, match="F8_E4M3"):
        SteeringVector.load(path)


def test_gemma_scope_W_enc_and_w_enc_both_present_is_refused(tmp_path):
    folder = gemma_folder(tmp_path)
    with np.load(folder / "params.npz") as a:
        arrays = {k: a[k] for k in a.files}
    np.savez(folder / "params.npz", w_enc=arrays["W_enc"] * 2, **arrays)
    with pytest.raises(FileFormatError, match="w_enc"):
        SAE.load(folder)


def test_npz_header_declaring_a_tib_is_refused_without_allocating(tmp_path):
    folder = gemma_folder(tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("W_enc.npy", np.lib.format.magic(1, 0) + _npy_dict("<f4", False, [1 << 40]) + bytes(16))
    (folder / "params.npz").write_bytes(buf.getvalue())
    with watchdog(1.0), pytest.raises(FileFormatError, match="W_enc"):
        SAE.load(folder)


def test_saelens_cfg_bad_types_and_values(tmp_path):
    folder = saelens_folder(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["dataset_trust_remote_code"] is False
    for key, value in (("hook_name", 5), ("hook_name", ["blocks.1"]), ("model_name", {"a": 1}),
                       ("architecture", [1]), ("d_in", 1e300)):
        (folder / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(FileFormatError, match=key):
            SAE.load(folder)
    (folder / "cfg.json").write_text(json.dumps(cfg)[:-1] + ', "d_sae": 1e400}')
    with pytest.raises(FileFormatError, match="cfg.json"):
        SAE.load(folder)


def test_hub_subfolder_with_dot_dot_is_refused():
    from fasteer.sae.formats.hub import download

    for sub in ("../x", "a/../../b", "a//b", "./a"):
        with pytest.raises(ValueError, match="subfolder"):
            download("owner/name", sub)
