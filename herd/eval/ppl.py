"""`herd eval ppl`: perplexity of a model on a text, and -- with a reference model -- the statistics llama.cpp's
`llama-perplexity --kl-divergence` reports, over the same non-overlapping windows: mean KLD(ref || model) with its
standard error and percentiles, PPL(model) - PPL(ref) and ln(PPL(model) / PPL(ref)) with errors, the change in the
probability of the actual next token (Δp: mean, RMS, percentiles) and how often both models rank the same token
first. The reference should be a float export of the weights the file under test was made from, never that file.

`llama_windows=True` (`--llama-windows`) scores exactly the tokens llama-perplexity scores, for a comparison with
it on the same tokens: the text tokenized as one stream (with BOS first when the tokenizer adds one), cut into
windows of ctx tokens whose first token is set to BOS (when added), and only the second half of each window
predicted (positions ctx/2 .. ctx-2): each scored token sees at least ctx/2 tokens of context.

Errors are standard errors of the mean over tokens (std / sqrt(n - 1)); a PPL's error by the delta method
(PPL x the error of the mean NLL), as llama-perplexity does.
"""

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
               progress: bool = True, llama_windows: bool = False) -> dict:
    """Mean NLL and perplexity over non-overlapping ctx-token windows; with ref, mean KL(ref || model) per token.
    llama_windows: llama-perplexity's windows and scored positions (module docstring)."""
    if ctx < 2:
        raise GenerationError(f"ctx must be at least 2, got {ctx}")
    ctx = min(ctx, llm.config.max_seq_len)
    text = sample_text() if text is None else text
    tok = llm.tokenizer
    bos = tok.bos_id if tok.add_bos and tok.bos_id is not None else None
    if ref is not None and ref.tokenizer.encode(text[:2000]) != tok.encode(text[:2000]):
        raise GenerationError("the reference model tokenizes the text differently; KL needs the same vocabulary")
    first = 0  # the first position whose prediction is scored
    if llama_windows:
        ids = tok.encode(text, bos=bos is not None)
        chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)][:max_chunks or None]
        chunks = [([bos] + c[1:]) if bos is not None else c for c in chunks]
        first = ctx // 2
        if not chunks:
            raise GenerationError(f"the text is too short: llama-perplexity's windows need {ctx} tokens, it has "
                                  f"{len(ids)}")
    else:
        chunks = _chunks(tok.encode(text, bos=False), ctx - 1 if bos is not None else ctx, max_chunks)
        chunks = [([bos] + c) if bos is not None else c for c in chunks]
    if not chunks:
        raise GenerationError("the text is too short: it needs at least two tokens")
    nll, ref_nll, kld, dp, same = [], [], [], [], []  # per predicted token
    bar = tqdm(chunks, desc="perplexity", unit="chunk", disable=not progress, dynamic_ncols=True)
    n = 0
    for chunk in bar:
        logp = torch.log_softmax(llm.logits(chunk)[first:-1].double(), -1)  # (T-1-first, V) predicting chunk[1+first:]
        target = torch.tensor(chunk[1 + first:])[:, None]
        nll.append(-logp.gather(1, target)[:, 0])
        if ref is not None:
            ref_logp = torch.log_softmax(ref.logits(chunk)[first:-1].double(), -1)
            kld.append((ref_logp.exp() * (ref_logp - logp)).sum(-1))
            ref_nll.append(-ref_logp.gather(1, target)[:, 0])
            dp.append(logp.gather(1, target)[:, 0].exp() - ref_logp.gather(1, target)[:, 0].exp())
            same.append(logp.argmax(-1) == ref_logp.argmax(-1))
        n += len(target)
        bar.set_postfix(ppl=f"{math.exp(float(torch.cat(nll).mean())):.3f}", tokens=n)
    nll_t = torch.cat(nll)
    mean_nll, err_nll = _mean_err(nll_t)
    ppl = math.exp(mean_nll)
    out = {"tokens": n, "chunks": len(chunks), "ctx": ctx, "nll": mean_nll, "ppl": ppl, "ppl_err": ppl * err_nll}
    if ref is not None:
        out.update(kl_statistics(nll_t, torch.cat(ref_nll), torch.cat(kld), torch.cat(dp), torch.cat(same)))
    return out


PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)


