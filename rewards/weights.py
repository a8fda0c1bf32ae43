"""Find reward-model weights on disk; never download.

Search order for a single file: an explicit ``path`` (the file, or a folder
holding it), then ``$DIFFSTILL_REWARD_WEIGHTS/<file>``, then the Hugging Face
cache (``local_files_only``, so it works with ``HF_HUB_OFFLINE=1``), then any
extra folders the reward names (e.g. ``~/.cache/ImageReward``), then the torch
hub checkpoint folder. Folders (transformers models) are searched the same
way. When nothing is found the error names the repo, the file and where to put
it, in one line.

Checkpoints are read with safetensors; ``.pt``/``.pth``/``.bin`` files (the
format HPS, ImageReward and the aesthetic MLP are published in) are read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers and refuses arbitrary pickled objects.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

ENV_DIR = "DIFFSTILL_REWARD_WEIGHTS"


class WeightsNotFoundError(FileNotFoundError):
    """Raised when a reward's weights are not on this machine."""


def _hf_cached_file(repo_id: str | None, filename: str) -> Path | None:
    if repo_id is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def _hf_cached_folder(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any miss in the offline cache means "not here"
        return None


def _candidates(filename: str, search_dirs: tuple[str, ...]) -> list[Path]:
    dirs = [Path(os.environ[ENV_DIR])] if os.environ.get(ENV_DIR) else []
    dirs += [Path(d).expanduser() for d in search_dirs]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return [d / filename for d in dirs]


def _where_hint(repo_id: str | None, filename: str, source: str | None) -> str:
    source = source or (f"Hugging Face repo '{repo_id}'" if repo_id else "its publisher")
    return (
        f"get '{filename}' from {source} on a machine with network, then pass path=<file or folder> "
        f"or copy it into ${ENV_DIR}/ (or the Hugging Face cache)"
    )


def find_file(
    filenames: str | tuple[str, ...],
    *,
    repo_id: str | None,
    what: str,
    path: str | os.PathLike | None = None,
    search_dirs: tuple[str, ...] = (),
    source: str | None = None,
) -> Path:
    """Local path of the first of ``filenames`` found for reward ``what``, or WeightsNotFoundError.

    Several names let a safetensors copy take precedence over the published .pt.
    """
    filenames = (filenames,) if isinstance(filenames, str) else tuple(filenames)
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        for filename in filenames:
            if (p / filename).is_file():
                return p / filename
        raise WeightsNotFoundError(f"{what}: no file at {p} (expected the file itself or a folder holding {filenames[-1]!r})")
    for filename in filenames:
        cached = _hf_cached_file(repo_id, filename)
        if cached is not None:
            return cached
        for candidate in _candidates(filename, search_dirs):
            if candidate.is_file():
                return candidate
    raise WeightsNotFoundError(f"{what}: weights '{filenames[-1]}' not found locally; {_where_hint(repo_id, filenames[-1], source)}")


def find_folder(
    *,
    repo_id: str | None,
    what: str,
    path: str | os.PathLike | None = None,
    marker: str | tuple[str, ...] = "config.json",
) -> Path:
    """Return a local model folder containing ``marker`` (or any one of several markers)."""
    markers = (marker,) if isinstance(marker, str) else marker

    def has_marker(p: Path) -> bool:
        return any((p / m).is_file() for m in markers)

    if path is not None:
        p = Path(path).expanduser()
        if has_marker(p):
            return p
        raise WeightsNotFoundError(f"{what}: folder {p} has no '{' or '.join(markers)}'; pass a save_pretrained folder")
    if os.environ.get(ENV_DIR) and repo_id is not None:
        p = Path(os.environ[ENV_DIR]) / repo_id.replace("/", "--")
        if has_marker(p):
            return p
    if repo_id is None:
        raise WeightsNotFoundError(f"{what}: no folder given; pass path=<a save_pretrained folder with "
                                   f"{' or '.join(markers)}>")
    cached = _hf_cached_folder(repo_id)
    if cached is not None and has_marker(cached):
        return cached
    name = repo_id.replace("/", "--")
    raise WeightsNotFoundError(
        f"{what}: model folder for '{repo_id}' not found locally; download it on a machine with network "
        f"(huggingface-cli download {repo_id}) and pass path=<folder>, copy it to ${ENV_DIR}/{name}/, "
        f"or copy the Hugging Face cache entry"
    )


def load_state_dict(file: str | os.PathLike) -> dict[str, Tensor]:
    """Load a flat tensor state dict; unwraps {'state_dict': ...} and strips a DDP 'module.' prefix."""
    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses objects that are not plain tensors/containers
            raise ValueError(
                f"{file}: not a plain tensor checkpoint ({type(err).__name__}); convert it once to safetensors "
                "with a trusted loader and pass the .safetensors path"
            ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
