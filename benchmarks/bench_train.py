"""Training speed and memory: herd against its peers, side by side in one run (issue 14).

    python benchmarks/bench_train.py [--part finetune|pretrain|all] [--steps 6] [--repeats 2] [--threads 2]
                                     [--out benchmarks/results/bench_train.json]

Fine-tuning: `herd finetune` (the command itself, LoRA and QLoRA) on the default model against transformers + peft
(float32 weights dequantized from the same GGUF, as transformers loads it) at the same batch (one 1,024-token row
of herd/data/sample.txt a step, every token a target), rank 16, alpha 32, the same targets (all seven projections
of every block), AdamW, clipping at 1, the same thread count. peft gets herd's own packed rows (a .pt file), so both
see the same tokens. transformers has no CPU QLoRA (bitsandbytes' 4-bit layers want a GPU): QLoRA is compared to the
float peft LoRA, and said so. Over this GGUF both herd methods train over the file's own Q4_1 blocks (no float copy
of the base; each layer dequantizes for the call at hand): `lora` runs the base matmuls in float32, as peft does;
`qlora` in bfloat16 (float32 accumulation; adapter, loss and gradients float32) by default on a CPU with bf16 dot
products, as QLoRA computes (`--compute`).

Pretraining, the debug preset (2 layers, dim 64, the default model's 49,152-word vocabulary, so the output layer
and its loss are most of the work): `herd pretrain` in one process and in 2-process DDP and FSDP2 (gloo, one thread
each) against a plain PyTorch loop of the same model class (full logits, F.cross_entropy, AdamW, clipping).
torchtitan's trainer is not run: 0.3.0 picks "cuda" when no accelerator is found and calls
torch.cuda.set_device (torchtitan/tools/utils.py get_device_info, trainer.py), so it does not run on a CPU.

Every run is its own process: peak RSS is that process's ru_maxrss (os.wait4), the whole run from start to exit (load
included); for 2 ranks the sum of both. A third herd LoRA run sets MALLOC_MMAP_THRESHOLD_ (glibc): the
same training with its large blocks mmapped, which shows how much of the peak is heap fragmentation. Tokens/s is the steady state: tokens over the time from the end of step 1 to
the end of the last step (the first step's warm-up left out), as each trainer reports its step times. Sides run
interleaved (herd, peer, herd, peer, ...) so that both see the same machine load; the 1-minute load average before
each run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PY = sys.executable
SEQ = 1024  # fine-tuning row = micro-batch
PT_BATCH, PT_SEQ = 8, 512  # pretraining: global sequences x length per step

PEFT = r'''
import json, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
model = AutoModelForCausalLM.from_pretrained(args["dir"], gguf_file=args["file"], dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
rows = torch.load(args["batches"])
times = []
t0 = time.perf_counter()
for i in range(args["steps"]):
    tokens, labels = rows[i % len(rows)]
    # herd's labels[t] is the target of position t; transformers shifts: its labels[t + 1] is position t's target
    hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], 1)
    out = model(input_ids=tokens, labels=hf_labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
    print(f"step {i + 1} loss {float(out.loss):.4f}", file=sys.stderr, flush=True)
print(json.dumps({"elapsed": times, "tokens_per_step": int(tokens.numel())}))
'''

PLAIN = r'''
import json, sys, time, torch, torch.nn.functional as F
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from herd.models.llama import Transformer
from herd.train.presets import model_config
from herd.train.pretrain import init_weights
model = Transformer(model_config("debug", args["vocab"]))
init_weights(model, 0)
model.train()
params = list(model.parameters())
opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
batches = torch.load(args["batches"])
times = []
t0 = time.perf_counter()
for i in range(args["steps"]):
    x, y = batches[i % len(batches)]
    logits = model(x)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
    print(f"step {i + 1} loss {float(loss):.4f}", file=sys.stderr, flush=True)
print(json.dumps({"elapsed": times, "tokens_per_step": int(x.numel())}))
'''


def load_1m() -> float:
    return os.getloadavg()[0]


def spawn(cmd: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=out,
                            text=True)


def reap(p: subprocess.Popen) -> tuple[str, float]:
    """(stdout, peak RSS in MB) of a finished child, its ru_maxrss from os.wait4."""
    stdout = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{p.args[:6]} failed with exit code {p.returncode}")
    return stdout, usage.ru_maxrss / 1024


def steady(elapsed: list[float], tokens_per_step: int) -> float:
    """Tokens/s from the end of step 1 to the end of the last step."""
    return (len(elapsed) - 1) * tokens_per_step / (elapsed[-1] - elapsed[0])


def metrics_elapsed(folder: Path) -> list[float]:
    recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["elapsed_s"] for r in recs if "elapsed_s" in r]


# -- fine-tuning ---------------------------------------------------------------------------------------------------

def finetune_batches(tmp: Path) -> Path:
    """herd's own packed rows of the sample text (one 1,024-token row per step) -> a .pt of (tokens, labels)."""
    import torch

    from herd.api import load
    from herd.train.data import PackedData, load_examples

    llm = load("smollm2-135m-instruct")
    ex, _ = load_examples([str(ROOT / "herd/data/sample.txt")], llm.tokenizer, llm.chat_format, SEQ, "truncate")
    rows = [(b.tokens, b.labels) for b in PackedData(ex, SEQ, 1, 0, llm.tokenizer.pad_id or 2).epoch(0)]
    path = tmp / "rows.pt"
    torch.save(rows, path)
    return path


