"""Shared fixtures. Tests never touch the network: every hub is a temporary cache we fill."""
from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def measurement_cache(tmp_path_factory):
    """One cache of measured verdicts (precision: auto) for the whole session, never the user's."""
    return tmp_path_factory.mktemp("measurements")


@pytest.fixture(autouse=True)
def offline_caches(tmp_path_factory, monkeypatch, measurement_cache):
    """Every test runs offline against empty, private torch-hub and Hugging Face caches."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(measurement_cache))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FINETUNE_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return root


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
