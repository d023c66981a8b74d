"""SAELens format: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``activation_scaler.json``).

What was checked against SAELens' code (jbloomAus/SAELens and decoderesearch/SAELens:
``sae_lens/saes/{sae,standard_sae,jumprelu_sae,topk_sae,gated_sae}.py``,
``sae_lens/loading/pretrained_sae_loaders.py``, ``sae_lens/sae.py`` of v3-v5,
``sae_lens/constants.py``, ``sae_lens/training/activation_scaler.py``):

* Tensors: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
  ``threshold [d_sae]`` (JumpReLU; older training checkpoints store ``log_threshold`` and SAELens
  exponentiates it), gated SAEs ``b_gate``, ``b_mag``, ``r_mag`` instead of ``b_enc``; v3-v5 files
  may carry ``scaling_factor``/``finetuning_scaling_factor [d_sae]`` multiplying z before ``W_dec``.
* cfg, two layouts.  v6 (``metadata.sae_lens_version`` >= 6): top level ``d_in, d_sae, dtype,
  device, apply_b_dec_to_input, normalize_activations, reshape_activations, architecture``
  (+ ``k``, ``rescale_acts_by_decoder_norm`` for topk) and ``metadata {model_name, hook_name,
  hook_head_index, ...}``.  Before v6: flat ``architecture`` (standard/gated/jumprelu),
  ``activation_fn_str`` (or ``activation_fn``; relu/tanh-relu/topk) + ``activation_fn_kwargs
  {k}``, ``hook_name`` (or ``hook_point``), ``hook_layer`` (or ``hook_point_layer``),
  ``model_name``, ``finetuning_scaling_factor``, ``normalize_activations`` (bool in the oldest).
  SAELens converts pre-6 files with ``handle_pre_6_0_config`` (topk activation -> topk
  architecture, ``apply_b_dec_to_input`` defaults to True); the same rules are applied here.
* Math: ``process_sae_in`` = cast, ``run_time_activation_norm_fn_in``, ``- b_dec *
  apply_b_dec_to_input``; ``hidden_pre = sae_in @ W_enc + b_enc``; standard ReLU, JumpReLU
  ``relu(pre) * (pre > relu(threshold))``, TopK ``topk(pre)`` then ReLU (with
  ``rescale_acts_by_decoder_norm``: ``pre * |W_dec[k]|`` before topk and ``z / |W_dec[k]|``
  before ``W_dec``); decode ``z @ W_dec + b_dec`` then the norm's out-function.
* ``expected_average_only_in`` has no run-time effect in SAELens' inference classes: the
  trainer multiplies inputs by ``s = sqrt(d_in) / E|x|`` and, at the end, folds ``s`` into the
  weights and writes "none"; released files that still say ``expected_average_only_in`` need
  ``s`` from SAELens' ``pretrained_saes.yaml`` (``norm_scaling_factor``).  fasteer therefore
  asks for ``s`` (argument ``norm_scaling_factor``, or the ``activation_scaler.json`` SAELens'
  trainer writes next to checkpoints) and raises otherwise, instead of silently ignoring it.

Exact reparameterizations done on load (equal in real arithmetic; differences are rounding):
``rescale_acts_by_decoder_norm`` (``W_enc, b_enc *= n``, ``W_dec /= n``, ``n = |W_dec[k]|``,
SAELens' own ``_fold_norm_topk``), ``finetuning_scaling_factor`` (``W_dec *= f[:, None]``), and
gated SAEs, which are JumpReLU SAEs in disguise::

    gate: x.W[:,k] + b_gate_k > 0,   z_k = [gate] * relu(e^{r_k} x.W[:,k] + b_mag_k)
      <=> JumpReLU with W_enc' = W * e^r, b_enc' = b_mag, threshold' = b_mag - e^r * b_gate

(the gate flips only for inputs within rounding of its boundary).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..sae import SAE
from ..._files import FileFormatError
from ._io import build_sae, dtype_from_str, dtype_to_str, read_json, read_safetensors, write_json, write_safetensors
from .hooks import parse_hook_name

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"

_KNOWN_TENSORS = {
    "W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold",
    "scaling_factor", "finetuning_scaling_factor", "b_gate", "b_mag", "r_mag",
}
_NOT_SAES = {
    "transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder", "clt",
    "temporal", "crosscoder",
}


def _version_tuple(version: Any) -> tuple[int, ...] | None:
    if not isinstance(version, str):
        return None
    m = re.match(r"^\s*v?(\d+)(?:\.(\d+))?", version)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """First present key among ``keys``, at the top level or under ``metadata`` (v6)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
        if key in meta and meta[key] is not None:
            return meta[key]
    return default