def _mean_err(x: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (std / sqrt(n - 1); 0 for a single value)."""
    x = x.double()
    n = x.numel()
    mean = float(x.mean())
    return mean, (float(x.std(unbiased=False)) / math.sqrt(n - 1) if n > 1 else 0.0)


def _spread(x: torch.Tensor) -> dict:
    """Max, percentiles (p99_9 ... p0_1, median) and min of a per-token quantity."""
    q = torch.quantile(x.double(), torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)).tolist() \
        if x.numel() <= 16_000_000 else [float("nan")] * len(PERCENTILES)
    out = {"max": float(x.max())}
    for p, v in zip(PERCENTILES, q):
        out["median" if p == 50.0 else "p" + f"{p:g}".replace(".", "_")] = v
    out["min"] = float(x.min())
    return out


def kl_statistics(nll: torch.Tensor, ref_nll: torch.Tensor, kld: torch.Tensor, dp: torch.Tensor,
                  same: torch.Tensor) -> dict:
    """llama-perplexity's --kl-divergence figures from per-token NLLs (model, reference), KLD(ref || model), Δp and
    same-top-token flags. Keeps kl_mean / kl_max, the keys herd reported before."""
    n = nll.numel()
    a, err_a = _mean_err(nll)
    b, err_b = _mean_err(ref_nll)
    ln_ratio, err_ln_ratio = _mean_err(nll - ref_nll)
    ppl, ref_ppl = math.exp(a), math.exp(b)
    # Var(e^A - e^B) by the delta method, with the covariance of the two mean NLLs
    cov = float(((nll - a) * (ref_nll - b)).mean()) / max(n - 1, 1)
    var = ppl ** 2 * err_a ** 2 + ref_ppl ** 2 * err_b ** 2 - 2 * ppl * ref_ppl * cov
    corr = float(torch.corrcoef(torch.stack([nll.double(), ref_nll.double()]))[0, 1]) if n > 1 else 1.0
    kl_mean, kl_err = _mean_err(kld)
    dp_mean, dp_err = _mean_err(dp)
    same_mean, same_err = _mean_err(same.double())
    return {
        "ref_ppl": ref_ppl, "ref_ppl_err": ref_ppl * err_b, "cor_ln_ppl": corr,
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_err": err_ln_ratio, "ppl_ratio": ppl / ref_ppl,
        "delta_ppl": ppl - ref_ppl, "delta_ppl_err": math.sqrt(max(var, 0.0)),
        "kl_mean": kl_mean, "kl_max": float(kld.max()),
        "kld": {"mean": kl_mean, "err": kl_err, **_spread(kld)},
        "delta_p": {"mean": dp_mean, "err": dp_err, "rms": float(dp.double().pow(2).mean().sqrt()), **_spread(dp)},
        "same_top_p": same_mean, "same_top_p_err": same_err,
    }


def report_lines(result: dict, ref_name: str | None = None) -> str:
    """The human report: one line without a reference; llama-perplexity's table with one."""
    lines = [f"perplexity {result['ppl']:.4f} ± {result['ppl_err']:.4f} over {result['tokens']} tokens "
             f"({result['chunks']} x {result['ctx']})"]
    if "kld" not in result:
        return lines[0]
    k, d = result["kld"], result["delta_p"]
    lines += [
        f"reference {ref_name or ''}: perplexity {result['ref_ppl']:.4f} ± {result['ref_ppl_err']:.4f}",
        f"Cor(ln PPL(model), ln PPL(ref)):  {100 * result['cor_ln_ppl']:.2f}%",
        f"Mean ln(PPL(model)/PPL(ref)):     {result['ln_ppl_ratio']:.6f} ± {result['ln_ppl_ratio_err']:.6f}",
        f"Mean PPL(model)/PPL(ref):         {result['ppl_ratio']:.6f}",
        f"Mean PPL(model)-PPL(ref):         {result['delta_ppl']:.6f} ± {result['delta_ppl_err']:.6f}",
        f"Mean    KLD: {k['mean']:.8f} ± {k['err']:.8f}",
        f"Maximum KLD: {k['max']:.8f}",
        *(f"{label:>7} KLD: {k[key]:.8f}" for label, key in (("99.9%", "p99_9"), ("99.0%", "p99"), ("95.0%", "p95"),
                                                               ("90.0%", "p90"), ("Median", "median"),
                                                               ("10.0%", "p10"), ("5.0%", "p5"), ("1.0%", "p1"),
                                                               ("0.1%", "p0_1"))),
        f"Minimum KLD: {k['min']:.8f}",
        f"Mean    Δp: {100 * d['mean']:.4f} ± {100 * d['err']:.4f} %",
        f"Maximum Δp: {100 * d['max']:.4f}%",
        f"Median  Δp: {100 * d['median']:.4f}%",
        f"Minimum Δp: {100 * d['min']:.4f}%",
        f"RMS Δp    : {100 * d['rms']:.4f} %",
        f"Same top p: {100 * result['same_top_p']:.3f} ± {100 * result['same_top_p_err']:.3f} %",
    ]
    return "\n".join(lines)


def read_text(path: str | Path | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationError(f"{path}: cannot read the text file ({e})") from None
