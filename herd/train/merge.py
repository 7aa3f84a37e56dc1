"""`herd merge`: fold a LoRA adapter into its base and write HF safetensors or GGUF (re-quantized if asked), with the
KL divergence each step costs, measured against the adapter applied unmerged to the (dequantized) base:

  kl_merge    merged weights in memory (float32)   vs  base + adapter unmerged   (rounding only: ~1e-9)
  kl_written  the written file, loaded back         vs  base + adapter unmerged   (dtype / re-quantization cost)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.errors import ConfigError

# Text for the KL measurement when no data file is given: plain prose plus a chat turn, ~250 tokens.
KL_TEXT = (
    "The history of the lighthouse begins with fires lit on hilltops to guide ships home. Over the centuries, "
    "keepers replaced the fires with oil lamps, then with lenses that could throw a beam thirty kilometres out "
    "to sea. Today most lighthouses run without anyone living in them, but sailors still count the seconds "
    "between flashes to tell one coast from another. In 1822 the physicist Augustin Fresnel built a lens of "
    "concentric rings that made the light far brighter while using much less glass. Question: why do the flashes "
    "of neighbouring lighthouses differ? Answer: each one has its own rhythm, so that a navigator who sees it at "
    "night knows exactly which light it is and where the ship must be."
)


WARN_KL = 0.1  # nats per token: above this the written file no longer behaves like the adapter


@dataclass
class MergeReport:
    out: Path
    format: str
    quant: str | None
    kl_merge: float  # mean KL(adapter-applied || merged in memory) per token, nats
    kl_written: float  # mean KL(adapter-applied || written file reloaded) per token, nats
    tokens: int

    def line(self) -> str:
        text = (f"wrote {self.out} ({self.format}{', ' + self.quant if self.quant else ''}); KL per token vs the "
                f"unmerged adapter over {self.tokens} tokens: merge {self.kl_merge:.3g}, written file "
                f"{self.kl_written:.3g} nats")
        if self.kl_written > WARN_KL:
            text += (f"\nwarning: the written file departs from the adapter by {self.kl_written:.2g} nats per token; "
                     "an adapter's small updates are rounded away by coarse quantization (measured: Q4_1 loses "
                     "them, Q8_0 keeps them). Use a finer --quant, or run the adapter unmerged (--adapter).")
        return text


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(logits)), nats. Inputs (T, V)."""
    lp_ref = F.log_softmax(ref_logits.double(), -1)
    lp = F.log_softmax(logits.double(), -1)
    return float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())


def _kl_tokens(llm, kl_data, max_tokens: int) -> list[int]:
    if kl_data is not None:
        from herd.train.data import load_examples

        examples, _ = load_examples(kl_data, llm.tokenizer, llm.chat_format, max_tokens, "truncate")
        ids = [t for ex in examples for t in ex.ids]
    else:
        ids = llm.tokenizer.encode(KL_TEXT, bos=bool(llm.tokenizer.add_bos and llm.tokenizer.bos_id is not None))
    return ids[: min(max_tokens, llm.config.max_seq_len)]


@torch.no_grad()
def merge(base, adapter, out, *, to: str = "hf", quant: str | None = None, dtype: str | None = None,
          kl_data=None, kl_tokens: int = 512) -> MergeReport:
    """Fold `adapter` (a PEFT LoRA folder) into `base` (None: the base the adapter names, else the default model);
    write `out` as 'hf' (dtype) or 'gguf' (quant, default f16)."""
    from herd.api import load, parse_dtype
    from herd.formats.peft import adapter_base, apply_adapter
    from herd.models.lora import merge_lora

    if to not in ("hf", "gguf"):
        raise ConfigError(f"merge writes hf or gguf, got {to!r}")
    if quant is not None and to != "gguf":
        raise ConfigError("quant applies to GGUF output only (use dtype for HF)")
    if dtype is not None and to != "hf":
        raise ConfigError("dtype applies to HF output only (use quant for GGUF)")
    if base is None:
        base = adapter_base(adapter)
    llm = load(base, "float32")
    if llm.tokenizer is None:
        raise ConfigError(f"{llm.source}: no tokenizer found with the base model; merge needs one to measure KL")
    apply_adapter(llm.model, adapter)
    ids = torch.tensor([_kl_tokens(llm, kl_data, kl_tokens)])
    ref = llm.model(ids)[0].float()
    merged = merge_lora(llm.model)
    kl_merge = mean_kl(ref, merged(ids)[0].float())
    sd = {k: v.detach() for k, v in merged.state_dict().items()}
    out = Path(out)
    ckpt = llm.checkpoint
    if to == "hf":
        from herd.formats.convert import copy_tokenizer as _copy_tokenizer
        from herd.formats import save_hf

        target = parse_dtype(dtype) or torch.float32
        save_hf(out, llm.config, {k: v.to(target) for k, v in sd.items()}, bos_id=llm.tokenizer.bos_id,
                eos_id=llm.tokenizer.eos_id)
        _copy_tokenizer(ckpt, out, "hf")
    else:
        from herd.formats import write_gguf
        from herd.formats.gguf_vocab import tokenizer_to_gguf_metadata

        write_gguf(out, llm.config, sd, tokenizer_to_gguf_metadata(llm.tokenizer), ckpt.chat_template,
                   quant=quant or "f16", name=Path(llm.source).stem + "-merged")
    written = load(out, "float32")
    kl_written = mean_kl(ref, written.model(ids)[0].float())
    return MergeReport(out, to, quant or ("f16" if to == "gguf" else None), kl_merge, kl_written, ids.shape[1])

