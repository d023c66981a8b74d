"""EleutherAI sparsify format: ``{hookpoint}/cfg.json`` + ``{hookpoint}/sae.safetensors``.

What was checked against sparsify's code (EleutherAI/sparsify: ``sparsify/sparse_coder.py``
``SparseCoder.__init__/load_from_disk/save_to_disk/encode/decode``, ``sparsify/config.py``
``SparseCoderConfig``, ``sparsify/fused_encoder.py``, ``sparsify/__main__.py``):

* ``save_to_disk`` writes the module's state dict with ``safetensors.torch.save_model``:
  ``encoder.weight [F, D]`` (an ``nn.Linear(d_in, num_latents)``, i.e. ``W_enc`` transposed),
  ``encoder.bias [F]``, ``W_dec [F, D]``, ``b_dec [D]`` (+ ``W_skip [D, D]`` with a skip
  connection), and ``cfg.json`` = the config fields + ``d_in``.  ``load_from_disk`` pops ``d_in``,
  ignores unknown fields (``drop_extra_fields=True``) and builds the module in the dtype of the
  file's first tensor.
* Config fields and defaults: ``activation="topk"`` (or ``"groupmax"``), ``expansion_factor=32``,
  ``normalize_decoder=True`` (training only), ``num_latents=0`` (0 -> ``d_in *
  expansion_factor``), ``k=32``, ``multi_topk=False`` (training loss only),
  ``skip_connection=False``, ``transcode=False``.
* Math (autoencoder, ``transcode=False``)::

      x    = h - b_dec                                  # always, no flag
      pre  = relu(x @ encoder.weight.T + encoder.bias)  # F.relu(F.linear(...))
      top  = topk(pre, k)                               # values, indices
      out  = sum_i top.values_i * W_dec[top.indices_i] + b_dec

  fasteer keeps it as ``W_enc = encoder.weight.T``, ``apply_b_dec_to_input=True``, TopK.
  (SAELens' sparsify loader sets ``apply_b_dec_to_input = not normalize_decoder``; sparsify's own
  ``encode`` subtracts ``b_dec`` regardless, which is what is followed here.)
* Hookpoints are module names of the base model (``layers.6``, ``h.6``, ``layers.6.mlp``); the
  hook reads the module output, so ``layers.{l}`` is ``resid_post[l]``.  The training run's
  ``config.json`` one folder up names the model (``"model"``).

Refused with a clear error: transcoders (``transcode=true``: input and output are different
points), skip connections (``W_skip`` adds a dense ``x @ W_skip.T`` term), ``groupmax``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..sae import SAE
from ..._files import FileFormatError
from ._io import build_sae, read_json, read_safetensors
from .hooks import parse_hook_name

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
_DEFAULTS = {
    "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": 0,
    "k": 32, "multi_topk": False, "skip_connection": False, "transcode": False,
}
_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def _int(cfg_path: Path, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FileFormatError(cfg_path, None, f"{name} must be an integer, got {value!r}")
    return value


def load_sparsify(
    directory: Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    source: str | None = None,
) -> SAE:
    """Read one sparsify hookpoint folder."""
    cfg_path = directory / CFG_FILENAME
    weights_path = directory / WEIGHTS_FILENAME
    raw_cfg = read_json(cfg_path)
    cfg = {**_DEFAULTS, **{key: raw_cfg[key] for key in _DEFAULTS if key in raw_cfg}}

    if "d_in" not in raw_cfg:
        raise FileFormatError(cfg_path, None, f"missing required key 'd_in'")
    d_in = _int(cfg_path, "d_in", raw_cfg["d_in"])
    if cfg["transcode"]:
        raise FileFormatError(cfg_path, None, f"transcode=true: a transcoder, not an autoencoder; not supported")
    if cfg["skip_connection"]:
        raise FileFormatError(cfg_path, None, f"skip_connection=true (a dense W_skip term) is not supported")
    if cfg["activation"] != "topk":
        raise FileFormatError(cfg_path, None, f"activation {cfg['activation']!r} is not supported; expected 'topk'")
    if raw_cfg.get("signed"):
        raise FileFormatError(cfg_path, None, f"signed=true (TopK on |pre|) is not supported")
    k = _int(cfg_path, "k", cfg["k"])
    num_latents = _int(cfg_path, "num_latents", cfg["num_latents"])
    d_sae = num_latents or d_in * _int(cfg_path, "expansion_factor", cfg["expansion_factor"])

    tensors = read_safetensors(weights_path)
    missing = [name for name in _TENSORS if name not in tensors]
    if missing:
        raise FileFormatError(weights_path, None, f"missing tensors {missing} (found {sorted(tensors)})")
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise FileFormatError(weights_path, None, f"unexpected tensors {unknown}; expected {list(_TENSORS)}")
    enc_w = tensors["encoder.weight"]
    if list(enc_w.shape) != [d_sae, d_in]:
        hint = " (stored transposed?)" if list(enc_w.shape) == [d_in, d_sae] else ""
        raise FileFormatError(
            weights_path, None, f"encoder.weight has shape {list(enc_w.shape)} but {cfg_path.name} gives "
            f"d_in={d_in}, num_latents={d_sae}; expected nn.Linear's [num_latents, d_in] = [{d_sae}, {d_in}]{hint}"
        )
    # sparsify builds the module in the dtype of the file's first tensor.
    file_dtype = next(iter(tensors.values())).dtype

    hookpoint = directory.name
    layer, site = parse_hook_name(hookpoint)
    model_name = None
    run_cfg = directory.parent / "config.json"
    if run_cfg.is_file():
        try:
            model_name = read_json(run_cfg).get("model")
        except ValueError:
            model_name = None  # the run config is informative only
    metadata = {key: cfg[key] for key in ("k", "multi_topk", "normalize_decoder")}
    return build_sae(
        weights_path,
        enc_w.T, tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"],
        activation="topk",
        k=k,
        apply_b_dec_to_input=True,
        normalize_activations="none",
        model_name=model_name if isinstance(model_name, str) else None,
        hook_name=hookpoint,
        layer=layer,
        site=site,
        source_format="sparsify",
        source=source,
        metadata=metadata,
        device=device,
        dtype=dtype or file_dtype,
    )
