"""Pooled hidden states (embeddings) and continuation log-probabilities (reranking) of whole sequences, batched.

Both read the model's final hidden states: the output of the last block after the final RMS norm (`model.norm`),
(B, T, D) -- what transformers returns as `hidden_states[-1]` / `last_hidden_state` with output_hidden_states.
Sequences of different lengths share one forward, padded on the right: attention is causal, so the pads after a
sequence's last token never reach its positions, and each row equals that sequence run alone. No KV cache is kept
(one forward each), so the engine's KV storage type does not apply here.

Pooling (`pool`): "mean" averages every token's state (the default: a causal model not trained for embeddings
spreads what a text says over all its positions, and the average is the most robust summary -- SGPT and LLM2Vec
both find mean pooling beats last-token pooling for untuned decoders); "last" takes the final token's state (the
only one that has seen the whole text: the choice of decoders trained as embedders, e.g. E5-Mistral); "cls" takes
the first token's (BERT's convention; in a causal model that position sees only itself, so it suits only models
trained that way).

Imports: herd.errors and torch; the model is handed in (a herd Transformer, float or quantized).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.errors import GenerationError

POOLINGS = ("mean", "last", "cls")
BATCH_TOKENS = 4096  # padded tokens per forward (B x T_max): bounds the activations' memory
MAX_ROWS = 32


def _check_model(model) -> None:
    if not all(hasattr(model, a) for a in ("tok_embeddings", "norm", "_blocks")):
        raise GenerationError(f"{type(model).__name__}: hidden states are read from a Llama text model (a "
                              f"Transformer with tok_embeddings, blocks and a final norm)")


def _batches(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped for padded forwards: sorted by length (little padding), each group within BATCH_TOKENS."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None and len(g) < MAX_ROWS and (len(g) + 1) * lengths[i] <= BATCH_TOKENS:
            g.append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def final_hidden(model, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Final-norm hidden states of equally treated sequences, right-padded: (B, T_max, D) float32."""
    _check_model(model)
    device = model.tok_embeddings.weight.device
    T = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)  # pad id 0: any id serves, it is never attended to
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    tokens = tokens.to(device)
    input_pos = torch.arange(T, device=device).expand(len(seqs), T)  # (B, T)
    # Transformer.forward without its output head: embeddings -> blocks -> final norm
    h = model._blocks(model.tok_embeddings(tokens), input_pos, None, None)  # (B, T, D)
    return model.norm(h).float()


def pool(h: torch.Tensor, n: int, pooling: str) -> torch.Tensor:
    """One sequence's (T, D) states, of which the first n are real -> (D,)."""
    if pooling == "mean":
        return h[:n].mean(0)
    if pooling == "last":
        return h[n - 1]
    if pooling == "cls":
        return h[0]
    raise GenerationError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")


def check_sequences(seqs: Sequence[Sequence[int]], vocab: int, ctx: int, what: str = "input") -> None:
    """Every sequence non-empty, within the context and the vocabulary; GenerationError naming the first that is not."""
    if not seqs:
        raise GenerationError(f"no {what}s given")
    for i, s in enumerate(seqs):
        if not len(s):
            raise GenerationError(f"{what} {i} has no tokens")
        if len(s) > ctx:
            raise GenerationError(f"{what} {i} has {len(s)} tokens; the model's context is {ctx}")
        bad = next((t for t in s if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise GenerationError(f"{what} {i}: token id {bad} is outside the vocabulary (0..{vocab - 1})")


@torch.inference_mode()
def embed_ids(model, seqs: Sequence[Sequence[int]], pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    """Pooled final hidden states of token sequences: (N, D) float32, L2-normalised unless normalize=False."""
    if pooling not in POOLINGS:
        raise GenerationError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    out = torch.empty(len(seqs), model.config.dim)
    for group in _batches([len(s) for s in seqs]):
        h = final_hidden(model, [seqs[i] for i in group]).cpu()  # (B, T, D)
        for b, i in enumerate(group):
            out[i] = pool(h[b], len(seqs[i]), pooling)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out


@torch.inference_mode()
def continuation_logprobs(model, seqs: Sequence[Sequence[int]], starts: Sequence[int]) -> list[torch.Tensor]:
    """log p(seq[t] | seq[:t]) for t = start .. len-1 of each sequence (start >= 1), as float32 vectors: the output
    head runs on those positions only (not on all T x V)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for group in _batches([len(s) for s in seqs]):
        h = final_hidden(model, [seqs[i] for i in group])  # (B, T, D)
        for b, i in enumerate(group):
            s, a = list(seqs[i]), int(starts[i])
            if not 1 <= a < len(s):
                raise GenerationError(f"sequence {i}: the scored part must start in 1..{len(s) - 1}, got {a}")
            logits = model.output(h[b:b + 1, a - 1:len(s) - 1].to(model.norm.weight.dtype)).float()  # (1, n, V)
            lp = torch.log_softmax(logits[0], -1)  # (n, V): position t-1 predicts token t
            out[i] = lp.gather(-1, torch.as_tensor(s[a:], device=lp.device)[:, None])[:, 0].cpu()
    return out


@torch.inference_mode()
def prompt_logprobs(model, ids: Sequence[int], k: int, chunk: int = 256) -> tuple[list[float], list[list]]:
    """For each token of a prompt after the first: log p(token | the tokens before it) and the k most likely
    (id, logprob) pairs at that position, from one forward; the output head runs `chunk` positions at a time, so
    a long prompt never holds all T x V logits. Both come from the same log-softmax row, so a token that is the
    most likely has exactly the top entry's value."""
    ids = list(ids)
    h = final_hidden(model, [ids])[0]  # (T, D)
    values: list[float] = []
    tops: list[list] = []
    target = torch.as_tensor(ids[1:], device=h.device)
    for a in range(0, len(ids) - 1, chunk):
        rows = h[a:min(a + chunk, len(ids) - 1)]  # positions a.. predict tokens a+1..
        lp = torch.log_softmax(model.output(rows[None].to(model.norm.weight.dtype))[0].float(), -1)  # (n, V)
        values += lp.gather(-1, target[a:a + len(rows), None])[:, 0].tolist()
        if k:
            v, i = torch.topk(lp, k, dim=-1)
            tops += [list(zip(r_i.tolist(), r_v.tolist())) for r_i, r_v in zip(i, v)]
        else:
            tops += [[] for _ in range(len(rows))]
    return values, tops
