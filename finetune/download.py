"""One download function for every plain-URL source (pytorch-pretrained-vit, Google's .npz, timm URL tags).

    download(url, dest, sha256=None, progress=None) -> dest

What it adds to urllib (whose default opener keeps the proxies of the environment: HTTP(S)_PROXY,
NO_PROXY) and to `torch.hub.download_url_to_file` (which has no resume and no retries):

- the bytes go to `<dest>.part` beside the real name, and are resumed with an HTTP Range request
  (guarded by If-Range with the first response's ETag / Last-Modified, kept in `<dest>.part.json`)
  after a dropped connection, a timeout, a Ctrl-C or a `kill -9`: the same call again continues it;
- timeouts, 5xx/408/429 answers and dropped connections are retried with exponential backoff
  (Retry-After honoured); attempts start over whenever bytes arrived;
- the size is checked against Content-Length / Content-Range, and a checksum where there is one:
  the caller's `sha256`, and torch hub's convention of a sha256 prefix in the file name
  (`name-<hex>.pth`, `torch.hub.HASH_REGEX`); only then is the file moved under its real name
  (`os.replace`), so a file under the real name is always complete and checked;
- processes fetching the same file wait for each other (a file lock beside it);
- a progress bar (tqdm: size, rate) on a terminal, one line every few seconds otherwise, nothing
  when progress is off: `progress=False`, `set_progress(False)` (the CLI's --no-progress) or
  FINETUNE_NO_PROGRESS=1 (TQDM_DISABLE=1 silences the bar too);
- one-line FinetuneErrors naming the URL, the status and what to do (403, 404, unknown host, ...).

Settings (read at call time): FINETUNE_PPV_BASE_URL, FINETUNE_NPZ_BASE_URL (the folder a file's name
is appended to), FINETUNE_DOWNLOAD_RETRIES (default 5), FINETUNE_DOWNLOAD_TIMEOUT (seconds, default
30), FINETUNE_OFFLINE / HF_HUB_OFFLINE (no network at all).

This module imports only the standard library and tqdm.
"""
from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

from .errors import FinetuneError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, the rest works
    fcntl = None  # type: ignore[assignment]

DEFAULT_PPV_BASE_URL = "https://github.com/lukemelas/PyTorch-Pretrained-ViT/releases/download/0.0.2/"
DEFAULT_NPZ_BASE_URL = "https://storage.googleapis.com/vit_models/"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 5
BACKOFF_S = 1.0          # first wait; doubled per failed attempt, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0
LINE_INTERVAL_S = 5.0    # progress lines when stderr is not a terminal
CHUNK = 1 << 16
# torch hub's convention (torch.hub.HASH_REGEX): `name-<sha256 prefix>.ext`. Eight or more hex digits,
# so that a name such as `model-1.0.pth` is not read as a checksum.
HASH_REGEX = re.compile(r"-([a-f0-9]{8,64})\.")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}

_progress_default: Optional[bool] = None


