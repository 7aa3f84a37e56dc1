"""`herd eval ppl`: perplexity of a model on a text, and the KL divergence of its next-token distribution from a
reference model's (e.g. a quantized model against its float32 original)."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from herd.errors import GenerationError


def sample_text() -> str:
    """The shipped English sample (about 27k tokens)."""
    return resources.files("herd.data").joinpath("sample.txt").read_text(encoding="utf-8")


def _chunks(ids: list[int], ctx: int, max_chunks: int | None) -> list[list[int]]:
    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - 1, ctx)]
    chunks = [c for c in chunks if len(c) > 1]
    return chunks[:max_chunks] if max_chunks else chunks


@torch.inference_mode()
def perplexity(llm, text: str | None = None, *, ctx: int = 512, max_chunks: int | None = None, ref=None,
               progress: bool = True) -> dict:
    """Mean NLL and perplexity over non-overlapping ctx-token windows; with ref, mean KL(ref || model) per token."""
    if ctx < 2:
        raise GenerationError(f"ctx must be at least 2, got {ctx}")
    ctx = min(ctx, llm.config.max_seq_len)
    text = sample_text() if text is None else text
    ids = llm.tokenizer.encode(text, bos=False)
    if ref is not None and ref.tokenizer.encode(text[:2000]) != llm.tokenizer.encode(text[:2000]):
        raise GenerationError("the reference model tokenizes the text differently; KL needs the same vocabulary")
    chunks = _chunks(ids, ctx - 1 if llm.tokenizer.add_bos else ctx, max_chunks)
    if not chunks:
        raise GenerationError("the text is too short: it needs at least two tokens")
    nll_sum, kl_sum, kl_max, n = 0.0, 0.0, 0.0, 0
    bar = tqdm(chunks, desc="perplexity", unit="chunk", disable=not progress, dynamic_ncols=True)
    for chunk in bar:
        if llm.tokenizer.add_bos and llm.tokenizer.bos_id is not None:
            chunk = [llm.tokenizer.bos_id] + chunk
        logits = llm.logits(chunk)[:-1]  # (T-1, V) predicting chunk[1:]
        logp = torch.log_softmax(logits, -1)
        target = torch.tensor(chunk[1:])
        nll_sum += float(-logp.gather(1, target[:, None]).sum())
        if ref is not None:
            ref_logp = torch.log_softmax(ref.logits(chunk)[:-1], -1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (T-1,)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
        n += len(target)
        bar.set_postfix(ppl=f"{math.exp(nll_sum / n):.3f}", tokens=n)
    out = {"tokens": n, "chunks": len(chunks), "ctx": ctx, "nll": nll_sum / n, "ppl": math.exp(nll_sum / n)}
    if ref is not None:
        out.update(kl_mean=kl_sum / n, kl_max=kl_max)
    return out


def read_text(path: str | Path | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationError(f"{path}: cannot read the text file ({e})") from None
