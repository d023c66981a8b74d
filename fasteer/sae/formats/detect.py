"""Find which format a path holds, and load it: the body of `SAE.load`.

Detection is by the files present, because that is the one thing every project fixes:

=============  =================================================
format         files in the SAE's folder
=============  =================================================
saelens        ``cfg.json`` + ``sae_weights.safetensors``
sparsify       ``cfg.json`` + ``sae.safetensors``
gemma_scope    ``params.npz``
=============  =================================================

A path may name the folder or any one of those files.  A folder holding several SAEs (a
sparsify run with one folder per hookpoint, a Gemma Scope checkout) needs ``subfolder=``; the
error lists the candidates.  A path that does not exist locally and looks like ``owner/name``
is fetched from the Hugging Face Hub (`hub.download`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..._files import PARSE_ERRORS, FileFormatError
from ..sae import SAE
from . import gemma_scope, saelens, sparsify
from .hub import download, looks_like_hub_id, split_hub_id

FORMATS = ("saelens", "gemma_scope", "sparsify")
_FILE_NAMES = {
    saelens.WEIGHTS_FILENAME: "saelens",
    sparsify.WEIGHTS_FILENAME: "sparsify",
    gemma_scope.PARAMS_FILENAME: "gemma_scope",
    "cfg.json": None,
}


def detect_format(folder: Path) -> str | None:
    """The format of the SAE files directly in ``folder``, or None if there are none."""
    if (folder / saelens.WEIGHTS_FILENAME).is_file():
        return "saelens"
    if (folder / sparsify.WEIGHTS_FILENAME).is_file():
        return "sparsify"
    if (folder / gemma_scope.PARAMS_FILENAME).is_file():
        return "gemma_scope"
    return None


def find_sae_folders(root: Path, max_depth: int = 4, limit: int = 50) -> list[str]:
    """Sub-folders of ``root`` (relative, posix) that hold an SAE, breadth first."""
    found: list[str] = []
    level = [root]
    for _ in range(max_depth):
        nxt = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for child in children:
                if detect_format(child) is not None:
                    found.append(child.relative_to(root).as_posix())
                    if len(found) >= limit:
                        return found
                else:
                    nxt.append(child)
        level = nxt
    return found


def _resolve_local(path: Path, subfolder: str | None) -> tuple[Path, str | None]:
    """(folder, format) for a local path; raises FileNotFoundError with what is missing."""
    if path.is_file():
        if path.name not in _FILE_NAMES:
            raise ValueError(
                f"path: {path} is not an SAE file; expected a folder or one of {', '.join(_FILE_NAMES)}"
            )
        if subfolder:
            raise ValueError(f"subfolder: cannot be used when path names a file ({path})")
        folder = path.parent
    else:
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            available = find_sae_folders(path)
            raise FileNotFoundError(
                f"{folder}: no such folder" + (f"; SAE folders under {path}: {', '.join(available)}" if available else "")
            )
    fmt = detect_format(folder)
    if fmt is None:
        if (folder / "cfg.json").is_file():
            raise FileNotFoundError(
                f"{folder}: has cfg.json but no weights file ({saelens.WEIGHTS_FILENAME} for SAELens, "
                f"{sparsify.WEIGHTS_FILENAME} for sparsify)"
            )
        available = find_sae_folders(folder)
        if available:
            raise ValueError(
                f"{folder}: holds several SAEs; pick one with subfolder= (found: {', '.join(available[:20])}"
                + (" ..." if len(available) > 20 else "") + ")"
            )
        raise FileNotFoundError(
            f"{folder}: no SAE files found; expected cfg.json + {saelens.WEIGHTS_FILENAME} (SAELens), "
            f"{gemma_scope.PARAMS_FILENAME} (Gemma Scope) or cfg.json + {sparsify.WEIGHTS_FILENAME} (sparsify)"
        )
    if fmt in ("saelens", "sparsify") and not (folder / "cfg.json").is_file():
        raise FileNotFoundError(f"{folder}: {fmt} weights found but cfg.json is missing")
    return folder, fmt


def load_sae(
    path_or_hub_id: Any,
    *,
    subfolder: str | None = None,
    hook: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    norm_scaling_factor: float | None = None,
    format: str | None = None,
    revision: str | None = None,
) -> SAE:
    """See `SAE.load`."""
    if not isinstance(path_or_hub_id, (str, Path)):
        raise TypeError(f"path_or_hub_id: expected a str or Path, got {type(path_or_hub_id).__name__}")
    for name, value in (("subfolder", subfolder), ("hook", hook)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}: expected a string, got {type(value).__name__}")
    if subfolder and hook and subfolder.strip("/") != hook.strip("/"):
        raise ValueError(f"subfolder={subfolder!r} and hook={hook!r} disagree; give one of them")
    sub = (subfolder or hook or "").strip("/") or None
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: unknown {format!r}; expected one of {', '.join(FORMATS)}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")

    path = Path(path_or_hub_id).expanduser()
    where = None
    if path.exists():
        folder, fmt = _resolve_local(path, sub)
    elif isinstance(path_or_hub_id, str) and looks_like_hub_id(path_or_hub_id):
        repo_id, inline_sub = split_hub_id(path_or_hub_id)
        if inline_sub and sub:
            raise ValueError(
                f"path_or_hub_id {path_or_hub_id!r} already names a subfolder; do not also pass subfolder/hook"
            )
        sub = inline_sub or sub
        folder = download(repo_id, sub, revision)
        folder, fmt = _resolve_local(folder, None)
        where = f"{repo_id}/{sub}" if sub else repo_id
    else:
        raise FileNotFoundError(f"path_or_hub_id: {path_or_hub_id!r} does not exist and is not a hub id (owner/name)")

    if format is not None and format != fmt:
        raise ValueError(f"format: asked for {format!r} but {folder} holds {fmt!r} files")
    if norm_scaling_factor is not None and fmt != "saelens":
        raise ValueError(f"norm_scaling_factor: only SAELens SAEs have one; {folder} is {fmt!r}")
    source = where or str(folder)
    try:
        if fmt == "saelens":
            return saelens.load_saelens(
                folder, device=device, dtype=dtype, norm_scaling_factor=norm_scaling_factor, source=source
            )
        if fmt == "sparsify":
            return sparsify.load_sparsify(folder, device=device, dtype=dtype, source=source)
        return gemma_scope.load_gemma_scope(folder, device=device, dtype=dtype, where=where, source=source)
    except (FileFormatError, OSError, MemoryError):
        raise
    except PARSE_ERRORS as exc:
        if type(exc) is ValueError:
            raise  # an argument error (e.g. norm_scaling_factor), already named
        # A safety net: the format modules name the field for every problem they know of.
        raise FileFormatError(folder, None, f"malformed {fmt} SAE ({type(exc).__name__}: {exc})") from None
