#!/usr/bin/env python
"""`make gpu-check`: everything a CUDA machine must confirm, in one script, in under 8 minutes.

    python tools/gpu_check.py [--shared PATH] [--out gpu-check.md] [--work DIR] [--budget 470]
    python tools/gpu_check.py --cpu-smoke        # no GPU: the same plumbing, tiny, on the CPU

Parts, each a subprocess with its own time limit (and all of them within --budget seconds, so one
hang cannot eat the rest; a part that runs out of time is killed with its whole process group):

  0. environment  torch, its CUDA build, the device, bf16 support (a probe in its own process)
  1. cuda tests   `pytest -m cuda tests/test_cuda.py`: scoring CUDA vs CPU, bf16 autocast step, fp16 +
                  grad scaler, fused optimizer vs a float64 reference, pinned loaders, torch.compile,
                  a tiny `engine.train` run
  2. bench        `finetune bench --model B_16 --img-size 384 --batch-size 64 --device cuda --json`:
                  img/s beside the baselines, MFU vs the measured bf16 matmul peak and vs the card's
                  datasheet peak, eval img/s, step memory
  3. fine-tune    `finetune train hymenoptera-deit-tiny --set epochs=2`, then `finetune soup RUN
                  --method greedy` and `finetune eval SOUP`, on the real DeiT-Tiny weights and photos
                  of ../shared (or --shared PATH; skipped with the reason when absent)

It ends by printing one markdown table (part, status, seconds, key numbers), also written to --out,
and exits 1 if any part failed (0 when every part passed or was skipped; with --require-cuda a
machine without CUDA counts as a failure). Logs of every part are under --work/logs.

Without CUDA it says so and skips every part, unless --cpu-smoke: then each part runs for real at
a tiny size on the CPU (the cuda tests, which skip there; a bench of a tiny `scratch:` ViT; the
fine-tune with 2 steps per epoch), which checks the script itself. Standard library only: the
parts run under the project's virtualenv (.venv/bin/python, or --python).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
DEIT = Path("weights") / "deit_tiny_patch16_224.fb_in1k.safetensors"
HYMENOPTERA = Path("data") / "hymenoptera_data"
TINY_VIT = "scratch:patch_size=4,embed_dim=32,depth=2,num_heads=2,mlp_ratio=2"
BUDGET_S = 470          # the whole check, under 8 minutes with room for the start-up of the parts
MIN_PART_S = 15         # a part is not started with less time than this left
# Per-part ceilings (seconds). Expected on an H200 (not measured yet): environment 5-10,
# tests 60-120 (most of it torch.compile), bench 45-90, train 30-60, soup 10-20, eval 10-15.
LIMITS = {"environment": 90, "tests": 240, "bench": 200, "train": 200, "soup": 100, "eval": 90}

PROBE = r"""
import json, torch
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available()}
if info["cuda"]:
    props = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                capability="sm_%d%d" % torch.cuda.get_device_capability(0),
                memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


@dataclass
class Part:
    name: str
    status: str = "skipped"          # ok | failed | skipped
    why: str = ""
    seconds: float = 0.0
    numbers: str = ""
    log: Optional[Path] = None
    details: List[str] = field(default_factory=list)

    def cell(self) -> str:
        return self.status + (f": {self.why}" if self.why else "")