def _int_field(cfg_path: Path, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FileFormatError(cfg_path, None, f"{name} must be an integer, got {value!r}")
    return value


def _architecture(cfg: dict[str, Any], cfg_path: Path) -> tuple[str, int | None]:
    """(fasteer activation or 'gated', k) from either cfg layout."""
    arch = cfg.get("architecture") or "standard"
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn")) or "relu"
    for name, value in (("architecture", arch), ("activation_fn_str", act_fn)):
        if not isinstance(value, str):
            raise FileFormatError(cfg_path, name, f"expected a string, got {value!r}")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise FileFormatError(cfg_path, None, f"activation_fn_kwargs must be an object, got {kwargs!r}")
    if arch in _NOT_SAES:
        raise FileFormatError(
            cfg_path, None, f"architecture {arch!r} is not a sparse autoencoder of one residual site "
            "(transcoders, crosscoders and temporal SAEs are not supported)"
        )
    if arch == "standard" and act_fn == "topk":  # pre-6 TopK (handle_pre_6_0_config)
        arch = "topk"
    if arch == "topk":
        k = cfg.get("k", kwargs.get("k"))
        if k is None:
            raise FileFormatError(cfg_path, None, f"a topk SAE needs k (cfg key 'k' or activation_fn_kwargs.k)")
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        k = _int_field(cfg_path, "k", k)
        if kwargs.get("signed"):
            raise FileFormatError(cfg_path, None, f"signed TopK (activation_fn_kwargs.signed=true) is not supported")
        return "topk", k
    if arch in ("standard", "jumprelu", "gated"):
        # v6 drops activation_fn for these (always ReLU); pre-6 files may say tanh-relu.
        if act_fn not in ("relu",):
            raise FileFormatError(
                cfg_path, None, f"activation function {act_fn!r} is not supported; expected relu "
                f"(or topk), architecture {arch!r}"
            )
        return {"standard": "relu", "jumprelu": "jumprelu", "gated": "gated"}[arch], None
    raise FileFormatError(
        cfg_path, None, f"unknown architecture {arch!r}; supported: standard, jumprelu, topk, gated "
        "(batchtopk SAEs are saved by SAELens as jumprelu for inference)"
    )


def _normalization(cfg: dict[str, Any], directory: Path, cfg_path: Path,
                   norm_scaling_factor: float | None) -> tuple[str, float | None]:
    value = cfg.get("normalize_activations")
    if value is None or value is False or value == "none":
        if norm_scaling_factor is not None:
            raise ValueError(
                f"norm_scaling_factor: {cfg_path} says normalize_activations='none'; "
                "a scale would change the SAE's math"
            )
        return "none", None
    if value is True:  # oldest SAELens: bool
        value = "expected_average_only_in"
    if value != "expected_average_only_in":
        return value, None  # SAE() raises the clear "not supported" error
    if norm_scaling_factor is None:
        scaler = directory / SCALER_FILENAME
        if scaler.is_file():
            norm_scaling_factor = read_json(scaler).get("scaling_factor")
    if norm_scaling_factor is None:
        raise FileFormatError(
            cfg_path, None, f"normalize_activations='expected_average_only_in' but no scale was given: "
            "the SAE expects inputs multiplied by s = sqrt(d_in) / E|x|. Pass norm_scaling_factor=s "
            "(SAELens lists it as norm_scaling_factor in pretrained_saes.yaml) or put "
            f"{SCALER_FILENAME} with {{\"scaling_factor\": s}} next to cfg.json"
        )
    return "expected_average_only_in", norm_scaling_factor


def _take(tensors: dict[str, torch.Tensor], name: str, weights_path: Path) -> torch.Tensor:
    if name not in tensors:
        raise FileFormatError(weights_path, None, f"missing tensor {name!r} (found {sorted(tensors)})")
    return tensors[name]


def _f64(t: torch.Tensor) -> torch.Tensor:
    # Folds are computed in float64 so the only error left is the final rounding; tensors that
    # need no fold are never widened (a 1M-latent SAE would not fit twice in float64).
    return t.to(torch.float64)


def load_saelens(
    directory: Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    norm_scaling_factor: float | None = None,
    source: str | None = None,
) -> SAE:
    """Read an SAELens folder (see the module docstring for every key honoured)."""
    cfg_path = directory / CFG_FILENAME
    weights_path = directory / WEIGHTS_FILENAME
    cfg = read_json(cfg_path)
    tensors = read_safetensors(weights_path)

    unknown = sorted(set(tensors) - _KNOWN_TENSORS)
    if unknown:
        raise FileFormatError(
            weights_path, None, f"unexpected tensors {unknown}; an SAELens SAE holds "
            "W_enc, b_enc, W_dec, b_dec (+ threshold); ignoring them could change the math"
        )
    activation, k = _architecture(cfg, cfg_path)
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise FileFormatError(cfg_path, None, f"missing required key {key!r}")
    d_in = _int_field(cfg_path, "d_in", cfg["d_in"])
    d_sae = _int_field(cfg_path, "d_sae", cfg["d_sae"])

    # SAELens casts every tensor to cfg["dtype"] on load; do the same unless told otherwise.
    file_dtype = tensors["W_enc"].dtype if "W_enc" in tensors else torch.float32
    try:
        target_dtype = dtype or (dtype_from_str(cfg["dtype"], "dtype") if cfg.get("dtype") else file_dtype)
    except ValueError as exc:
        raise FileFormatError(cfg_path, None, str(exc)) from None

    W_enc = _take(tensors, "W_enc", weights_path)
    W_dec = _take(tensors, "W_dec", weights_path)
    b_dec = _take(tensors, "b_dec", weights_path)
    if list(W_enc.shape) != [d_in, d_sae]:
        hint = " (stored transposed?)" if list(W_enc.shape) == [d_sae, d_in] else ""
        raise FileFormatError(
            weights_path, None, f"W_enc has shape {list(W_enc.shape)} but {cfg_path.name} says "
            f"d_in={d_in}, d_sae={d_sae}; expected [d_in, d_sae] = [{d_in}, {d_sae}]{hint}"
        )
    if list(W_dec.shape) != [d_sae, d_in]:
        raise FileFormatError(
            weights_path, None, f"W_dec has shape {list(W_dec.shape)}; expected [d_sae, d_in] = [{d_sae}, {d_in}]"
        )

    # Decoder-side scaling of pre-6 fine-tuned SAEs: z * f before W_dec  ->  fold into W_dec rows.
    for name in ("finetuning_scaling_factor", "scaling_factor"):
        if name in tensors:
            factor = _f64(tensors[name])
            if list(factor.shape) != [d_sae]:
                raise FileFormatError(weights_path, None, f"{name} has shape {list(factor.shape)}; expected [{d_sae}]")
            if bool((factor == 1).all()):
                continue  # SAELens drops an all-ones factor
            if name == "scaling_factor" and not cfg.get("finetuning_scaling_factor"):
                raise FileFormatError(  # SAELens' read_sae_components_from_disk refuses this too
                    weights_path, None, f"has a scaling_factor tensor but {cfg_path.name} says "
                    "finetuning_scaling_factor is false"
                )
            W_dec = _f64(W_dec) * factor[:, None]

    threshold = None
    if activation == "gated":
        b_gate = _f64(_take(tensors, "b_gate", weights_path))
        b_mag = _f64(_take(tensors, "b_mag", weights_path))
        r_mag = _f64(_take(tensors, "r_mag", weights_path))
        for name, t in (("b_gate", b_gate), ("b_mag", b_mag), ("r_mag", r_mag)):
            if list(t.shape) != [d_sae]:
                raise FileFormatError(weights_path, None, f"{name} has shape {list(t.shape)}; expected [{d_sae}]")
        scale = torch.exp(r_mag)
        W_enc = _f64(W_enc) * scale
        b_enc = b_mag
        threshold = b_mag - scale * b_gate
        activation = "jumprelu"
    else:
        b_enc = _take(tensors, "b_enc", weights_path)
        if activation == "jumprelu":
            if "threshold" in tensors:
                threshold = tensors["threshold"]
            elif "log_threshold" in tensors:
                threshold = torch.exp(_f64(tensors["log_threshold"]))
            else:
                raise FileFormatError(weights_path, None, f"a jumprelu SAE needs a 'threshold' (or 'log_threshold') tensor")
        elif activation == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
            # pre * |W_dec[k]| before topk, z / |W_dec[k]| before W_dec  ==  folded weights.
            W_dec = _f64(W_dec)
            norms = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = _f64(W_enc) * norms, _f64(b_enc) * norms, W_dec / norms[:, None]

    normalize, scale_s = _normalization(cfg, directory, cfg_path, norm_scaling_factor)

    hook_name = _get(cfg, "hook_name", "hook_point") or None  # fasteer writes "" for unknown
    if hook_name is not None and not isinstance(hook_name, str):
        raise FileFormatError(cfg_path, "hook_name", f"expected a string, got {hook_name!r}")
    model_name = _get(cfg, "model_name") or None
    if model_name is not None and not isinstance(model_name, str):
        raise FileFormatError(cfg_path, "model_name", f"expected a string, got {model_name!r}")
    layer, site = parse_hook_name(hook_name)
    hook_layer = _get(cfg, "hook_layer", "hook_point_layer")
    if isinstance(hook_layer, int) and not isinstance(hook_layer, bool):
        if layer is not None and layer != hook_layer:
            raise FileFormatError(cfg_path, None, f"hook_layer={hook_layer} contradicts hook_name={hook_name!r}")
        layer = hook_layer
    head = _get(cfg, "hook_head_index", "hook_point_head_index")
    if head is not None or cfg.get("reshape_activations") == "hook_z":
        site = None  # one attention head / flattened attention z: not the residual stream

    apply_b_dec = cfg.get("apply_b_dec_to_input", True)  # SAELens' default
    if not isinstance(apply_b_dec, bool):
        raise FileFormatError(cfg_path, None, f"apply_b_dec_to_input must be true or false, got {apply_b_dec!r}")

    # A folder fasteer wrote carries its own record (site, source, metadata): use it verbatim so
    # save -> load is exact; everything else comes from SAELens' keys.
    fasteer_info = cfg.get("fasteer") if isinstance(cfg.get("fasteer"), dict) else None
    if fasteer_info is not None:
        site = fasteer_info.get("site")
        metadata = dict(fasteer_info.get("metadata") or {})
        source_format = fasteer_info.get("source_format") or "saelens"
    else:
        metadata = {}
        for key in ("context_size", "prepend_bos", "dataset_path", "neuronpedia_id", "hook_head_index",
                    "sae_lens_version", "sae_lens_training_version", "model_from_pretrained_kwargs"):
            value = _get(cfg, key)
            if value is not None:
                metadata[key] = value
        source_format = "saelens"

    return build_sae(
        cfg_path,
        W_enc.to(target_dtype), b_enc.to(target_dtype), W_dec.to(target_dtype), b_dec.to(target_dtype),
        activation=activation,
        threshold=threshold.to(target_dtype) if threshold is not None else None,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=normalize,
        norm_scaling_factor=scale_s,
        model_name=model_name,
        hook_name=hook_name,
        layer=layer,
        site=site,
        source_format=source_format,
        source=source,
        metadata=metadata,
        device=device,
        dtype=target_dtype,
    )


def save_saelens(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` as an SAELens folder: ``cfg.json`` + ``sae_weights.safetensors``.

    The cfg uses the flat layout every SAELens version reads (v3-v5 directly, v6 through its
    ``handle_pre_6_0_config``): ``architecture`` standard/jumprelu (TopK is written the pre-6 way,
    ``architecture: standard`` + ``activation_fn_str: topk`` + ``activation_fn_kwargs: {k}``, which
    v6 turns into its topk architecture), ``d_in``, ``d_sae``, ``dtype``, ``device``,
    ``model_name``, ``hook_name``, ``hook_layer``, ``hook_head_index``, ``apply_b_dec_to_input``,
    ``finetuning_scaling_factor: false``, ``normalize_activations`` and the dataset fields.  A
    ``fasteer`` entry (ignored by SAELens) keeps the site, the source format and the metadata.
    ``linear`` SAEs have no SAELens architecture and are refused.  With
    ``expected_average_only_in`` the scale goes to ``activation_scaler.json`` (SAELens' trainer
    convention); note that SAELens' ``load_from_disk`` ignores it -- call
    `SAE.fold_normalization` first if the folder is meant for SAELens.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a fasteer SAE, got {type(sae).__name__}")
    if sae.activation == "linear":
        raise ValueError("sae: a linear SAE has no SAELens architecture; cannot save it in SAELens format")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path: {folder} exists and is not a folder")
    meta = dict(sae.metadata)
    architecture = {"relu": "standard", "jumprelu": "jumprelu", "topk": "standard"}[sae.activation]
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype_to_str(sae.dtype),
        "device": "cpu",
        "model_name": sae.model_name or "",
        "hook_name": sae.hook_name or "",
        "hook_layer": sae.layer,
        "hook_head_index": meta.get("hook_head_index"),
        "activation_fn_str": "topk" if sae.activation == "topk" else "relu",
        "activation_fn_kwargs": {"k": sae.k} if sae.activation == "topk" else {},
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "finetuning_scaling_factor": False,
        "normalize_activations": sae.normalize_activations,
        "context_size": meta.get("context_size"),
        "prepend_bos": meta.get("prepend_bos", True),
        "dataset_path": meta.get("dataset_path", ""),
        "dataset_trust_remote_code": False,  # never ask a reader to run a dataset's code
        "sae_lens_training_version": meta.get("sae_lens_training_version"),
        "neuronpedia_id": meta.get("neuronpedia_id"),
        "model_from_pretrained_kwargs": meta.get("model_from_pretrained_kwargs", {}),
        "fasteer": {"site": sae.site, "source_format": sae.source_format, "metadata": meta},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k  # v6 key, harmless for older versions
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_FILENAME, sae.state_dict())
    if sae.normalize_activations == "expected_average_only_in":
        write_json(folder / SCALER_FILENAME, {"scaling_factor": sae.norm_scaling_factor})
    elif (folder / SCALER_FILENAME).exists():
        (folder / SCALER_FILENAME).unlink()  # a stale scale would be picked up by load
    write_json(folder / CFG_FILENAME, cfg)
    return folder