# --------------------------------------------------------------------------------------- settings
def offline() -> bool:
    """True when the user asked for no network (FINETUNE_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    return any(_truthy(os.environ.get(v)) for v in ("FINETUNE_OFFLINE", "HF_HUB_OFFLINE"))


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def set_progress(enabled: Optional[bool]) -> None:
    """Progress output of every later download in this process (the CLI's --no-progress: False).

    None goes back to the default (on unless FINETUNE_NO_PROGRESS=1). False also sets
    FINETUNE_NO_PROGRESS=1, so processes started from this one (DDP workers) stay quiet too.
    """
    global _progress_default
    _progress_default = enabled
    if enabled is False:
        os.environ["FINETUNE_NO_PROGRESS"] = "1"


def progress_mode(progress: Optional[bool] = None, stream=None) -> Optional[str]:
    """'bar' (a terminal), 'lines' (a log) or None (off), from the argument, set_progress and the env."""
    if progress is None:
        progress = _progress_default
    if progress is None:
        progress = not (_truthy(os.environ.get("FINETUNE_NO_PROGRESS")) or _truthy(os.environ.get("TQDM_DISABLE")))
    if not progress:
        return None
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


def base_url(variable: str, default: str) -> str:
    """The folder URL in environment variable `variable` (or `default`), ending with one slash."""
    return (os.environ.get(variable, "").strip() or default).rstrip("/") + "/"


def ppv_url(name: str) -> str:
    """A pytorch-pretrained-vit release file: `$FINETUNE_PPV_BASE_URL<name>.pth`."""
    return base_url("FINETUNE_PPV_BASE_URL", DEFAULT_PPV_BASE_URL) + f"{name}.pth"


def npz_url(location: str) -> str:
    """A Google ViT file: `$FINETUNE_NPZ_BASE_URL<location>` (e.g. imagenet21k/ViT-B_16.npz)."""
    return base_url("FINETUNE_NPZ_BASE_URL", DEFAULT_NPZ_BASE_URL) + location.lstrip("/")


# ---------------------------------------------------------------------------------------- progress
def tqdm_class(mode: Optional[str]):
    """A tqdm class for `mode` (also handed to huggingface_hub's hf_hub_download as `tqdm_class`)."""
    from tqdm.auto import tqdm as base
    from tqdm.std import tqdm as std_tqdm

    if mode == "bar":
        class BarTqdm(base):
            def __init__(self, *args, **kwargs):
                kwargs.pop("name", None)  # huggingface_hub < 1.0 passes its bars a name
                super().__init__(*args, **kwargs)
        return BarTqdm
    if mode == "lines":
        class LineTqdm(std_tqdm):
            """One plain line every LINE_INTERVAL_S seconds and one at the end: readable in a log."""

            def __init__(self, *args, **kwargs):
                kwargs.pop("name", None)
                kwargs.update(mininterval=LINE_INTERVAL_S, maxinterval=LINE_INTERVAL_S, miniters=0, file=sys.stderr,
                              bar_format="{desc}: {n_fmt}{unit} of {total_fmt}{unit} [{elapsed}, {rate_fmt}]")
                kwargs.pop("dynamic_ncols", None)
                super().__init__(*args, **kwargs)

            def display(self, msg=None, pos=None):
                if self.disable:
                    return True
                self.fp.write((msg or str(self)).strip() + "\n")
                self.fp.flush()
                return True
        return LineTqdm

    class QuietTqdm(std_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
    return QuietTqdm


# ---------------------------------------------------------------------------------------- download
def download(url: str, dest: Union[str, Path], *, sha256: Optional[str] = None, progress: Optional[bool] = None,
             ref: Optional[str] = None, hint: str = "", timeout: Optional[float] = None,
             retries: Optional[int] = None, backoff: Optional[float] = None, check_hash_prefix: bool = True) -> Path:
    """`dest`, downloaded from `url` if it is not there yet (see the module docstring).

    `ref` prefixes error messages (the model ref being loaded); `hint` is appended to them (e.g.
    which setting changes the URL). `sha256` is the full hex digest the file must have.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    who = f"{ref}: " if ref else ""
    place = f"or download {url} on a machine with network and place it at {dest}"
    if offline():
        raise FinetuneError(f"{who}{dest.name} is not cached at {dest} and offline mode is on "
                            f"(FINETUNE_OFFLINE / HF_HUB_OFFLINE); unset it, {place}")
    timeout = float(os.environ.get("FINETUNE_DOWNLOAD_TIMEOUT") or DEFAULT_TIMEOUT_S) if timeout is None else timeout
    retries = int(os.environ.get("FINETUNE_DOWNLOAD_RETRIES") or DEFAULT_RETRIES) if retries is None else retries
    backoff = BACKOFF_S if backoff is None else backoff
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        if dest.is_file():  # another process finished it while we waited
            return dest
        job = _Job(url, dest, who, place, hint, timeout, progress_mode(progress))
        job.run(retries, backoff)
        job.verify(sha256, check_hash_prefix)
        os.replace(job.part, dest)
        _fsync_dir(dest.parent)
        job.meta_path.unlink(missing_ok=True)
    return dest


class _Retry(Exception):
    """A transient failure: wait and try again (resuming the .part)."""

    def __init__(self, reason: str, wait: Optional[float] = None):
        super().__init__(reason)
        self.wait = wait


class _Job:
    def __init__(self, url, dest: Path, who, place, hint, timeout, mode):
        self.url, self.dest, self.who, self.place, self.hint, self.timeout, self.mode = (
            url, dest, who, place, hint, timeout, mode)
        self.part = dest.with_name(dest.name + ".part")
        self.meta_path = dest.with_name(dest.name + ".part.json")
        self.total: Optional[int] = None
        self.bar = None
        self.opener = urllib.request.build_opener()  # ProxyHandler() among its defaults: env proxies

    # ------------------------------------------------------------------ the loop
    def run(self, retries: int, backoff: float) -> None:
        failures = 0
        try:
            while True:
                before = self._size()
                try:
                    if self._attempt():
                        return
                    raise _Retry(f"connection closed after {self._size()} of {self.total} bytes")
                except _Retry as e:
                    if self._size() > before:  # bytes arrived: resume at once, with a fresh set of attempts
                        failures = 0
                        e.wait = 0.0 if e.wait is None else e.wait
                    failures += 1
                    if failures > retries:
                        kept = f" (the {self._size()} bytes in {self.part.name} are resumed)" if self._size() else ""
                        raise self._error(f"failed after {retries} retries ({e})",
                                          f"try again later{kept}, {self.place}") from None
                    wait = e.wait if e.wait is not None else min(MAX_BACKOFF_S, backoff * 2 ** (failures - 1))
                    time.sleep(max(0.0, min(wait, MAX_BACKOFF_S)))
        finally:
            if self.bar is not None:
                self.bar.close()

    def _attempt(self) -> bool:
        """One request; True when the .part holds the whole file."""
        have = self._size()
        meta = self._read_meta() if have else {}
        if have and meta.get("url") != self.url:
            have = self._restart()
        headers = {"User-Agent": "finetune (python-urllib)", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if meta.get("etag") or meta.get("last_modified"):
                headers["If-Range"] = meta.get("etag") or meta["last_modified"]
        try:
            response = self.opener.open(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as e:
            with e:
                return self._http_error(e, have)
        except urllib.error.URLError as e:
            raise self._url_error(e.reason) from None
        except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        with response:
            if response.status == 206 and have:
                start, _, total = _content_range(response.headers.get("Content-Range"))
                if start != have:
                    self._restart()
                    raise _Retry(f"the server resumed at byte {start}, not {have}", wait=0)
                self.total = total if total is not None else self.total or meta.get("total")
                mode = "ab"
            else:  # 200: the whole file (a server without Range support, or the file changed: If-Range)
                length = response.headers.get("Content-Length")
                self.total = int(length) if length and length.isdigit() else None
                self._restart()
                self._write_meta(response.headers)
                have, mode = 0, "wb"
            self._start_bar(have)
            self._copy(response, mode)
        size = self._size()
        if self.total is None:
            return True  # no length announced: what arrived up to a clean close is the file
        if size > self.total:
            self._restart()
            raise _Retry(f"received {size} bytes, more than the announced {self.total}", wait=0)
        return size == self.total

    def _copy(self, response, mode: str) -> None:
        with open(self.part, mode) as f:
            try:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    if self.bar is not None:
                        self.bar.update(len(chunk))
            except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
                raise _Retry(f"{type(e).__name__} after {f.tell()} bytes") from None
            finally:
                f.flush()
                os.fsync(f.fileno())

    # ------------------------------------------------------------------ failures
    def _http_error(self, e: urllib.error.HTTPError, have: int) -> bool:
        if e.code == 416 and have:  # Range not satisfiable: the .part may hold the whole file already
            _, _, total = _content_range(e.headers.get("Content-Range"))
            if total is not None and total == have:
                self.total = total
                return True
            self._restart()
            raise _Retry("the server refused to resume (HTTP 416); starting over", wait=0)
        if e.code in RETRY_STATUS:
            raise _Retry(f"HTTP {e.code} {e.reason}", wait=_retry_after(e.headers.get("Retry-After")))
        advice = {
            401: "the file needs credentials; download it in a browser",
            403: "access denied: the file is private, the link expired or a proxy blocks it; "
                 "download it in a browser",
            404: "no such file: the URL is wrong or the file moved",
            410: "the file was removed from the server",
        }.get(e.code, "the server refused the request")
        raise self._error(f"HTTP {e.code} {e.reason}", f"{advice}; {self._hint_and_place()}")

    def _url_error(self, reason) -> Exception:
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlsplit(self.url).hostname
            return self._error(f"cannot resolve host {host} ({reason.strerror or reason})",
                               "check the network, DNS or the proxy (HTTPS_PROXY / HTTP_PROXY); "
                               f"{self._hint_and_place()}")
        if isinstance(reason, (socket.timeout, TimeoutError, ConnectionError, OSError)):
            return _Retry(f"{type(reason).__name__}: {reason}")
        return self._error(str(reason), self._hint_and_place())

    def _hint_and_place(self) -> str:
        return f"{self.hint + ', ' if self.hint else ''}{self.place}"

    def _error(self, what: str, todo: str) -> FinetuneError:
        return FinetuneError(f"{self.who}download of {self.url} failed: {what}; {todo}")

    # ------------------------------------------------------------------ checks
    def verify(self, sha256: Optional[str], check_hash_prefix: bool) -> None:
        size = self._size()
        if self.total is not None and size != self.total:  # pragma: no cover - run() guarantees it
            raise self._error(f"{size} of {self.total} bytes", "try again")
        prefix = HASH_REGEX.search(self.dest.name) if check_hash_prefix else None
        if not sha256 and not prefix:
            return
        digest = hashlib.sha256()
        with open(self.part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        actual = digest.hexdigest()
        expected = (sha256 or "").lower() or prefix.group(1)
        if not actual.startswith(expected) or (sha256 and prefix and not actual.startswith(prefix.group(1))):
            self._restart()
            raise self._error(f"sha256 {actual[:16]}... does not match the expected {expected[:16]}... "
                              "(the download was corrupted or the file changed); the partial file was removed",
                              f"try again, {self.place}")

    # ------------------------------------------------------------------ files
    def _size(self) -> int:
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def _restart(self) -> int:
        self.part.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        if self.bar is not None:
            self.bar.reset(total=self.total)
        return 0

    def _read_meta(self) -> Dict[str, Any]:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_meta(self, headers) -> None:
        meta = {"url": self.url, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
                "total": self.total}
        self.meta_path.write_text(json.dumps(meta))

    def _start_bar(self, have: int) -> None:
        if self.mode is None:
            return
        if self.bar is None:
            self.bar = tqdm_class(self.mode)(total=self.total, initial=have, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=self.dest.name, dynamic_ncols=True)
        elif self.bar.total != self.total:
            self.bar.total = self.total


def _content_range(value: Optional[str]):
    """(start, end, total) of a Content-Range header ('bytes 100-199/1000', 'bytes */1000')."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None, None
    start, end, total = m.groups()
    return (int(start) if start else None, int(end) if end else None, int(total) if total and total != "*" else None)


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@contextmanager
def _lock(dest: Path) -> Iterator[None]:
    """Exclusive use of `dest`'s .part among processes (the kernel drops the lock if one dies)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = dest.with_name(dest.name + ".part.lock")
    while True:
        f = open(path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:  # the holder before us may have removed the file: then lock the new one
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