# glibc's malloc serves blocks under its (dynamic) mmap threshold from the heap, which freed activations fragment:
# with big blocks mmapped instead, RSS follows the live tensors, at the cost of page faults on every new block
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "262144"}


def herd_finetune(method: str, steps: int, threads: int, tmp: Path, env: dict | None = None) -> dict:
    out = tmp / f"ft-{method}{'-mmap' if env else ''}"
    load = load_1m()
    p = spawn([PY, "-m", "herd", "finetune", "--model", "smollm2-135m-instruct", "--data",
               str(ROOT / "herd/data/sample.txt"), "--out", str(out), "--method", method, "--rank", "16", "--alpha",
               "32", "--targets", "wq,wk,wv,wo,w1,w2,w3", "--seq-len", str(SEQ), "--batch-tokens", str(SEQ),
               "--steps", str(steps), "--warmup", "1", "--lr", "1e-3", "--check-samples", "0", "--no-progress",
               "--threads", str(threads)], env, log=out.with_suffix(".log"))
    _, rss = reap(p)
    return {"tokens_per_s": steady(metrics_elapsed(out), SEQ), "peak_rss_mb": rss, "load_1m": load}


def peft_finetune(batches: Path, steps: int, threads: int, tmp: Path) -> dict:
    from herd.hub import resolve

    path = resolve("smollm2-135m-instruct")
    gguf = path if path.is_file() else next(path.glob("*.gguf"))
    load = load_1m()
    p = spawn([PY, "-c", PEFT, json.dumps({"dir": str(gguf.parent), "file": gguf.name, "batches": str(batches),
                                          "steps": steps, "threads": threads})], log=tmp / "peft.log")
    stdout, rss = reap(p)
    r = json.loads(stdout.strip().splitlines()[-1])
    return {"tokens_per_s": steady(r["elapsed"], r["tokens_per_step"]), "peak_rss_mb": rss, "load_1m": load}


# -- pretraining ---------------------------------------------------------------------------------------------------

