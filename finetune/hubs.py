"""Where pretrained files live, and fetching them: the torch hub cache and the Hugging Face cache.

Everything here reads the environment at call time (TORCH_HOME, HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE, FINETUNE_OFFLINE), so a test or a notebook can point it at another cache
without re-importing anything. Offline, nothing is attempted over the network: a missing file
is an immediate one-line error that says where it was looked for and how to put it there.
"""
from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .checkpoints import atomic_write
from .errors import FinetuneError

DOWNLOAD_TIMEOUT_S = 30


def offline() -> bool:
    """True when the user asked for no network (FINETUNE_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("FINETUNE_OFFLINE", "HF_HUB_OFFLINE"))


# ------------------------------------------------------------------------------ torch hub cache
def torch_hub_checkpoints() -> Path:
    """`$TORCH_HOME/hub/checkpoints`, where `torch.hub.load_state_dict_from_url` caches files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_url(ref: str, url: str, dest: Path) -> Path:
    """`dest` if present, else download `url` there (atomically). One-line error when impossible."""
    if dest.is_file():
        return dest
    how = f"download {url} on a machine with network and place it at {dest}"
    if offline():
        raise FinetuneError(f"{ref}: weights not cached at {dest} and offline mode is on; {how}")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            atomic_write(dest, lambda tmp: _copy_stream(response, tmp))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise FinetuneError(f"{ref}: weights not cached at {dest} and the download failed ({e}); {how}") from e
    return dest


def _copy_stream(response, tmp: str) -> None:
    with open(tmp, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)


# ---------------------------------------------------------------------------- Hugging Face cache
def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(hf_home) / "hub"


def hf_repo_dir(repo_id: str) -> Path:
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def hf_cached_file(repo_id: str, filenames: Sequence[str]) -> Optional[Path]:
    """The first of `filenames` present in the local cache for `repo_id`, without any network."""
    from huggingface_hub import try_to_load_from_cache
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hf_cache_dir()))
        if isinstance(found, str):
            return Path(found)
    return None


def hf_file(ref: str, repo_id: str, filenames: Sequence[str], required: bool = True) -> Optional[Path]:
    """Local path of the first of `filenames` in `repo_id`: from the cache, else downloaded.

    Offline, or when the download fails, a missing required file is a one-line error naming the
    cache folder and how to fill it.
    """
    cached = hf_cached_file(repo_id, filenames)
    if cached or offline():
        return cached or _hf_missing(ref, repo_id, filenames, required, "offline mode is on")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    reason = "not found"
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=str(hf_cache_dir()), etag_timeout=10))
        except EntryNotFoundError:
            continue
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
            reason = f"download failed: {str(e).splitlines()[0][:160]}"
            break
    return _hf_missing(ref, repo_id, filenames, required, reason)


def _hf_missing(ref, repo_id, filenames, required, reason) -> None:
    if required:
        raise hf_missing_error(ref, repo_id, filenames, reason)


def hf_missing_error(ref: str, repo_id: str, filenames: Sequence[str], reason: str) -> FinetuneError:
    return FinetuneError(
        f"{ref}: {' or '.join(filenames)} of {repo_id} is not in the Hugging Face cache {hf_repo_dir(repo_id)} "
        f"({reason}); on a machine with network run `hf download {repo_id}` and copy that "
        f"models--{repo_id.replace('/', '--')} folder into {hf_cache_dir()} (or point HF_HOME at a cache that has it)")


# ----------------------------------------------------------------------------- timm pretrained tags
# timm loads a tag's weights itself (`timm.create_model(tag, pretrained=True)`); these say where it
# looks, so that a cached file is handed to it directly and a missing one is reported before it tries.
def timm_hub_files(cfg: Dict[str, Any]) -> List[str]:
    """The file names timm tries in a tag's Hugging Face repo, in its order (`hf_hub_filename` honoured)."""
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives
    filename = cfg.get("hf_hub_filename") or HF_WEIGHTS_NAME
    return [*_get_safe_alternatives(filename), filename]


def timm_url_file(url: str) -> Path:
    """Where timm caches a tag's weights downloaded from a plain URL (the torch hub cache)."""
    return torch_hub_checkpoints() / os.path.basename(urllib.parse.urlparse(url).path)


def timm_cache_dir(cfg: Dict[str, Any]) -> Path:
    return hf_cache_dir() if cfg.get("hf_hub_id") else torch_hub_checkpoints()


def timm_cached_file(cfg: Dict[str, Any]) -> Optional[Path]:
    """The file timm would load for pretrained cfg `cfg`, if it is on disk already."""
    if cfg.get("hf_hub_id"):
        return hf_cached_file(cfg["hf_hub_id"], timm_hub_files(cfg))
    if cfg.get("url"):
        path = timm_url_file(cfg["url"])
        return path if path.is_file() else None
    return None


def timm_missing_error(ref: str, cfg: Dict[str, Any], reason: str) -> FinetuneError:
    if cfg.get("hf_hub_id"):
        return hf_missing_error(ref, cfg["hf_hub_id"], timm_hub_files(cfg), reason)
    if cfg.get("url"):
        return FinetuneError(f"{ref}: weights not cached at {timm_url_file(cfg['url'])} ({reason}); download "
                             f"{cfg['url']} on a machine with network and place it there")
    return FinetuneError(f"{ref}: timm lists no download location for these weights")
