"""What a vLLM request asks for: the ``fasteer`` entry of ``SamplingParams.extra_args``.

A request names registered vectors / SAEs by id (the server's registry, `Registry`) and
says what to do with them. Over HTTP the same JSON goes in ``vllm_xargs``::

    {"fasteer": [
        {"add": "happy", "alpha": 4.0, "layers": [10, 11], "positions": "generated"},
        {"clamp": "french", "value": 3.0},          # value left out: the vector's stored targets
        {"ablate": "refusal", "layers": [12]},
        {"scale": 0.9, "layers": [3]},
        {"feature": 1234, "sae": "res12", "op": "set", "value": 8.0}
    ]}

A single object instead of a list is one intervention; the whole entry may also be a JSON
string (``vllm_xargs`` values are strings or numbers). Keys per intervention:

=========  =====================================================================
``add``    vector id; ``alpha`` (default 1.0)
``clamp``  vector id; ``value`` (a number, ``{layer: number}``, or absent)
``ablate`` vector id
``scale``  factor (a number); ``layers`` required
``feature`` feature id or list of ids; ``sae`` (id), ``op`` (add|set|scale|clamp),
           ``value`` (and ``hi`` for clamp)
common     ``layers`` (list of ints), ``site`` (resid_pre|resid_mid|resid_post),
           ``positions`` (all|prompt|generated|last_prompt)
=========  =====================================================================

`parse` turns it into fasteer interventions, checked against the model (layers, width)
and the registry, raising `SpecError` (a ValueError: vLLM answers it with HTTP 400 for
that request only). Explicit position masks, conditions and inline vectors are not
accepted over the wire: a request carries ids and numbers only, so the worker's tables
can hold every registered vector once.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SPEC_KEY = "fasteer"
REGISTRY_ENV = "FASTEER_VLLM_REGISTRY"
OPS = ("add", "clamp", "ablate", "scale", "feature")
_COMMON = {"layers", "site", "positions"}
_ALLOWED = {
    "add": {"add", "alpha"} | _COMMON,
    "clamp": {"clamp", "value"} | _COMMON,
    "ablate": {"ablate"} | _COMMON,
    "scale": {"scale"} | _COMMON,
    "feature": {"feature", "sae", "op", "value", "hi"} | _COMMON,
}
MAX_INTERVENTIONS = 16


class SpecError(ValueError):
    """A request's steering is malformed or names something the server does not have."""


class Registry:
    """The vectors and SAEs a server offers, by id: a JSON file
    ``{"vectors": {"happy": "happy.safetensors"}, "saes": {"res12": "sae_dir"}}`` (paths
    relative to the file). Files are loaded on first use and kept."""

    def __init__(self, vectors: Mapping[str, str] | None = None,
                 saes: Mapping[str, str] | None = None, root: Path | None = None):
        root = Path(root) if root is not None else Path.cwd()
        self.vectors = {k: (root / v) for k, v in (vectors or {}).items()}
        self.saes = {k: (root / v) for k, v in (saes or {}).items()}
        for kind, table in (("vectors", self.vectors), ("saes", self.saes)):
            for key, path in table.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"registry {kind}: ids must be non-empty strings, got {key!r}")
                if not path.exists():
                    raise FileNotFoundError(f"registry {kind}[{key!r}]: no such file {path}")
        self._vec_cache: dict[str, Any] = {}
        self._sae_cache: dict[str, Any] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Registry":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the fasteer registry ({exc})") from None
        if not isinstance(raw, dict) or set(raw) - {"vectors", "saes"}:
            raise ValueError(f"{path}: expected {{\"vectors\": {{...}}, \"saes\": {{...}}}}")
        for kind in ("vectors", "saes"):
            if not isinstance(raw.get(kind, {}), dict) or \
                    not all(isinstance(v, str) for v in raw.get(kind, {}).values()):
                raise ValueError(f"{path}: '{kind}' must map ids to file paths")
        return cls(raw.get("vectors"), raw.get("saes"), root=path.parent)

    def vector(self, key):
        if not isinstance(key, str) or key not in self.vectors:
            raise SpecError(f"unknown vector id {key!r}; this server has "
                            f"{sorted(self.vectors) or 'none'}")
        if key not in self._vec_cache:
            from fasteer.vectors import SteeringVector
            self._vec_cache[key] = SteeringVector.load(self.vectors[key])
        return self._vec_cache[key]

    def sae(self, key):
        if not isinstance(key, str) or key not in self.saes:
            raise SpecError(f"unknown SAE id {key!r}; this server has {sorted(self.saes) or 'none'}")
        if key not in self._sae_cache:
            from fasteer.sae.sae import SAE
            self._sae_cache[key] = SAE.load(self.saes[key])
        return self._sae_cache[key]


@functools.lru_cache(maxsize=1)
def registry_from_env() -> Registry | None:
    """The registry named by FASTEER_VLLM_REGISTRY (None: the plugin is off)."""
    path = os.environ.get(REGISTRY_ENV)
    return Registry.from_file(path) if path else None