def pretrain_data(tmp: Path) -> tuple[Path, Path, int]:
    """Shards of the sample text, and the first steps' global batches of herd's loader as a .pt for the plain loop."""
    import torch

    from herd.train.shards import Loader, TokenData

    shards = tmp / "shards"
    subprocess.run([PY, "-m", "herd", "data", "prepare", "--input", str(ROOT / "herd/data/sample.txt"), "--out",
                    str(shards), "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    data = TokenData(shards)
    loader = Loader(data, PT_SEQ, PT_BATCH, 1, 0, 1, 0)
    batches = [loader.next()[0] for _ in range(4)]
    path = tmp / "pt_batches.pt"
    torch.save(batches, path)
    return shards, path, data.vocab_size


def herd_pretrain(layout: str, shards: Path, steps: int, threads: int, tmp: Path, port: int) -> dict:
    out = tmp / f"pt-{layout}"
    world = 1 if layout == "single" else 2
    cmd = [PY, "-m", "herd", "pretrain", "--model-config", "debug", "--data", str(shards), "--out", str(out),
           "--steps", str(steps), "--batch-size", str(PT_BATCH), "--seq-len", str(PT_SEQ), "--warmup", "1",
           "--parallel", layout, "--no-progress", "--threads", str(threads if world == 1 else 1)]
    load = load_1m()
    procs = []
    for rank in range(world):
        env = {} if world == 1 else {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                                     "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                     "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(spawn(cmd, env, tmp / f"pt-{layout}-{rank}.log"))
    rss = [reap(p)[1] for p in procs]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"tokens_per_s": steady([r["elapsed_s"] for r in recs], PT_BATCH * PT_SEQ),
            "peak_rss_mb": sum(rss), "peak_rss_per_rank_mb": rss, "load_1m": load}


def plain_pretrain(batches: Path, vocab: int, steps: int, threads: int, tmp: Path) -> dict:
    load = load_1m()
    p = spawn([PY, "-c", PLAIN, json.dumps({"batches": str(batches), "vocab": vocab, "steps": steps,
                                           "threads": threads})], log=tmp / "plain.log")
    stdout, rss = reap(p)
    r = json.loads(stdout.strip().splitlines()[-1])
    return {"tokens_per_s": steady(r["elapsed"], r["tokens_per_step"]), "peak_rss_mb": rss, "load_1m": load}


# -- report --------------------------------------------------------------------------------------------------------

def summarize(runs: list[dict]) -> dict:
    """Mean and sample stddev of tokens/s, max peak RSS, mean load over the repeats of one side."""
    tps = [r["tokens_per_s"] for r in runs]
    m = sum(tps) / len(tps)
    sd = (sum((x - m) ** 2 for x in tps) / (len(tps) - 1)) ** 0.5 if len(tps) > 1 else 0.0
    return {"tokens_per_s": m, "tokens_per_s_sd": sd, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "load_1m": sum(r["load_1m"] for r in runs) / len(runs), "runs": runs}


def table(res: dict) -> list[str]:
    lines = ["| comparison | herd tok/s | peer tok/s | speed ratio | herd peak RSS MB | peer peak RSS MB | "
             "RSS ratio | load (1m) |", "|---|---|---|---|---|---|---|---|"]
    for c in res["comparisons"]:
        h, p = res["sides"][c["herd"]], res["sides"][c["peer"]]
        lines.append(f"| {c['herd']} vs {c['peer']} | {h['tokens_per_s']:.0f} ± {h['tokens_per_s_sd']:.0f} | "
                     f"{p['tokens_per_s']:.0f} ± {p['tokens_per_s_sd']:.0f} | {c['speed']:.2f}x | "
                     f"{h['peak_rss_mb']:.0f} | {p['peak_rss_mb']:.0f} | {c['rss']:.2f}x | "
                     f"{h['load_1m']:.2f} / {p['load_1m']:.2f} |")
    return lines


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["sides"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "tokens_per_s", "training tokens/s (steady state)"),
                           (axes[1], "peak_rss_mb", "peak RSS (MB, whole process)")):
        vals = [res["sides"][n][key] for n in names]
        colors = ["tab:blue" if n.startswith("herd") else "tab:gray" for n in names]
        ax.barh(names, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.suptitle(f"herd training vs peers, {res['threads']} threads, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["finetune", "pretrain", "all"], default="all")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per fine-tuning run")
    ap.add_argument("--pretrain-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_train.json"))
    args = ap.parse_args()

    import torch

    sides: dict[str, list] = {}
    comparisons = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as t:
        tmp = Path(t)
        if args.part in ("finetune", "all"):
            rows = finetune_batches(tmp)
            for rep in range(args.repeats):
                for name, fn in (("herd finetune lora", lambda: herd_finetune("lora", args.steps, args.threads, tmp)),
                                 ("transformers+peft lora", lambda: peft_finetune(rows, args.steps, args.threads, tmp)),
                                 ("herd finetune qlora", lambda: herd_finetune("qlora", args.steps, args.threads,
                                                                               tmp)),
                                 ("herd finetune lora, big blocks mmapped",
                                  lambda: herd_finetune("lora", args.steps, args.threads, tmp, MMAP_ENV))):
                    r = fn()
                    print(f"[{rep}] {name}: {r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                          f"load {r['load_1m']:.2f}", flush=True)
                    sides.setdefault(name, []).append(r)
            comparisons += [{"herd": n, "peer": "transformers+peft lora"} for n in (
                "herd finetune lora", "herd finetune qlora", "herd finetune lora, big blocks mmapped")]
        if args.part in ("pretrain", "all"):
            shards, batches, vocab = pretrain_data(tmp)
            port = 29600 + os.getpid() % 300
            for rep in range(args.repeats):
                for name, fn in (
                        ("herd pretrain single", lambda: herd_pretrain("single", shards, args.pretrain_steps,
                                                                       args.threads, tmp, port)),
                        ("plain PyTorch loop", lambda: plain_pretrain(batches, vocab, args.pretrain_steps,
                                                                      args.threads, tmp)),
                        ("herd pretrain ddp 2", lambda: herd_pretrain("ddp", shards, args.pretrain_steps,
                                                                      args.threads, tmp, port + 1)),
                        ("herd pretrain fsdp 2", lambda: herd_pretrain("fsdp", shards, args.pretrain_steps,
                                                                       args.threads, tmp, port + 2))):
                    r = fn()
                    print(f"[{rep}] {name}: {r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                          f"load {r['load_1m']:.2f}", flush=True)
                    sides.setdefault(name, []).append(r)
            comparisons += [{"herd": f"herd pretrain {k}", "peer": "plain PyTorch loop"}
                            for k in ("single", "ddp 2", "fsdp 2")]

    res = {"sides": {k: summarize(v) for k, v in sides.items()}, "threads": args.threads,
           "machine": f"{os.cpu_count()} cores {platform.machine()}", "torch": torch.__version__,
           "settings": {"finetune": f"default model (SmolLM2-135M-Instruct Q4_1 GGUF), LoRA r16 alpha 32 on "
                                    f"wq,wk,wv,wo,w1,w2,w3, one {SEQ}-token row per step, {args.steps} steps",
                        "pretrain": f"debug preset, global batch {PT_BATCH} x {PT_SEQ} tokens, "
                                    f"{args.pretrain_steps} steps; DDP/FSDP: 2 processes x 1 thread (gloo)",
                        "torchtitan": "not run: torchtitan 0.3.0 falls back to device 'cuda' without an "
                                      "accelerator and calls torch.cuda.set_device (no CPU trainer)",
                        "mmapped": f"herd finetune lora with {MMAP_ENV} in its environment (glibc)",
                        "compute": "herd lora: float32 base matmuls; herd qlora: its default (bfloat16 on a CPU "
                                   "with AVX512-BF16 or AMX, else float32); both over the GGUF's Q4_1 blocks",
                        "peft qlora": "not run: bitsandbytes 4-bit needs a GPU; herd QLoRA is compared with "
                                      "float peft LoRA"}}
    out = Path(args.out)
    if args.part != "all" and out.exists():  # a one-part run keeps the other part's rows from the file
        old = json.loads(out.read_text())
        other = "pretrain" if args.part == "finetune" else "finetune"
        for c in old.get("comparisons", []):
            if c["herd"].startswith(f"herd {other}"):
                comparisons.append({"herd": c["herd"], "peer": c["peer"]})
                for side in (c["herd"], c["peer"]):
                    res["sides"].setdefault(side, old["sides"][side])
    for c in comparisons:
        h, p = res["sides"][c["herd"]], res["sides"][c["peer"]]
        c["speed"] = h["tokens_per_s"] / p["tokens_per_s"]
        c["rss"] = h["peak_rss_mb"] / p["peak_rss_mb"]
    res["comparisons"] = comparisons
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    md = table(res)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(res, out.with_suffix(".png"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
