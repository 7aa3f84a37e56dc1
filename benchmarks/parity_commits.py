"""Same answers before and after a change: greedy tokens, logits and server responses of two herd commits, each run
in its own child process from its own git worktree, on the default model (float and GGUF-blocks paths), a tiny
random Llama 4 (MoE, chunked attention, an image) and a tiny Llama 3.2 Vision (cross-attention, an image).

    python benchmarks/parity_commits.py OLD_REV [NEW_REV]      (NEW_REV defaults to the working tree)

Writes benchmarks/results/parity_commits.json and prints one line per check: equal tokens, max |logit difference|
and equal server bodies (ids and timestamps masked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]

CHILD = r"""
import io, json, sys, hashlib
import numpy as np, torch
import herd
from PIL import Image

folders = json.loads(sys.argv[1])
out = {}
png = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(png, format="PNG")
png = png.getvalue()

def text_checks(name, llm, prompts):
    gen = [llm.generate(p, max_tokens=24).output_ids for p in prompts]
    ids = llm.encode_prompt(prompts[0])
    logits = llm.logits(ids)[-8:].tolist()
    out[name] = {"tokens": gen, "logits": logits}

for keep in (False, True):
    llm = herd.load(None, keep_quantized=keep)
    text_checks("default-" + ("blocks" if keep else "float"), llm, %(prompts)r)
    if keep:
        from fastapi.testclient import TestClient
        from herd.server.app import create_app
        bodies = []
        with TestClient(create_app(llm, model_name="m", max_batch=4)) as c:
            for p in %(prompts)r:
                r = c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 16, "temperature": 0,
                                                         "messages": [{"role": "user", "content": p}]}).json()
                bodies.append({"choices": r["choices"], "usage": r["usage"]})
                r = c.post("/v1/completions", json={"model": "m", "max_tokens": 8, "temperature": 0,
                                                    "prompt": p, "logprobs": 2}).json()
                bodies.append({"choices": r["choices"], "usage": r["usage"]})
        out["server"] = bodies
for kind, folder in folders.items():
    llm = herd.load(folder)
    msgs = [{"role": "user", "content": [{"type": "image", "image": png}, {"type": "text", "text": "Describe it."}]}]
    out[kind] = {"tokens": [llm.generate(msgs, max_tokens=8, ignore_eos=True).output_ids,
                            llm.generate("Tell me a story.", max_tokens=8, ignore_eos=True).output_ids],
                 "logits": llm.logits(llm.encode_prompt("Tell me a story."))[-4:].tolist()}
print("PARITY " + json.dumps(out))
"""


def make_vision_folders(root: Path) -> dict[str, str]:
    """Tiny random HF Llama 4 and Mllama vision checkpoints (transformers), with Meta's tokenizer files."""
    import torch
    from transformers import (Llama4Config, Llama4ForConditionalGeneration, MllamaConfig,
                              MllamaForConditionalGeneration)

    import llama_models

    tok = Path(llama_models.__file__).parent
    torch.manual_seed(0)
    l4 = Llama4ForConditionalGeneration(Llama4Config(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vision_output_dim=48, image_size=28, patch_size=14, projector_input_dim=48,
                           projector_output_dim=48, pixel_shuffle_ratio=0.5, initializer_range=0.2,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        text_config=dict(vocab_size=202048, hidden_size=64, intermediate_size=96, intermediate_size_mlp=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=True,
                         no_rope_layer_interval=4, attention_chunk_size=16, attn_temperature_tuning=True,
                         floor_scale=8, attn_scale=0.1, max_position_embeddings=256, initializer_range=0.3,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, pad_token_id=None,
                         bos_token_id=200000, eos_token_id=200001),
        image_token_index=200092, boi_token_index=200080, eoi_token_index=200081)).eval()
    l4.save_pretrained(root / "llama4")
    shutil.copy(tok / "llama4" / "tokenizer.model", root / "llama4" / "tokenizer.model")
    torch.manual_seed(0)
    ml = MllamaForConditionalGeneration(MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                           intermediate_size=64, vision_output_dim=96, image_size=28, patch_size=14,
                           max_num_tiles=4, intermediate_layers_indices=[0, 2], initializer_range=0.3),
        text_config=dict(vocab_size=128256, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, cross_attention_layers=[1, 4],
                         max_position_embeddings=256, initializer_range=0.3, pad_token_id=None,
                         bos_token_id=128000, eos_token_id=128001,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        image_token_index=128256)).eval()
    with torch.no_grad():
        for name, p in ml.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.uniform_(-1.5, 1.5)
    ml.save_pretrained(root / "mllama")
    shutil.copy(tok / "llama3" / "tokenizer.model", root / "mllama" / "tokenizer.model")
    return {"llama4": str(root / "llama4"), "mllama": str(root / "mllama")}


def run_commit(tree: Path, folders: dict, no_native_decode: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    if no_native_decode:  # both commits on the PyTorch decode path: isolates a change from the C step's arithmetic
        env["HERD_NO_NATIVE_DECODE"] = "1"
    code = CHILD % {"prompts": PROMPTS}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(folders)], cwd=tree, env=env, capture_output=True,
                          text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PARITY ")), None)
    if line is None:
        raise SystemExit(f"{tree}: the child failed\n{proc.stderr[-3000:]}")
    return json.loads(line[len("PARITY "):])


def _first_difference(a, b, path="") -> str:
    """Where two JSON values first differ, with both values (floats by their difference)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    if isinstance(a, float) and isinstance(b, float):
        return f"{path}: {a} vs {b} (difference {b - a:.3g})"
    return f"{path}: {json.dumps(a)[:120]} vs {json.dumps(b)[:120]}"


def compare(old: dict, new: dict) -> list[dict]:
    rows = []
    for key in old:
        if key == "server":
            diffs = [_first_difference(a, b) for a, b in zip(old[key], new[key]) if a != b]
            rows.append({"check": "server bodies", "equal": not diffs, "differences": diffs[:4]})
            continue
        import numpy as np

        diff = float(np.abs(np.array(old[key]["logits"]) - np.array(new[key]["logits"])).max())
        rows.append({"check": key, "tokens_equal": old[key]["tokens"] == new[key]["tokens"], "max_logit_diff": diff})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new", nargs="?", default=None, help="a revision (default: this working tree)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parity_commits.json"))
    ap.add_argument("--no-native-decode", action="store_true", help="HERD_NO_NATIVE_DECODE=1 in both children")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = make_vision_folders(tmp)
        trees = []
        for rev in (args.old, args.new):
            if rev is None:
                trees.append(ROOT)
                continue
            tree = tmp / f"tree-{len(trees)}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
            trees.append(tree)
        try:
            results = [run_commit(t, folders, args.no_native_decode) for t in trees]
        finally:
            for t in trees:
                if t != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(t)], check=False)
    rows = compare(*results)
    report = {"old": args.old, "new": args.new or "working tree", "no_native_decode": args.no_native_decode,
              "checks": rows}  # the raw logits would be ~135 MB: the checks only
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for r in rows:
        print(json.dumps(r))
    return 0 if all(r.get("equal", r.get("tokens_equal")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