# ================================================================================= processes
class Runner:
    """Runs each part's command in its own process group, within the part's limit and the budget."""

    def __init__(self, python: str, work: Path, budget_s: float, env: Dict[str, str]):
        self.python, self.work, self.env = python, work, env
        self.deadline = time.monotonic() + budget_s
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, part: Part, key: str, args: Sequence[str], limit: float, label: Optional[str] = None):
        """(return code or None on timeout, stdout text, stderr text); times `part`. `label` stands
        for the arguments in the printed command line."""
        timeout = min(limit, self.left())
        log = self.work / "logs" / f"{key}.log"
        part.log = log
        command = [self.python, *args]
        shown = " ".join(_quote(a) for a in ([self.python, label] if label else command))
        print(f"[gpu-check] {part.name}: {shown}  (limit {timeout:.0f} s, log {_rel(log)})", flush=True)
        began = time.monotonic()
        out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
        with open(out_path, "w") as out, open(err_path, "w") as err:
            process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code: Optional[int] = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop(process)
                code = None
            except KeyboardInterrupt:
                _stop(process)
                raise
        part.seconds += time.monotonic() - began
        stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        log.write_text(f"$ {shown}\n# exit {code if code is not None else 'killed: time limit'} after "
                       f"{time.monotonic() - began:.1f} s\n## stdout\n{stdout}\n## stderr\n{stderr}")
        out_path.unlink()
        err_path.unlink()
        if code is None:
            part.details.append(f"{key}: killed after the {timeout:.0f} s limit")
        elif code != 0:
            part.details.append(f"{key}: exit {code}; last lines:\n" + _tail(stderr or stdout))
        return code, stdout, stderr


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (a training run saves its resume point), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _json_of(stdout: str) -> Optional[dict]:
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        return json.loads(stdout[start:])
    except json.JSONDecodeError:
        return None


def _failed(part: Part, code: Optional[int], what: str) -> None:
    part.status = "failed"
    part.why = f"{what} killed at its time limit" if code is None else f"{what} exited {code}"


def _out_of_time(runner: Runner, part: Part) -> bool:
    if runner.left() < MIN_PART_S:
        part.status, part.why = "skipped", "the time budget is spent"
        return True
    return False


# ===================================================================================== parts
def environment(runner: Runner) -> tuple:
    part = Part("0. environment")
    code, stdout, _ = runner.run(part, "environment", ["-c", PROBE], LIMITS["environment"],
                                 label="-c <probe: torch, CUDA, device>")
    info = _json_of(stdout) if code == 0 else None
    if info is None:
        _failed(part, code, "the torch probe")
        return part, {}
    part.status = "ok"
    build = f"torch {info['torch']} (CUDA build {info['cuda_build'] or 'none'})"
    if info["cuda"]:
        part.numbers = (f"{build}; {info['device']} x{info['count']}, {info['capability']}, {info['memory_gib']} GiB, "
                        f"bf16 {'yes' if info['bf16'] else 'no'}")
    else:
        part.numbers = f"{build}; no CUDA device (torch.cuda.is_available() is False)"
    return part, info


def cuda_tests(runner: Runner, has_cuda: bool) -> Part:
    part = Part("1. cuda tests (`pytest -m cuda tests/test_cuda.py`)")
    if _out_of_time(runner, part):
        return part
    junit = runner.work / "cuda-tests.xml"
    code, stdout, stderr = runner.run(part, "tests", ["-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/test_cuda.py",
                                                      "-p", "no:cacheprovider", f"--junitxml={junit}"],
                                      LIMITS["tests"])
    counts = _junit_counts(junit)
    if counts is None:
        _failed(part, code, "pytest")
        part.numbers = "no test report"
        return part
    passed, failed, skipped, failures = counts
    part.numbers = f"{passed} passed, {failed} failed, {skipped} skipped"
    if failures:
        part.numbers += " (" + ", ".join(failures[:4]) + (", ..." if len(failures) > 4 else "") + ")"
    if code is None:
        _failed(part, code, "pytest")
    elif failed:
        part.status, part.why = "failed", f"{failed} test(s) failed"
    elif code != 0:
        _failed(part, code, "pytest")
    elif passed == 0:
        part.status = "skipped"
        part.why = ("no CUDA device: every test skipped with its reason" if not has_cuda
                    else "every test skipped on a CUDA machine (see the log)")
    else:
        part.status = "ok"
    return part


