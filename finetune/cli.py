"""The `finetune` command: one verb per capability, each a thin layer over the Python API.

Errors a user can cause are `FinetuneError`s: printed as one `error: ...` line, exit status 2.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

import click

from .errors import FinetuneError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Fine-tune pretrained Vision Transformers for your own classes."""


# ------------------------------------------------------------------------------------- loading
@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(as_json: bool) -> None:
    """List the model zoo: parameters, resolution, sources, and which weights are cached."""
    from .loading import zoo_table
    rows = zoo_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':6} {'params':>8} {'res':>4}  sources (* = cached; first = default)")
    for row in rows:
        sources = "  ".join(("*" if s["cached"] else "") + s["ref"] for s in row["sources"])
        click.echo(f"{row['name']:6} {row['params_m']:>7}M {row['img_size']:>4}  {sources}")
    from .hubs import hf_cache_dir, torch_hub_checkpoints
    click.echo(f"\ncaches: torch hub {torch_hub_checkpoints()}  |  Hugging Face {hf_cache_dir()}")


@cli.command("info")
@click.argument("ref")
@click.option("--num-classes", type=int, default=None, help="Head size to build (default: the weights').")
@click.option("--img-size", type=int, default=None, help="Resolution to build (default: the weights').")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_cmd(ref: str, num_classes: Optional[int], img_size: Optional[int], as_json: bool) -> None:
    """Load REF (zoo name, ppv:/timm:/hf:/npz: ref or checkpoint) and describe the model."""
    from .loading import load_model
    model = load_model(ref, num_classes=num_classes, img_size=img_size)
    info = dict(model.finetune_info, params=sum(p.numel() for p in model.parameters()))
    names = info.pop("class_names") or []
    info["class_names"] = names[:10] + (["..."] if len(names) > 10 else [])
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        click.echo(f"{key:12} {value}")


@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--to", "layout", type=click.Choice(["ppv"]), required=True,
              help="Target layout: ppv = pytorch-pretrained-vit's ViT state dict.")
def export_cmd(checkpoint: str, out: str, layout: str) -> None:
    """Write CHECKPOINT's weights in another library's layout to OUT."""
    import torch
    from .checkpoints import atomic_write
    from .loading import export_ppv, load_model
    model = load_model(checkpoint)
    state = export_ppv(model)
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    info = model.finetune_info
    click.echo(f"wrote {out}: load with pytorch_pretrained_vit.ViT(..., num_classes={info['num_classes']}, "
               f"image_size={info['img_size']}) and .load_state_dict(torch.load({out!r}))")


# ------------------------------------------------------------------------------------ entry point
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="finetune", standalone_mode=False)
    except FinetuneError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 — a bug of ours: still one line, traceback on request
        if os.environ.get("FINETUNE_DEBUG"):
            traceback.print_exc()
        click.echo(f"error: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                   "(set FINETUNE_DEBUG=1 for the traceback, and please report it)", err=True)
        sys.exit(1)
