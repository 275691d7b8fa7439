"""Downloads through real HTTP servers on 127.0.0.1 (issue 15): resume, retries, checks, errors, progress.

Every source is served here: pytorch-pretrained-vit release files, Google's .npz, a timm tag (from
the Hub and from a plain URL), an hf: repo (the Hub's resolve protocol, for hf_hub_download) and
an Oxford-IIIT Pets archive fetched by torchvision's own download code. Nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------------------------ the servers
class Server:
    """A file server with Range support, and the Hub's `/{repo}/resolve/{revision}/{file}` protocol.

    files: URL path -> bytes. Knobs: drop_after[path] = n (the next GET sends n bytes, then hangs
    up), fail[path] = k (the next k GETs answer 503), rate (bytes/s, 0 = unthrottled).
    requests: (method, path, Range header) of every request seen.
    """

    def __init__(self):
        self.files, self.drop_after, self.fail, self.rate, self.requests = {}, {}, {}, 0, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.serve(body=False)

            def do_GET(self):
                self.serve(body=True)

            def serve(self, body: bool):
                path = self.path.split("?")[0]
                server.requests.append((self.command, path, self.headers.get("Range")))
                data = server.files.get(path)
                if data is None:
                    self.send_response(404)
                    if "/resolve/" in path:  # as the Hub answers: no such repo, or no such file in it
                        repo = path.split("/resolve/")[0] + "/"
                        known = any(p.startswith(repo) for p in server.files)
                        self.send_header("X-Error-Code", "EntryNotFound" if known else "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if body and server.fail.get(path):
                    server.fail[path] -= 1
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                    self.send_header("Accept-Ranges", "bytes")
                etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data) - start))
                if "/resolve/" in path:
                    self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                drop = server.drop_after.pop(path, None)
                if drop is not None:
                    payload = payload[:drop]
                step = 16384
                for i in range(0, len(payload), step):
                    try:
                        self.wfile.write(payload[i:i + step])
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    if server.rate:
                        time.sleep(step / server.rate)
                if drop is not None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def gets(self, path):
        return [r for r in self.requests if r[0] == "GET" and r[1] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    """A loopback server, with the test online (conftest holds every test offline) and no proxy."""
    for var in ("FINETUNE_OFFLINE", "HF_HUB_OFFLINE", "TQDM_DISABLE", "FINETUNE_NO_PROGRESS"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at its import
    s = Server()
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    # huggingface_hub 2.x builds its user agent from a registry it fetches from constants.ENDPOINT,
    # read once at its import (huggingface.co here, where HF_ENDPOINT is set only now; a user sets it
    # before starting): give it the empty registry it falls back to offline, so it asks nobody.
    import importlib
    try:
        detect_agent = importlib.import_module("huggingface_hub.utils._detect_agent")
        monkeypatch.setattr(detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    except ImportError:  # older huggingface_hub: no such call
        pass
    yield s
    s.close()


def randomize_(module):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def tiny_vit():
    import timm
    return randomize_(timm.create_model("test_vit", pretrained=False))  # timm's 0.37M-parameter ViT


def to_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def same_weights(model, reference) -> bool:
    ref = reference.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------ ppv: dropped connection resumes
def test_ppv_file_resumes_after_a_dropped_connection(server, monkeypatch, offline_caches):
    import finetune
    from finetune import convert, loading
    source = tiny_vit()
    data = to_bytes(convert.timm_to_ppv(source.state_dict()))  # pytorch-pretrained-vit's layout
    monkeypatch.setitem(loading.PPV_MODELS, "T_16_test", ("test_vit", 1000, 160))
    monkeypatch.setenv("FINETUNE_PPV_BASE_URL", server.url + "/ppv/0.0.2/")  # with a trailing slash
    server.files["/ppv/0.0.2/T_16_test.pth"] = data
    server.drop_after["/ppv/0.0.2/T_16_test.pth"] = len(data) // 3
    model = finetune.load_model("ppv:T_16_test")
    assert same_weights(model, source)
    gets = server.gets("/ppv/0.0.2/T_16_test.pth")
    assert [g[2] for g in gets] == [None, f"bytes={len(data) // 3}-"]  # the second asked for the rest
    path = offline_caches / "torch" / "hub" / "checkpoints" / "T_16_test.pth"
    assert path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["T_16_test.pth"]  # no .part, .json, .lock


# ------------------------------------------------------------------- npz: a 503 is retried
def test_npz_503_is_retried(server, monkeypatch, offline_caches):
    import finetune
    from test_loading import tiny_timm_vit, write_google_npz
    source = tiny_timm_vit(depth=1)
    npz = offline_caches / "ViT-T.npz"
    write_google_npz(npz, source)
    monkeypatch.setenv("FINETUNE_NPZ_BASE_URL", server.url + "/vit_models")  # without a trailing slash
    server.files["/vit_models/imagenet21k/ViT-T.npz"] = npz.read_bytes()
    server.fail["/vit_models/imagenet21k/ViT-T.npz"] = 1
    model = finetune.load_model("npz:imagenet21k/ViT-T.npz")
    assert same_weights(model, source)
    assert len(server.gets("/vit_models/imagenet21k/ViT-T.npz")) == 2
    cached = offline_caches / "torch" / "hub" / "checkpoints" / "vit_models" / "imagenet21k" / "ViT-T.npz"
    assert cached.read_bytes() == npz.read_bytes()


# ---------------------------------------------------------------------------- 404, DNS, checksum
def test_404_and_unknown_host_are_one_line(server, monkeypatch, offline_caches):
    import finetune
    from finetune.errors import FinetuneError
    from finetune import download
    monkeypatch.setenv("FINETUNE_PPV_BASE_URL", server.url + "/nowhere")
    with pytest.raises(FinetuneError) as err:
        finetune.load_model("ppv:B_16_imagenet1k")
    message = str(err.value)
    assert f"{server.url}/nowhere/B_16_imagenet1k.pth" in message and "HTTP 404" in message
    assert "FINETUNE_PPV_BASE_URL" in message and "\n" not in message
    assert not list((offline_caches / "torch" / "hub" / "checkpoints").glob("B_16*"))

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(FinetuneError, match=r"download of http://weights\.example/x\.pth failed: cannot resolve "
                                            r"host weights\.example .*proxy") as err:
        download.download("http://weights.example/x.pth", offline_caches / "x.pth", progress=False)
    assert "\n" not in str(err.value)


def test_checksums_sha256_argument_and_hash_prefix_in_the_name(server, offline_caches):
    from finetune import download
    from finetune.errors import FinetuneError
    data = os.urandom(50_000)
    digest = hashlib.sha256(data).hexdigest()
    server.files["/f.bin"] = data
    server.files[f"/w-{digest[:8]}.pth"] = data
    server.files["/w-deadbeef.pth"] = data
    out = offline_caches / "dl"
    assert download.download(server.url + "/f.bin", out / "f.bin", sha256=digest, progress=False).read_bytes() == data
    assert download.download(server.url + f"/w-{digest[:8]}.pth", out / f"w-{digest[:8]}.pth", progress=False).is_file()
    with pytest.raises(FinetuneError, match=r"sha256 .* does not match"):
        download.download(server.url + "/f.bin", out / "g.bin", sha256="0" * 64, progress=False)
    with pytest.raises(FinetuneError, match=r"w-deadbeef\.pth failed: sha256 .* does not match the expected deadbeef"):
        download.download(server.url + "/w-deadbeef.pth", out / "w-deadbeef.pth", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["f.bin", f"w-{digest[:8]}.pth"]  # nothing bad kept


# ----------------------------------------------------------------------------- timm: Hub and URL
def test_timm_tag_from_the_hub_and_from_a_url(server, monkeypatch, offline_caches):
    import timm
    from safetensors.torch import save
    import finetune
    tag = "test_vit.r160_in1k"
    source = tiny_vit()
    server.files[f"/timm/{tag}/resolve/main/model.safetensors"] = save(source.state_dict())
    model = finetune.load_model(f"timm:{tag}")
    assert same_weights(model, source)
    assert any(r[1].startswith(f"/timm/{tag}/resolve/main/") for r in server.requests)
    assert (offline_caches / "hf" / "hub" / f"models--timm--{tag}" / "snapshots" / COMMIT / "model.safetensors").is_file()

    # the same tag as timm registers those whose weights live at a URL (torch hub's name-<sha256>.pth)
    other = tiny_vit()
    with torch.no_grad():
        other.head.bias.add_(1.0)
    data = to_bytes(other.state_dict())
    name = f"test_vit-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server.files[f"/releases/{name}"] = data
    registered = timm.models._registry._model_pretrained_cfgs[tag]
    monkeypatch.setattr(registered, "hf_hub_id", None)
    monkeypatch.setattr(registered, "url", f"{server.url}/releases/{name}")
    model = finetune.load_model(f"timm:{tag}")
    assert same_weights(model, other)
    assert (offline_caches / "torch" / "hub" / "checkpoints" / name).read_bytes() == data


# ----------------------------------------------------------------------------------- hf: the Hub
def timm_to_hf(sd: dict) -> dict:
    """A timm ViT's weights in transformers' ViTForImageClassification layout (convert.hf_to_timm reversed)."""
    out = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"]}
    for part in ("weight", "bias"):
        out[f"vit.embeddings.patch_embeddings.projection.{part}"] = sd[f"patch_embed.proj.{part}"]
        out[f"vit.layernorm.{part}"], out[f"classifier.{part}"] = sd[f"norm.{part}"], sd[f"head.{part}"]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for part in ("weight", "bias"):
            for name, tensor in zip(("query", "key", "value"), sd[b + f"attn.qkv.{part}"].chunk(3)):
                out[h + f"attention.attention.{name}.{part}"] = tensor
            for theirs, ours in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                                 ("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                                 ("output.dense", "mlp.fc2")):
                out[h + f"{theirs}.{part}"] = sd[b + f"{ours}.{part}"]
        i += 1
    return {k: v.contiguous() for k, v in out.items()}


def test_hf_repo_from_the_hub(server, offline_caches):
    import timm
    from safetensors.torch import save
    import finetune
    source = randomize_(timm.models.vision_transformer.VisionTransformer(
        patch_size=8, embed_dim=64, depth=2, num_heads=4, img_size=32, num_classes=3))
    config = {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 256, "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6,
              "id2label": {"0": "cat", "1": "dog", "2": "fox"}}
    base = "/acme/vit-test/resolve/main/"
    server.files[base + "config.json"] = json.dumps(config).encode()
    server.files[base + "model.safetensors"] = save(timm_to_hf(source.state_dict()))
    server.files[base + "preprocessor_config.json"] = json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                  "image_std": [0.4, 0.5, 0.6]}).encode()
    model = finetune.load_model("hf:acme/vit-test")
    assert same_weights(model, source)
    assert model.finetune_info["class_names"] == ["cat", "dog", "fox"]
    assert model.finetune_info["data_config"]["mean"] == (0.1, 0.2, 0.3)
    with pytest.raises(finetune.FinetuneError) as err:  # a repo the server does not have
        finetune.load_model("hf:acme/missing")
    assert "acme/missing" in str(err.value) and "404" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------- torchvision's own download code
def pets_archives():
    """images.tar.gz and annotations.tar.gz in Oxford-IIIT Pets' layout: 2 breeds, 4 images each."""
    from PIL import Image

    def tar(members):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    images, lines = {}, []
    for label, breed in enumerate(("Abyssinian", "beagle"), start=1):
        for i in range(1, 5):
            jpg = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 60 * label, 0)).save(jpg, "JPEG")
            images[f"images/{breed}_{i}.jpg"] = jpg.getvalue()
            lines.append(f"{breed}_{i} {label} {label} 1")
    annotations = {"annotations/trainval.txt": "\n".join(lines).encode(),
                   "annotations/test.txt": "\n".join(lines[:2] + lines[4:6]).encode()}
    return tar(images), tar(annotations)


