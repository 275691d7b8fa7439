"""finetune: fine-tune pretrained Vision Transformers for your own classes.

The Python API mirrors the CLI verbs, so a notebook can do everything the command line does:

    import finetune
    model = finetune.load_model("B_16", num_classes=37, img_size=384)
    finetune.save_checkpoint("vit.safetensors", model)
"""
from .checkpoints import read_checkpoint, read_meta, save_checkpoint, write_checkpoint
from .errors import FinetuneError
from .loading import ZOO, build_model, data_config_of, export_ppv, load_model, load_pretrained, zoo_table
from .viz import attention_maps, attention_rollout, cls_attention, features, posembed_similarity

__all__ = [
    "FinetuneError", "ZOO", "attention_maps", "attention_rollout", "build_model", "cls_attention", "data_config_of",
    "export_ppv", "features", "load_model", "load_pretrained", "posembed_similarity", "read_checkpoint", "read_meta",
    "save_checkpoint", "write_checkpoint", "zoo_table",
]
__version__ = "0.1.0"
