"""Finding the layer stack of any ``nn.Module`` (used by `fasteer.sites`).

The *layer stack* is the ``nn.ModuleList`` of repeated blocks the residual stream runs
through. `find_layers` picks it in this order (deterministic):

1. ``layers_path`` given by the user (``fs.patch(model, layers_path="encoder.layer")``):
   that attribute path, which must be a non-empty ``nn.ModuleList``; otherwise a
   ValueError naming the stacks that do exist.
2. A scan of the module tree (`layer_stacks`): every ``nn.ModuleList`` of >= 2 blocks of
   one class, where a block is a module with submodules of its own (a list of ``Linear``
   or ``Embedding`` is not a stack) and lists inside another stack's blocks (MoE experts)
   are not counted. Stacks under a vision/audio tower (a path segment or the block class
   naming vision, visual, image, audio, speech, video, pixel, siglip or clip) are set aside
   when a text stack remains: a vision tower's layers never win over the language
   model's.
3. Encoder-decoder models (the remaining stacks include one under an ``encoder`` and one
   under a ``decoder`` path segment: T5, BART, ...): a ValueError listing them and asking
   for ``layers_path=``. There is no single residual stream to steer.
4. One of the known paths in ``KNOWN_PATHS`` (the HF families fasteer's table covers),
   tried in order.
5. The only remaining stack; else the only one whose path names a language model
   (``language_model``, ``text_model``, ``text``, ``decoder``, ``lm``); else a ValueError
   listing the stacks and asking for ``layers_path=``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.nn as nn

# Attribute paths (from the top-level module) of the layer list of the HF families fasteer
# knows, tried in order after the scan found no encoder-decoder pair.
KNOWN_PATHS = (
    "model.layers",          # Llama, Mistral, Mixtral, Qwen2/3(-MoE), Gemma 1/2/3, Phi-3, OLMo-2
    "model.language_model.layers",  # Gemma-3 / Llava multimodal wrappers
    "transformer.h",         # GPT-2, Falcon
    "gpt_neox.layers",       # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT-style
    "layers",                # a bare decoder stack
    "h",                     # a bare GPT-2 / Falcon base model
)

_OTHER_MODALITY = ("vision", "visual", "image", "audio", "speech", "video", "pixel", "siglip",
                   "clip")
_TEXT_MARKERS = ("language_model", "text_model", "text", "decoder", "lm")


@dataclass(frozen=True)
class LayerStack:
    """One candidate stack: its attribute path, the list, and the block class name."""
    path: str
    layers: nn.ModuleList
    block: str

    def describe(self) -> str:
        return f"{self.path} ({len(self.layers)} x {self.block})"


def get_attr_path(obj, path: str):
    """``obj.a.b.c`` for ``"a.b.c"`` (numeric parts index lists); None when missing."""
    for name in path.split("."):
        if not name:
            continue
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and name.isdigit():
            idx = int(name)
            obj = obj[idx] if idx < len(obj) else None
        else:
            obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _is_block(m: nn.Module) -> bool:
    return next(m.children(), None) is not None


def layer_stacks(model: nn.Module) -> list[LayerStack]:
    """Every ``nn.ModuleList`` of >= 2 same-class composite blocks in ``model``, outermost
    only (none inside another stack's blocks), in module-tree order."""
    found: list[LayerStack] = []
    for path, mod in model.named_modules(remove_duplicate=True):
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        classes = {type(m) for m in mod}
        if len(classes) != 1 or not all(_is_block(m) for m in mod):
            continue
        if any(path.startswith(s.path + ".") for s in found):
            continue                  # nested in a stack's block (experts, sub-blocks)
        found.append(LayerStack(path, mod, type(mod[0]).__name__))
    return found


def _segments(stack: LayerStack) -> list[str]:
    return [s.lower() for s in stack.path.split(".") if s and not s.isdigit()]


def _other_modality(stack: LayerStack) -> bool:
    words = _segments(stack) + [stack.block.lower()]
    return any(tag in w for w in words for tag in _OTHER_MODALITY)


def _has_segment(stack: LayerStack, word: str) -> bool:
    return any(word in s for s in _segments(stack))


def _names_text(stack: LayerStack) -> bool:
    for seg in _segments(stack):
        words = seg.split("_")
        if any(m in seg if "_" in m or len(m) > 3 else m in words for m in _TEXT_MARKERS):
            return True
    return False


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _listing(stacks) -> str:
    return "; ".join(s.describe() for s in stacks) or "none"


def find_layers(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """(path, layer list) of ``model``'s layer stack; see the module docstring for the rule."""
    if layers_path is not None:
        if not isinstance(layers_path, str) or not layers_path.strip("."):
            raise ValueError(f"layers_path: expected an attribute path like 'model.layers', "
                             f"got {layers_path!r}")
        layers = get_attr_path(model, layers_path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers_path, layers
        what = ("does not exist" if layers is None else
                "is an empty ModuleList" if isinstance(layers, nn.ModuleList) else
                f"is {_article(type(layers).__name__)} {type(layers).__name__}, not an "
                "nn.ModuleList of layers")
        raise ValueError(f"layers_path: {layers_path!r} {what} in {type(model).__name__}; "
                         f"layer stacks found: {_listing(layer_stacks(model))}")
    stacks = layer_stacks(model)
    text = [s for s in stacks if not _other_modality(s)] or stacks
    enc = [s for s in text if _has_segment(s, "encoder")]
    dec = [s for s in text if _has_segment(s, "decoder")]
    if enc and dec:
        raise ValueError(
            f"model: {type(model).__name__} is an encoder-decoder model with several layer "
            f"stacks ({_listing(text)}); choose one with layers_path=, e.g. "
            f"fasteer.patch(model, layers_path={dec[0].path!r})")
    for path in KNOWN_PATHS:
        layers = get_attr_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    if len(text) == 1:
        return text[0].path, text[0].layers
    named = [s for s in text if _names_text(s)]
    if len(named) == 1:
        return named[0].path, named[0].layers
    if not stacks:
        raise ValueError(
            f"model: cannot find the decoder layers of {type(model).__name__}: no known path "
            f"({', '.join(KNOWN_PATHS)}) and no nn.ModuleList of >= 2 blocks of one class; "
            "pass layers_path= if the layers are held elsewhere")
    raise ValueError(f"model: cannot tell which layer stack of {type(model).__name__} to steer "
                     f"({_listing(text)}); choose one with layers_path=, e.g. "
                     f"fasteer.patch(model, layers_path={text[0].path!r})")


def _takes_tokens(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "input_ids" in params or "inputs_embeds" in params


def stream_owner(model: nn.Module, layers_path: str) -> tuple[nn.Module, nn.Module]:
    """(owner, entry) of a layer stack: ``owner`` holds the list (the final norm lives
    there); ``entry`` is the innermost module on the path from ``owner`` up to ``model``
    whose forward takes ``input_ids`` or ``inputs_embeds`` (where fasteer reads each
    forward's tokens; ``owner`` itself for the HF families, the ``BertModel`` around a
    ``BertEncoder``), else ``model``."""
    parts = [p for p in layers_path.split(".") if p]
    chain = [model]
    for i in range(1, len(parts)):
        chain.append(get_attr_path(model, ".".join(parts[:i])))
    owner = chain[-1]
    entry = next((m for m in reversed(chain) if isinstance(m, nn.Module) and _takes_tokens(m)),
                 model)
    return owner, entry
