"""Where pretrained files live, and fetching them: the torch hub cache and the Hugging Face cache.

Everything here reads the environment at call time (TORCH_HOME, HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
HF_HUB_OFFLINE, FINETUNE_OFFLINE), so a test or a notebook can point it at another cache or server
without re-importing anything. Plain URLs are fetched by `finetune.download.download` (resumable,
retried, checked); Hugging Face files by `huggingface_hub.hf_hub_download` (which resumes and
retries itself), with our progress setting and one-line errors. Offline, nothing is attempted over
the network: a missing file is an immediate one-line error that says where it was looked for and how
to put it there.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import download as _download
from .download import offline  # noqa: F401 - re-exported: data.py and others import it from here
from .errors import FinetuneError


# ------------------------------------------------------------------------------ torch hub cache
def torch_hub_checkpoints() -> Path:
    """`$TORCH_HOME/hub/checkpoints`, where `torch.hub.load_state_dict_from_url` caches files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_url(ref: str, url: str, dest: Path, *, sha256: Optional[str] = None, hint: str = "",
              progress: Optional[bool] = None) -> Path:
    """`dest` if present, else download `url` there (resumable, checked, atomic). One-line error when impossible."""
    return _download.download(url, dest, sha256=sha256, ref=ref, hint=hint, progress=progress)


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


def hf_endpoint() -> str:
    """The Hub's address: HF_ENDPOINT read now (huggingface_hub.constants reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_file(ref: str, repo_id: str, filenames: Sequence[str], required: bool = True,
            revision: Optional[str] = None, progress: Optional[bool] = None) -> Optional[Path]:
    """Local path of the first of `filenames` in `repo_id`: from the cache, else downloaded.

    Offline, or when the download fails, a missing required file is a one-line error naming the
    cache folder, the URL, the status and how to fill it.
    """
    cached = hf_cached_file(repo_id, filenames) if revision is None else None
    if cached or offline():
        return cached or _hf_missing(ref, repo_id, filenames, required, "offline mode is on")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    reason = "not found"
    mode = _download.progress_mode(progress)
    options: Dict[str, Any] = {}
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:  # huggingface_hub >= 1.0
        options["tqdm_class"] = _download.tqdm_class(mode)
    for name in filenames:
        try:
            with _hf_bars_off(mode is None and not options):
                return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=str(hf_cache_dir()),
                                            etag_timeout=10, endpoint=hf_endpoint(), **options))
        except EntryNotFoundError:
            continue
        except HfHubHTTPError as e:
            reason = f"download failed: {_hf_status(e, repo_id, name, revision)}"
            break
        except (LocalEntryNotFoundError, OSError, ValueError) as e:
            cause = e.__cause__ or e.__context__ or e
            reason = (f"download of {hf_endpoint()}/{repo_id}/resolve/{revision or 'main'}/{name} failed: "
                      f"{type(cause).__name__}: {str(cause).splitlines()[0][:160] if str(cause) else ''}; "
                      "check the network or HF_ENDPOINT")
            break
    return _hf_missing(ref, repo_id, filenames, required, reason)


@contextlib.contextmanager
def _hf_bars_off(off: bool):
    """huggingface_hub's own bars off for one call (for versions whose hf_hub_download has no tqdm_class)."""
    if not off:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


def _hf_status(e, repo_id: str, name: str, revision: Optional[str]) -> str:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    url = str(getattr(response, "url", "") or f"{hf_endpoint()}/{repo_id}/resolve/{revision or 'main'}/{name}")
    advice = {401: "the repo is gated or private: run `hf auth login` (or set HF_TOKEN) with access to it",
              403: "access denied: accept the repo's terms on the Hub and log in (`hf auth login` / HF_TOKEN)",
              404: f"no repo {repo_id} or no such revision: check the name"}.get(status, "")
    return f"{url} answered HTTP {status or '?'} ({type(e).__name__}){'; ' + advice if advice else ''}"


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


def timm_fetch(ref: str, cfg: Dict[str, Any], progress: Optional[bool] = None) -> Path:
    """Download the file timm would load for pretrained cfg `cfg` (its Hub repo, else its URL)."""
    if cfg.get("hf_hub_id"):
        repo_id, _, revision = cfg["hf_hub_id"].partition("@")
        return hf_file(ref, repo_id, timm_hub_files(cfg), revision=revision or None, progress=progress)
    if cfg.get("url"):
        return fetch_url(ref, cfg["url"], timm_url_file(cfg["url"]), progress=progress)
    raise timm_missing_error(ref, cfg, "no download location")


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
