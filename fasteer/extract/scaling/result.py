"""A learned activation-scaling intervention: its values, file format, and how it applies.

`ActivationScaling` holds what `fasteer.extract.activation_scaling` learned for one
method (ActivScalar, DynScalar or SteerVec, see `fasteer.extract.scaling.params`) at
component sites x layers, and turns it into fasteer interventions for the fused
inference path:

* ActivScalar -> ``Scale({layer: [1 + beta*alpha_i for i < P]}, site=s)``: per-position
  factors (one slot per prompt index; plain SCALE edits in the kernels);
* SteerVec    -> ``Add({layer: beta * v [P, D]}, site=s)``: per-position vectors;
* DynScalar   -> ``DynScale({layer: beta * w / c}, bias={layer: 1 + beta*b}, site=s)``:
  the DYN_SCALE edit, h <- (bias + w.h) h, at any prompt length.

File: one ``.safetensors`` file; tensors ``alpha`` [S, L, P] / ``vec`` [S, L, P, D] /
``weight`` [S, L, D], ``bias`` [S, L], ``norms`` [S, L]; the header's ``__metadata__``
holds ``fasteer_scaling`` (format version), method, beta, sites, layers, hidden size,
prompt length, model type and a free-form JSON ``info`` (task, losses). Loading checks
every field against the tensors (`fasteer.FileFormatError` otherwise); nothing is
unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..._files import FileFormatError, atomic_write, load_safetensors, loads_json
from ...interventions import Add, DynScale, Scale
from ...sites import COMPONENT_SITES
from .params import METHOD_NAMES, METHODS, ScalingParams

FORMAT_VERSION = "1"


class ActivationScaling:
    """Learned values of one activation-scaling method; see the module docstring."""

    def __init__(self, params: ScalingParams, sites, layers, *, model_type: str = "",
                 info: dict | None = None):
        self.params = params
        self.sites = tuple(sites)
        self.layers = tuple(int(l) for l in layers)
        self.model_type = model_type
        self.info = dict(info or {})
        bad = [s for s in self.sites if s not in COMPONENT_SITES]
        if bad:
            raise ValueError(f"sites: activation scaling edits component outputs "
                             f"{COMPONENT_SITES}, got {bad}")
        if (params.n_sites, params.n_layers) != (len(self.sites), len(self.layers)):
            raise ValueError(f"params: shaped for {params.n_sites} sites x {params.n_layers} layers, "
                             f"got {len(self.sites)} sites and {len(self.layers)} layers")

    @property
    def method(self) -> str:
        return self.params.method

    @property
    def name(self) -> str:
        return METHOD_NAMES[self.method]

    @property
    def beta(self) -> float:
        return self.params.beta

    @property
    def prompt_len(self) -> int | None:
        return self.params.prompt_len

    def __repr__(self):
        extra = f", prompt_len={self.prompt_len}" if self.prompt_len else ""
        return (f"ActivationScaling({self.name}, sites={list(self.sites)}, "
                f"{len(self.layers)} layers, {self.params.n_parameters()} parameters{extra})")

    # -- applying ---------------------------------------------------------------------------
    @torch.no_grad()
    def interventions(self) -> list:
        """fasteer interventions applying the learned values on the fused path (one per
        site); ``fs.steer(model, *result.interventions())`` or ``st.set(...)``."""
        p, beta = self.params, self.beta
        out = []
        for s, site in enumerate(self.sites):
            if self.method == "activ":
                factors = {l: (1.0 + beta * p.alpha[s, j].double()).tolist()
                           for j, l in enumerate(self.layers)}
                out.append(Scale(factors, site=site, positions="prompt"))
            elif self.method == "steervec":
                vectors = {l: (beta * p.vec[s, j]).float() for j, l in enumerate(self.layers)}
                out.append(Add(vectors, 1.0, site=site, positions="prompt"))
            else:
                weights = {l: (beta * p.weight[s, j].double() / float(p.norms[s, j])).float()
                           for j, l in enumerate(self.layers)}
                bias = {l: 1.0 + beta * float(p.bias[s, j]) for j, l in enumerate(self.layers)}
                out.append(DynScale(weights, bias, site=site))
        return out

    # -- minimality -----------------------------------------------------------------------------
    @torch.no_grad()
    def changes(self, threshold: float = 0.05) -> dict:
        """How much of the intervention moves away from "no change".

        ``changed``: ActivScalar -- scalars with |beta*alpha| > threshold; SteerVec --
        vectors with |beta*v| > threshold * the mean |h| at that site; DynScalar -- sites x
        layers whose scalar can move by more than threshold (|bias| or |w|*c/c above it).
        ``l1``: the penalty the training minimised; ``parameters``: their number.
        """
        p, beta = self.params, self.beta
        if self.method == "activ":
            moved = (beta * p.alpha).abs() > threshold
            units = p.alpha.numel()
        elif self.method == "steervec":
            norms = self.info.get("activation_norms")
            scale = (torch.tensor(norms).view(len(self.sites), len(self.layers), 1)
                     if norms else torch.ones(len(self.sites), len(self.layers), 1))
            moved = (beta * p.vec.norm(dim=-1)) > threshold * scale
            units = moved.numel()
        else:
            moved = (beta * (p.weight.norm(dim=-1) + p.bias.abs())) > threshold
            units = moved.numel()
        return {"changed": int(moved.sum()), "units": int(units),
                "parameters": p.n_parameters(), "l1": float(p.l1()), "threshold": threshold}

    # -- files ----------------------------------------------------------------------------------
    def save(self, path) -> None:
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"path: expected a file name ending in .safetensors, got {str(path)!r}")
        from safetensors.torch import save_file
        tensors = {name: t.detach().float().contiguous().cpu()
                   for name, t in self.params.state_dict().items()}
        meta = {"fasteer_scaling": FORMAT_VERSION, "method": self.method,
                "beta": repr(self.beta), "sites": json.dumps(list(self.sites)),
                "layers": json.dumps(list(self.layers)), "hidden_size": str(self.params.hidden),
                "prompt_len": "" if self.prompt_len is None else str(self.prompt_len),
                "model_type": self.model_type, "info": json.dumps(self.info)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path) -> "ActivationScaling":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such activation-scaling file: {str(path)!r}")
        meta, tensors = load_safetensors(path)

        def field(name):
            if name not in meta:
                raise FileFormatError(path, name, "missing from the header's __metadata__ "
                                      "(not a file written by ActivationScaling.save)")
            return meta[name]

        if field("fasteer_scaling") != FORMAT_VERSION:
            raise FileFormatError(path, "fasteer_scaling",
                                  f"format version {meta['fasteer_scaling']!r}; this fasteer "
                                  f"reads {FORMAT_VERSION!r}")
        method = field("method")
        if method not in METHODS:
            raise FileFormatError(path, "method", f"expected one of {METHODS}, got {method!r}")
        try:
            beta = float(field("beta"))
            hidden = int(field("hidden_size"))
            prompt_len = int(field("prompt_len")) if field("prompt_len") else None
        except ValueError as exc:
            raise FileFormatError(path, "header", f"bad number ({exc})") from None
        sites = loads_json(field("sites"), path, "sites")
        layers = loads_json(field("layers"), path, "layers")
        info = loads_json(field("info"), path, "info")
        if not (isinstance(sites, list) and sites and all(s in COMPONENT_SITES for s in sites)):
            raise FileFormatError(path, "sites", f"expected a list of {COMPONENT_SITES}, got {sites!r}")
        if not (isinstance(layers, list) and layers and
                all(isinstance(l, int) and not isinstance(l, bool) and l >= 0 for l in layers)):
            raise FileFormatError(path, "layers", f"expected a list of layer indices, got {layers!r}")
        if not isinstance(info, dict):
            raise FileFormatError(path, "info", "expected a JSON object")
        if not (beta == beta and abs(beta) < 1e6) or hidden < 1:
            raise FileFormatError(path, "header", f"beta {beta} / hidden_size {hidden} out of range")
        norms = tensors.get("norms")
        try:
            params = ScalingParams(method, len(sites), len(layers), hidden, prompt_len=prompt_len,
                                   beta=beta, norms=norms if method == "dyn" else None)
        except ValueError as exc:
            raise FileFormatError(path, "header", str(exc)) from None
        want = params.state_dict()
        if set(tensors) != set(want):
            raise FileFormatError(path, "tensors", f"expected {sorted(want)}, got {sorted(tensors)}")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(want[name].shape):
                raise FileFormatError(path, f"tensor {name!r}", f"shape {tuple(t.shape)}, expected "
                                      f"{tuple(want[name].shape)} from the header")
            if not bool(torch.isfinite(t).all()):
                raise FileFormatError(path, f"tensor {name!r}", "contains NaN or inf")
        params.load_state_dict({k: v.float() for k, v in tensors.items()})
        return cls(params, sites, layers, model_type=meta.get("model_type", ""), info=info)
