"""Shared fixtures. Tests never touch the network: every hub is a temporary cache we fill."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DEIT_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
FLOWERS5 = SHARED / "data" / "flowers5"


def require_shared(*paths: Path) -> None:
    """Skip (with the reason) when the real data/weights of ../shared are not beside the checkout."""
    for path in paths:
        if not path.exists():
            pytest.skip(f"{path} is absent: real-data tests need ../shared beside the checkout (CI has it)")


_OUTSIDE_CONNECTIONS: list = []


def _is_loopback(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths, socketpairs
        return True
    host = str(address[0]).lower()
    return host.startswith("127.") or host in ("::1", "localhost", "::ffff:127.0.0.1")


@pytest.fixture(scope="session", autouse=True)
def _loopback_only():
    """The suite may open no connection but to 127.0.0.1 (issue 15): every connect and name lookup
    of this process is checked; one to anywhere else is refused and fails the test that made it,
    even where the code under test would have swallowed the error."""
    import socket
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def refuse(what):
        import traceback
        _OUTSIDE_CONNECTIONS.append(what)
        print(f"refused a connection to {what}, from:\n{''.join(traceback.format_stack(limit=40)[:-2])}",
              file=sys.stderr)
        return ConnectionRefusedError(f"the test suite reaches only 127.0.0.1, not {what}")

    def connect(self, address):
        if not _is_loopback(address):
            raise refuse(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _is_loopback(address):
            raise refuse(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback((host if isinstance(host, str) else host.decode(),)):
            raise socket.gaierror(socket.EAI_NONAME, str(refuse(host)))
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    yield
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = real_connect, real_connect_ex, real_getaddrinfo


@pytest.fixture(autouse=True)
def _no_outside_connection():
    before = len(_OUTSIDE_CONNECTIONS)
    yield
    tried = _OUTSIDE_CONNECTIONS[before:]
    assert not tried, f"this test tried to reach {tried}: tests may reach only 127.0.0.1"


@pytest.fixture(scope="session")
def measurement_cache(tmp_path_factory):
    """One cache of measured verdicts (precision: auto) for the whole session, never the user's."""
    return tmp_path_factory.mktemp("measurements")


def _go_private(monkeypatch, root: Path, measurement_cache: Path) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(measurement_cache))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FINETUNE_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return root


@pytest.fixture(scope="session", autouse=True)
def _offline_session(tmp_path_factory, measurement_cache):
    """offline_caches for the module- and session-scoped fixtures too: pytest sets those up before any
    function-scoped fixture, so without this they trained with the user's caches and hubs online."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _go_private(monkeypatch, tmp_path_factory.mktemp("session-caches"), measurement_cache)


@pytest.fixture(autouse=True)
def offline_caches(tmp_path_factory, monkeypatch, measurement_cache):
    """Every test runs offline against empty, private torch-hub and Hugging Face caches."""
    return _go_private(monkeypatch, tmp_path_factory.mktemp("caches"), measurement_cache)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def place_in_hf_cache(hf_home: Path, repo_id: str, files: dict) -> Path:
    """Lay files out as huggingface_hub's cache does: models--org--name/{refs/main,snapshots/<rev>/}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    for name, source in files.items():
        target = snapshot / name
        if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
            os.symlink(Path(source).resolve(), target)
        else:
            target.write_bytes(source if isinstance(source, bytes) else str(source).encode())
    return snapshot


def run_entry(entry, args, capsys):
    """Run a CLI entry point (finetune.cli.main, soup.run_cli, ...) in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        entry([str(a) for a in args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def finetune_out(args, capsys) -> str:
    """`finetune ARGS` in-process, which must exit 0; its stdout (stdout/stderr read before it are dropped)."""
    from finetune.cli import main
    capsys.readouterr()
    code, out, err = run_entry(main, args, capsys)
    assert code == 0, err
    return out
