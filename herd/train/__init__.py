"""Training floor: `finetune` (LoRA, QLoRA, full; loop.py, data.py, checkpoint.py), `merge` into HF or GGUF (merge.py),
QLoRA's quantized base (lora.py), `herd train-vision` (vision.py) and their CLI (cli.py).

May import herd.api and every floor below it; nothing below imports train/. Parallelism and other training machinery
are applied to the plain models from outside.
"""

from herd.train.loop import FinetuneConfig, FinetuneResult, finetune
from herd.formats.peft import apply_adapter, save_adapter
from herd.models.lora import apply_lora, merge_lora
from herd.train.merge import MergeReport, merge

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "apply_adapter", "apply_lora", "merge_lora",
           "save_adapter", "MergeReport", "merge"]
