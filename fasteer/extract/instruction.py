"""Instruction vectors (Stolfo et al., ICLR 2025, "Improving Instruction-Following in Language
Models through Activation Steering").

For inputs given with and without an instruction (same base prompt), at layer l and the last
input token:

    u_l = normalize( mean_i( h_l(with_i) - h_l(without_i) ) )
    c_l = mean_i( h_l(with_i) . u_l )

Their "adjusted residual stream" steering sets the projection of every steered token on u_l to
c_l, the value a prompt that *does* carry the instruction has on average:

    h <- h + (c_l - h . u_l) u_l

which is exactly fasteer's ``Clamp(u, value=c)``.  So `instruction` returns both: the unit
vectors (a `SteeringVector`) and the per-layer targets.  The targets are also stored in the
vector's metadata (``clamp_targets``), so they survive ``save``/``load``.

Scale: the directions are unit vectors (``fs.Add(u, alpha)`` adds ``alpha`` absolute residual
units); metadata ``resid_norm`` (median stream norm per layer) lets
``fs.Add(u, alpha, scale="resid")`` read ``alpha`` as a fraction of a typical activation.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch.nn as nn

from fasteer.vectors import SteeringVector

from .activations import collect_contrast, model_metadata, resid_norm_metadata


class InstructionSteering(NamedTuple):
    """``vector``: unit directions u_l; ``targets``: {layer: c_l} for ``Clamp(u, value=c)``.

    Unpacks as ``u, c = instruction(...)``."""

    vector: SteeringVector
    targets: dict[int, float]


def instruction(
    model: nn.Module,
    tokenizer: Any,
    with_instruction: Sequence[str],
    without_instruction: Sequence[str],
    layers: Any = None,
    *,
    position: str = "last",
    site: str = "resid_post",
    batch_size: int = 8,
    chat_template: bool = False,
    system_prompt: str | None = None,
    padding_side: str | None = None,
    progress: bool = True,
) -> InstructionSteering:
    """Instruction direction and Clamp target per layer (see module docstring).

    ``with_instruction[i]`` and ``without_instruction[i]`` are the same input with and without
    the instruction.  Other arguments as in `fasteer.extract.caa` (Stolfo et al. use the last
    token: ``position="last"``)."""
    norms: dict[int, float] = {}
    layer_ids, with_acts, without_acts = collect_contrast(
        model, tokenizer, with_instruction, without_instruction, layers, paired=True,
        names=("with_instruction", "without_instruction"), site=site, position=position,
        batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt,
        padding_side=padding_side, progress=progress, desc="instruction", resid_norm=norms,
    )
    directions, targets = {}, {}
    for l in layer_ids:
        h_with = with_acts[l].double()
        diff = h_with.mean(0) - without_acts[l].double().mean(0)
        norm = diff.norm()
        if norm == 0:
            raise ValueError(
                f"with_instruction/without_instruction: identical mean activations at layer {l}; "
                "the instruction leaves no direction"
            )
        u = diff / norm
        directions[l] = u.float()
        targets[l] = float((h_with @ u).mean())
    vector = SteeringVector(
        directions,
        site=site,
        metadata=model_metadata(
            model, "instruction", position=position, n_pairs=len(with_acts[layer_ids[0]]),
            chat_template=bool(chat_template), system_prompt=system_prompt, unit_norm=True,
            clamp_targets={str(l): c for l, c in targets.items()},
            resid_norm=resid_norm_metadata(norms),
        ),
    )
    return InstructionSteering(vector, targets)
