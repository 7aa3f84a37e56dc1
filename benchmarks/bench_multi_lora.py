"""Multi-LoRA serving throughput: requests for several adapters (and the base) decoded in one batch by herd's engine,
against the same requests served one adapter at a time (llama.cpp's way: "requests with different LoRA configs
will not be batched together"), on the same engine, model and prompts.

    python benchmarks/bench_multi_lora.py [--adapters 3] [--per-adapter 4] [--max-tokens 32] [--threads 2]
                                          [--out benchmarks/results/multi_lora.json]

The adapters are random LoRA (rank 8 on wq, wv, w2) of the default model, written to a temporary folder; the output
tokens/s counts generated tokens over wall time. Both orders run alternately, --repeats times each.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import herd  # noqa: E402
from herd.engine.adapter_step import AdapterStep  # noqa: E402
from herd.engine.scheduler import Engine  # noqa: E402
from herd.eval.bench import check_load, load_average  # noqa: E402
from herd.formats.peft import adapter_scaling, read_adapter, save_adapter  # noqa: E402
from herd.models.lora import apply_lora, lora_modules  # noqa: E402
from herd.ops.sampling import SamplingParams  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "Explain gravity in one sentence.", "Give me a synonym for happy.", "Who wrote Hamlet?",
             "What is 12 times 7?", "Describe a cat."]


def make_adapters(llm, n: int, root: Path) -> dict[str, Path]:
    out = {}
    for i in range(n):
        m = copy.deepcopy(llm.model)
        apply_lora(m, rank=8, alpha=16.0, targets="wq,wv,w2", seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for mod in lora_modules(m).values():
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.02)
        out[f"a{i}"] = save_adapter(m, root / f"a{i}")
        del m
    return out


def run(engine: Engine, step: AdapterStep, groups: list[list[tuple[list[int], str | None]]], params) -> tuple:
    """Submit each group, wait for it, then the next; (generated tokens, seconds)."""
    t0, tokens = time.perf_counter(), 0
    for group in groups:
        handles = [engine.submit(ids, params, images=step.choice(name)) for ids, name in group]
        while engine.step():
            pass
        tokens += sum(len(h.result().output_ids) for h in handles)
    return tokens, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--per-adapter", type=int, default=4, help="requests per adapter (and for the base)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "multi_lora.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before, busy = check_load(False)
    llm = herd.load(None)
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(llm, args.adapters, Path(tmp))
        step = AdapterStep(llm.model)
        for name, folder in folders.items():
            cfg, w = read_adapter(folder, llm.model)
            step.add(name, w, adapter_scaling(cfg))
        names = [None, *folders]
        reqs = {n: [(llm.encode_prompt(QUESTIONS[(i + j) % len(QUESTIONS)]), n) for j in range(args.per_adapter)]
                for i, n in enumerate(names)}
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        engine = Engine(step, llm.tokenizer, llm.stop_ids, max_batch=max(16, len(names) * args.per_adapter))
        run(engine, step, [reqs[None][:1]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm up
        results = {"mixed": [], "one_adapter_at_a_time": []}
        for _ in range(args.repeats):
            mixed = [[r for n in names for r in reqs[n]]]
            tok, s = run(engine, step, mixed, params)
            results["mixed"].append(tok / s)
            tok, s = run(engine, step, [reqs[n] for n in names], params)
            results["one_adapter_at_a_time"].append(tok / s)
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    report = {"command": "python benchmarks/bench_multi_lora.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "busy": busy, "load_before": load_before, "load_after": load_average(), "adapters": args.adapters,
              "requests": len(names) * args.per_adapter, "max_tokens": args.max_tokens, "threads": args.threads,
              "output_tokens_per_s": results, "median": med,
              "ratio_mixed_over_one_at_a_time": med["mixed"] / med["one_adapter_at_a_time"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