def raw_spec(extra_args: Mapping | None):
    """The ``fasteer`` entry of a request's extra_args (None when absent)."""
    if not extra_args or SPEC_KEY not in extra_args:
        return None
    raw = extra_args[SPEC_KEY]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{SPEC_KEY}: not valid JSON ({exc.msg} at {exc.pos})") from None
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        raise SpecError(f"{SPEC_KEY}: expected a list of interventions or one object, got "
                        f"{type(raw).__name__}")
    if len(raw) > MAX_INTERVENTIONS:
        raise SpecError(f"{SPEC_KEY}: at most {MAX_INTERVENTIONS} interventions per request, "
                        f"got {len(raw)}")
    return raw


def canonical(raw) -> str:
    """One string per distinct steering (key order does not matter)."""
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), allow_nan=False)


def salt(raw) -> str:
    """A prefix-cache salt: KV blocks are shared only between requests with equal steering."""
    return "fasteer:" + hashlib.sha256(canonical(raw).encode()).hexdigest()[:32]


def _number(value, where: str) -> float:
    from fasteer.interventions import _as_number
    try:
        return _as_number(value, where)
    except (TypeError, ValueError) as exc:
        raise SpecError(str(exc)) from None


def parse(raw, registry: Registry, n_layers: int, hidden: int) -> tuple:
    """Interventions for a request's raw spec (a list from `raw_spec`); raises SpecError."""
    import fasteer as fs

    out = []
    for i, item in enumerate(raw):
        where = f"{SPEC_KEY}[{i}]"
        if not isinstance(item, Mapping):
            raise SpecError(f"{where}: expected an object, got {type(item).__name__}")
        ops = [op for op in OPS if op in item]
        if len(ops) != 1:
            raise SpecError(f"{where}: name exactly one of {OPS}, got keys {sorted(item)}")
        op = ops[0]
        unknown = set(item) - _ALLOWED[op]
        if unknown:
            raise SpecError(f"{where}: unknown keys {sorted(unknown)} for {op!r} (allowed: "
                            f"{sorted(_ALLOWED[op])})")
        common = {}
        if "layers" in item:
            layers = item["layers"]
            if not isinstance(layers, list) or not all(
                    isinstance(l, int) and not isinstance(l, bool) for l in layers):
                raise SpecError(f"{where}.layers: expected a list of ints, got {layers!r}")
            bad = [l for l in layers if not 0 <= l < n_layers]
            if bad:
                raise SpecError(f"{where}.layers: {bad} out of range 0..{n_layers - 1}")
            common["layers"] = layers
        for key in ("site", "positions"):
            if key in item:
                if not isinstance(item[key], str):
                    raise SpecError(f"{where}.{key}: expected a string, got {item[key]!r}")
                common[key] = item[key]
        if common.get("site") in ("attn_out", "mlp_out"):
            raise SpecError(f"{where}.site: the vLLM host carries resid_pre, resid_mid and "
                            f"resid_post; component outputs ({common['site']!r}) are carried "
                            "by fasteer.patch on Hugging Face models only")
        try:
            if op in ("add", "clamp", "ablate"):
                vec = registry.vector(item[op])
                if vec.hidden_size != hidden:
                    raise SpecError(f"{where}: vector {item[op]!r} has width {vec.hidden_size}, "
                                    f"the model's hidden size is {hidden}")
                if op == "add":
                    iv = fs.Add(vec, _number(item.get("alpha", 1.0), f"{where}.alpha"), **common)
                elif op == "clamp":
                    value = item.get("value")
                    if value is not None and not isinstance(value, Mapping):
                        value = _number(value, f"{where}.value")
                    iv = fs.Clamp(vec, value, **common)
                else:
                    iv = fs.Ablate(vec, **common)
            elif op == "scale":
                if "layers" not in common:
                    raise SpecError(f"{where}: 'scale' needs 'layers'")
                iv = fs.Scale(_number(item["scale"], f"{where}.scale"), **common)
            else:
                sae = registry.sae(item.get("sae"))
                if sae.d_in != hidden:
                    raise SpecError(f"{where}: SAE {item.get('sae')!r} reads width {sae.d_in}, "
                                    f"the model's hidden size is {hidden}")
                if sae.activation == "topk":
                    raise SpecError(f"{where}: TopK SAEs need the full-SAE op, which the vLLM "
                                    "host does not run; use a ReLU or JumpReLU SAE")
                iv = fs.FeatureEdit(sae, item["feature"], item.get("op", "add"), item.get("value"),
                                 item.get("hi"), **common)
        except SpecError:
            raise
        except (TypeError, ValueError) as exc:   # fasteer's own argument checks
            raise SpecError(f"{where}: {exc}") from None
        resolved = iv.layers if iv.layers is not None else ()
        bad = [l for l in resolved if l >= n_layers]
        if bad:
            raise SpecError(f"{where}: layers {bad} out of range 0..{n_layers - 1}")
        out.append(iv)
    return tuple(out)