def test_oxford_pets_through_torchvisions_download(server, monkeypatch, tmp_path):
    import torchvision.datasets as tvd
    from finetune.data import build_datasets
    from finetune.errors import FinetuneError
    images, annotations = pets_archives()
    server.files["/pets/images.tar.gz"], server.files["/pets/annotations.tar.gz"] = images, annotations
    md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
    monkeypatch.setattr(tvd.OxfordIIITPet, "_RESOURCES", ((server.url + "/pets/images.tar.gz", md5(images)),
                                                          (server.url + "/pets/annotations.tar.gz", md5(annotations))))
    config = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}
    splits = build_datasets("oxford_pets", str(tmp_path / "data"), img_size=8, data_config=config, val_split=0.5)
    assert splits.class_names == ["Abyssinian", "Beagle"]
    assert len(splits.train) + len(splits.val) == 8 and len(splits.test) == 4
    assert splits.train[0][0].shape == (3, 8, 8)

    missing = server.url + "/gone/images.tar.gz"
    monkeypatch.setattr(tvd.OxfordIIITPet, "_RESOURCES", ((missing, md5(images)),))
    with pytest.raises(FinetuneError) as err:
        build_datasets("oxford_pets", str(tmp_path / "other"), img_size=8, data_config=config)
    message = str(err.value)
    assert message.startswith("oxford_pets: ") and missing in message and "HTTP 404" in message
    assert "place the files at" in message and "\n" not in message


