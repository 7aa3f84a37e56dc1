"""Fine-tuning: `finetune` (LoRA, QLoRA, full), adapters in the PEFT layout, `merge` into HF or GGUF."""

from herd.train.loop import FinetuneConfig, FinetuneResult, finetune
from herd.train.lora import apply_adapter, apply_lora, merge_lora, save_adapter
from herd.train.merge import MergeReport, merge

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "apply_adapter", "apply_lora", "merge_lora",
           "save_adapter", "MergeReport", "merge"]