def _junit_counts(path: Path):
    """(passed, failed, skipped, names of failed tests) from pytest's junit XML, or None."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = failed = skipped = 0
    names: List[str] = []
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                names.append(case.get("name", "?"))
    return total - failed - skipped, failed, skipped, names


def bench(runner: Runner, smoke: bool, steps: int) -> Part:
    if smoke:
        part = Part("2. bench (smoke: tiny scratch ViT, 16 px, batch 8, CPU)")
        args = ["--model", TINY_VIT, "--img-size", "16", "--batch-size", "8", "--device", "cpu", "--steps", "2",
                "--warmup", "1"]
    else:
        part = Part("2. bench B_16 @ 384, batch 64")
        args = ["--model", "B_16", "--img-size", "384", "--batch-size", "64", "--device", "cuda", "--steps", str(steps),
                "--warmup", "2"]
    if _out_of_time(runner, part):
        return part
    code, stdout, _ = runner.run(part, "bench", ["-m", "finetune", "bench", *args, "--json"], LIMITS["bench"])
    result = _json_of(stdout) if code == 0 else None
    if result is None:
        _failed(part, code, "finetune bench")
        if code == 0:
            part.why = "finetune bench printed no JSON"
        return part
    part.status = "ok"
    part.numbers = _bench_numbers(result)
    (runner.work / "bench.json").write_text(json.dumps(result, indent=2))
    return part


def _bench_numbers(r: dict) -> str:
    def num(key: str, fmt: str) -> Optional[str]:
        value = r.get(key)
        return None if value is None else format(value, fmt)

    items = [f"engine {num('engine_img_s', '.4g')} img/s ({r.get('precision')}, {r.get('attention')} attention)"]
    if r.get("mfu") is not None:
        peak = r.get("matmul_peak_flops")
        items.append(f"MFU {r['mfu']:.1%} of the measured matmul peak"
                     + (f" ({_si(peak, 'FLOP/s')})" if peak else ""))
    if r.get("mfu_card") is not None:
        items.append(f"{r['mfu_card']:.1%} of the card's bf16 peak ({_si(r['card_peak_flops'], 'FLOP/s')})")
    elif str(r.get("device", "")).startswith("cuda"):
        items.append("card not in bench.CARD_BF16_PEAK: no card MFU")
    for key, label in (("engine_vs_timm_bf16", "timm bf16"), ("engine_vs_timm_fp32", "timm fp32"),
                       ("engine_vs_ppv_fp32", "ppv fp32")):
        if r.get(key) is not None:
            items.append(f"{r[key]:.2f}x {label}")
    if r.get("eval_img_s") is not None:
        items.append(f"eval {r['eval_img_s']:.4g} img/s")
    if r.get("peak_memory_bytes") is not None:
        items.append(f"step peak {_si(r['peak_memory_bytes'], 'B', 1024)} above the weights + optimizer")
    return "; ".join(items)


def _si(value: float, unit: str, base: int = 1000) -> str:
    steps = (("T", 4), ("G", 3), ("M", 2), ("k", 1)) if base == 1000 else (("Ti", 4), ("Gi", 3), ("Mi", 2), ("Ki", 1))
    for prefix, power in steps:
        if abs(value) >= base ** power:
            return f"{value / base ** power:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def shared_root(given: Optional[str]) -> Optional[Path]:
    """--shared, else ./shared, else ../shared (beside the checkout): the first that holds the
    DeiT-Tiny weights and the hymenoptera photos."""
    candidates = [Path(given)] if given else [REPO / "shared", REPO.parent / "shared"]
    for root in candidates:
        if (root / DEIT).is_file() and (root / HYMENOPTERA).is_dir():
            return root.resolve()
    return None


def finetune(runner: Runner, smoke: bool, shared: Optional[Path], shared_given: Optional[str],
             device: str) -> List[Part]:
    train = Part("3a. train hymenoptera-deit-tiny, 2 epochs" + (" (smoke: 2 steps of 8 an epoch, CPU)" if smoke else ""))
    soup = Part("3b. greedy soup of the run's best checkpoints")
    score = Part("3c. eval of the soup")
    parts = [train, soup, score]
    if shared is None:
        where = shared_given or f"{REPO / 'shared'} or {REPO.parent / 'shared'}"
        train.why = f"no ../shared: {DEIT} and {HYMENOPTERA}/ not found under {where} (give --shared PATH)"
        soup.why = score.why = "no shared folder (see 3a)"
        return parts
    if _out_of_time(runner, train):
        return parts
    run_dir = runner.work / "hymenoptera-deit-tiny"
    overrides = ["epochs=2", f"model={shared / DEIT}", f"data.root={shared / HYMENOPTERA}"]
    if smoke:
        overrides += ["max_steps_per_epoch=2", "batch_size=8", "data.workers=0"]
    args = ["-m", "finetune", "train", "hymenoptera-deit-tiny", *[a for o in overrides for a in ("--set", o)],
            "--out", str(run_dir), "--no-progress"] + (["--no-pictures"] if smoke else [])
    code, stdout, _ = runner.run(train, "train", args, LIMITS["train"])
    rows = _metrics(run_dir)
    if code != 0 or not rows:
        _failed(train, code, "finetune train")
        if code == 0:
            train.why = "finetune train wrote no metrics.jsonl rows"
        soup.why = score.why = "the fine-tune failed"
        return parts
    train.status = "ok"
    best = re.search(r"best val top-1 ([0-9.]+) at epoch (\d+)(?:, test top-1 ([0-9.]+))?", stdout)
    val = ", ".join(f"{r.get('val_top1', float('nan')):.4f}" for r in rows)
    train.numbers = (f"val top-1 by epoch {val}" + (f"; best {best.group(1)} (epoch {best.group(2)})" if best else "")
                     + f"; {rows[-1].get('images_per_s', float('nan')):.4g} img/s in training")
    train.numbers += (f"; test top-1 {best.group(3)}" if best and best.group(3)
                      else "; test top-1 n/a (hymenoptera has train/val only)")

    if _out_of_time(runner, soup):
        score.why = "the time budget is spent"
        return parts
    soup_path = runner.work / "soup-greedy.safetensors"
    code, stdout, _ = runner.run(soup, "soup", ["-m", "finetune", "soup", str(run_dir), "--method", "greedy",
                                                "-o", str(soup_path), "--device", device], LIMITS["soup"])
    if code != 0 or not soup_path.is_file():
        _failed(soup, code, "finetune soup")
        score.why = "the soup failed"
        return parts
    soup.status = "ok"
    soup_val = re.search(r"soup val top-1: ([0-9.]+)", stdout)
    kept = re.search(r"^kept: (.*)$", stdout, re.M)
    ingredients = re.search(r"greedy soup of (\d+) checkpoints", stdout)
    soup.numbers = (f"soup val top-1 {soup_val.group(1) if soup_val else '?'}"
                    + (f"; kept {len(kept.group(1).split(', '))} of {ingredients.group(1)}" if kept and ingredients
                       else ""))

    if _out_of_time(runner, score):
        return parts
    split = "test" if (shared / HYMENOPTERA / "test").is_dir() else "val"
    code, stdout, _ = runner.run(score, "eval", ["-m", "finetune", "eval", str(soup_path), "--split", split,
                                                 "--device", device, "--json"], LIMITS["eval"])
    report = _json_of(stdout) if code == 0 else None
    if report is None:
        _failed(score, code, "finetune eval")
        return parts
    score.status = "ok"
    score.numbers = f"{split} top-1 {report['top1']:.4f} ({report['n']} images)"
    if split == "val":
        score.numbers += "; test top-1 n/a (hymenoptera has no test split)"
        if soup_val:
            same = abs(report["top1"] - float(soup_val.group(1))) < 0.5 / max(report["n"], 1)
            score.numbers += "; equals the soup's own score" if same else f"; differs from the soup's {soup_val.group(1)}"
    return parts


def _metrics(run_dir: Path) -> List[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


# ==================================================================================== report
def table(parts: Sequence[Part]) -> str:
    def clean(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| part | status | seconds | key numbers |", "| --- | --- | ---: | --- |"]
    lines += [f"| {clean(p.name)} | {clean(p.cell())} | {p.seconds:.1f} | {clean(p.numbers)} |" for p in parts]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--shared", default=None, metavar="PATH",
                        help="the shared folder (weights/, data/); default ./shared, else ../shared")
    parser.add_argument("--out", default="gpu-check.md", help="where to write the table (default gpu-check.md)")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="folder for the run, the soup and the logs (default runs/gpu-check-<time>)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the CPU-safe parts for real at a tiny size on the CPU (checks the plumbing)")
    parser.add_argument("--require-cuda", action="store_true", help="count a machine without CUDA as a failure")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S})")
    parser.add_argument("--bench-steps", type=int, default=10, help="timed rounds of the B_16 bench (default 10)")
    parser.add_argument("--python", default=None,
                        help="interpreter of the parts (default .venv/bin/python of the checkout, else this one)")
    args = parser.parse_args(argv)

    venv_python = REPO / ".venv" / "bin" / "python"
    python = args.python or (str(venv_python) if venv_python.is_file() else sys.executable)
    work = Path(args.work or REPO / "runs" / f"gpu-check-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", TQDM_DISABLE="1", FINETUNE_OFFLINE="1", HF_HUB_OFFLINE="1")
    if args.cpu_smoke:
        env.setdefault("OMP_NUM_THREADS", "1")   # modest on a shared machine; the smoke is about plumbing
    runner = Runner(python, work, args.budget, env)
    began = time.monotonic()

    parts: List[Part] = []
    try:
        env_part, info = environment(runner)
        parts.append(env_part)
        has_cuda = bool(info.get("cuda"))
        if env_part.status != "ok":
            parts.append(Part("1-3. tests, bench, fine-tune", why="the environment probe failed"))
        elif not has_cuda and not args.cpu_smoke:
            print(f"[gpu-check] NO CUDA DEVICE here: torch.cuda.is_available() is False (torch {info['torch']}, "
                  f"CUDA build {info['cuda_build'] or 'none'}).\n"
                  "[gpu-check] skipped: 1. cuda tests, 2. bench B_16 @ 384 batch 64, 3. fine-tune + greedy soup + "
                  "eval. Run with --cpu-smoke to check the plumbing on the CPU.", flush=True)
            for name in ("1. cuda tests", "2. bench B_16 @ 384, batch 64", "3. fine-tune + greedy soup + eval"):
                parts.append(Part(name, status="failed" if args.require_cuda else "skipped",
                                  why="no CUDA device" + (" (--require-cuda)" if args.require_cuda else "")))
        else:
            smoke = args.cpu_smoke
            if smoke:
                print("[gpu-check] --cpu-smoke: the CPU-safe parts at a tiny size on the CPU"
                      + ("" if has_cuda else " (no CUDA device here: the cuda tests will skip)"), flush=True)
            parts.append(cuda_tests(runner, has_cuda))
            parts.append(bench(runner, smoke, args.bench_steps))
            shared = shared_root(args.shared)
            if shared is None:
                print(f"[gpu-check] no shared folder with {DEIT} and {HYMENOPTERA}/: the fine-tune is skipped",
                      flush=True)
            parts += finetune(runner, smoke, shared, args.shared, "cpu" if smoke else "cuda")
    except KeyboardInterrupt:
        parts.append(Part("(interrupted)", status="failed", why="Ctrl-C"))

    total = time.monotonic() - began
    report = table(parts)
    details = [d for p in parts for d in p.details]
    header = (f"gpu-check {datetime.now():%Y-%m-%d %H:%M}, {total:.0f} s in all"
              + (" (--cpu-smoke)" if args.cpu_smoke else "") + f"; logs in {work / 'logs'}")
    print("\n" + header + "\n\n" + report + "\n")
    for line in details:
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{header}\n\n{report}\n" + ("\n" + "\n\n".join(details) + "\n" if details else ""))
    print(f"[gpu-check] table written to {_rel(out)}")
    return 1 if any(p.status == "failed" for p in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