# ------------------------------------------------------------- kill -9, progress: subprocesses
# The child imports finetune.download alone (stdlib + tqdm, no torch): a fraction of a second.
CHILD = """
import sys, types
pkg = types.ModuleType("finetune"); pkg.__path__ = [sys.argv[1] + "/finetune"]; sys.modules["finetune"] = pkg
from finetune.download import download
progress = {"on": True, "off": False, "default": None}[sys.argv[4]]
download(sys.argv[2], sys.argv[3], progress=progress)
print("done", flush=True)
"""


def child(url, dest, progress="default"):
    return [sys.executable, "-c", CHILD, str(REPO), url, str(dest), progress]


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "FINETUNE_NO_PROGRESS")}
    env.update(extra)
    return env


def test_kill_9_mid_download_then_the_same_call_completes(server, tmp_path):
    data = os.urandom(600_000)
    server.files["/big.bin"] = data
    server.rate = 400_000  # bytes/s: about 1.5 s for the whole file
    dest = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    proc = subprocess.Popen(child(server.url + "/big.bin", dest, "off"), env=child_env())
    deadline = time.time() + 20
    while time.time() < deadline and (not part.exists() or part.stat().st_size < 100_000):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dest.exists() and 0 < part.stat().st_size < len(data)
    server.rate = 0
    result = subprocess.run(child(server.url + "/big.bin", dest, "off"), env=child_env(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == data and not part.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]
    resumed = server.gets("/big.bin")[-1][2]
    assert resumed is not None and resumed.startswith("bytes=") and int(resumed[6:-1]) > 0


def run_under_pty(cmd, env) -> str:
    """Run `cmd` with stdout and stderr on a pseudo-terminal; all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=30)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_lines_in_a_log_nothing_when_off(server, tmp_path):
    server.files["/p.bin"] = os.urandom(300_000)
    server.rate = 1_000_000
    url = server.url + "/p.bin"
    tty = run_under_pty(child(url, tmp_path / "a.bin"), child_env())
    assert "done" in tty and "\r" in tty and "a.bin" in tty and "|" in tty and "B/s" in tty  # tqdm's bar

    log = subprocess.run(child(url, tmp_path / "b.bin"), env=child_env(), capture_output=True, text=True, timeout=30)
    assert log.returncode == 0 and "\r" not in log.stderr and "|" not in log.stderr
    assert "b.bin: " in log.stderr and "B/s" in log.stderr  # plain lines: name, size, rate

    for env, progress in ((child_env(FINETUNE_NO_PROGRESS="1"), "default"), (child_env(), "off")):
        quiet = run_under_pty(child(url, tmp_path / f"q{progress}.bin", progress), env)
        assert quiet.strip() == "done"
