"""Hugging Face Hub downloads for `SAE.load` (``huggingface_hub``, imported lazily).

Why it is shaped this way: SAE repositories are big collections (Gemma Scope res-2b is
hundreds of SAEs; a sparsify run has one folder per hookpoint), so only the one folder that
is asked for is downloaded (``snapshot_download(allow_patterns=...)``), plus the run-level
``config.json`` that sparsify keeps next to its hookpoint folders.  Without a subfolder only the
repository's top-level SAE files are fetched; if there are none the error lists the folders
that do hold SAEs.  Offline use works from the local cache (``HF_HUB_OFFLINE=1``); a missing
cache entry or no network gives an error that says so instead of a stack of HTTP exceptions.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:/[^/].*)?$")
# Files that make up an SAE in any supported format (plus metadata worth having).
SAE_FILES = (
    "cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.npz",
    "activation_scaler.json", "config.json",
)
_MARKERS = ("sae_weights.safetensors", "sae.safetensors", "params.npz")


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not text.startswith((".", "~"))


def split_hub_id(text: str) -> tuple[str, str | None]:
    """``owner/name/sub/folder`` -> (``owner/name``, ``sub/folder``)."""
    parts = text.strip("/").split("/")
    repo = "/".join(parts[:2])
    sub = "/".join(parts[2:]) or None
    return repo, sub


def _import_hub():
    try:
        import huggingface_hub
    except ImportError as e:  # optional dependency: pip install fasteer[hub]
        raise ImportError(
            "loading an SAE from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub"
        ) from e
    return huggingface_hub


def _sae_folders(repo_id: str, revision: str | None) -> list[str]:
    """Folders of a hub repository that hold SAE files (for error messages)."""
    hub = _import_hub()
    try:
        files = hub.list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 -- only used to enrich an error message
        return []
    folders = sorted({f.rsplit("/", 1)[0] for f in files if "/" in f and f.rsplit("/", 1)[1] in _MARKERS})
    return folders


def download(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """Download the SAE files of ``repo_id`` (under ``subfolder``) and return the local folder."""
    sub = subfolder.strip("/") if subfolder else None
    if sub and any(part in ("", ".", "..") or "\\" in part for part in sub.split("/")):
        raise ValueError(
            f"subfolder: {sub!r} must be a plain relative folder of the repository "
            "(no '.', '..', empty parts or backslashes)"
        )
    hub = _import_hub()
    patterns = [f"{sub}/{name}" for name in SAE_FILES] if sub else list(SAE_FILES)
    if sub and "/" not in sub:
        patterns.append("config.json")  # a sparsify run config next to the hookpoint folders
    elif sub:
        patterns.append(f"{sub.rsplit('/', 1)[0]}/config.json")
    try:
        root = Path(hub.snapshot_download(repo_id, allow_patterns=patterns, revision=revision))
    except Exception as e:  # noqa: BLE001 -- huggingface_hub raises many types; all mean "not available"
        raise OSError(
            f"could not get SAE {repo_id!r}" + (f" (subfolder {sub!r})" if sub else "")
            + f" from the Hugging Face Hub: {type(e).__name__}: {e}. "
            "If you are offline, download it first or pass a local path."
        ) from e
    folder = root / sub if sub else root
    if not folder.resolve().is_relative_to(root.resolve()):  # a symlink out of the snapshot
        raise ValueError(f"subfolder: {sub!r} resolves outside the downloaded snapshot of {repo_id!r}")
    if not any((folder / marker).is_file() for marker in _MARKERS):
        folders = _sae_folders(repo_id, revision)
        listing = (", ".join(folders[:20]) + (" ..." if len(folders) > 20 else "")) if folders else "none found"
        raise FileNotFoundError(
            f"{repo_id}" + (f"/{sub}" if sub else "") + ": no SAE files there "
            f"({', '.join(_MARKERS)}); pass subfolder= one of: {listing}"
        )
    return folder
