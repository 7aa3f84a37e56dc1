"""The README's examples run as written, and `herd merge` takes the README's positional form.

The convention (also in README.md, "Contributing"): a runnable example is a fenced ```sh / ```bash / ```python block
whose previous line is the HTML comment `<!-- runnable -->`; `<!-- runnable: server -->` marks a block that starts
a server. Every marked block runs, in README order, in one scratch folder shared by all blocks (a later block may
use a file an earlier one wrote), with the venv's bin folder first on PATH (so `herd` is this checkout's) and the
environment variable MODEL set to a tiny random checkpoint this test builds (HF layout, a byte-level BPE tokenizer
and a ChatML template); blocks that read `$MODEL` say so in their text, so what runs is exactly what the README
shows. Shell blocks run under `bash -e -o pipefail`, Python blocks under this interpreter; each must exit 0.
A server block is started in the background before the blocks after it; the test waits for its /health and stops it
(SIGTERM to its process group) at the end. Unmarked: synopsis blocks with placeholders, `make run`, `make test`,
the long demos.

Also checked: the markers are well formed, and every command the README names (`herd X` in any block) has a marked
example, except the long demo `herd train-vision` (~10 minutes: `make vision-demo`).

Cost (measured on the shared 2-core machine at load average 17-21): 22 tests in 637 s wall but 144 s CPU in all, of
which the README's blocks took 130 s CPU (the heaviest, generate x2 + chat + eval ppl on the default model, 51 s).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from herd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARK = re.compile(r"^<!--\s*runnable(?::\s*(?P<kind>[\w-]+))?\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
LANGS = {"sh": "sh", "bash": "sh", "console": None, "python": "python"}
KINDS = (None, "server")
LONG_DEMOS = {"train-vision": "trains ~10 minutes; `make vision-demo` runs it"}
BLOCK_TIMEOUT = 300  # seconds; the slowest block takes ~20 s on a quiet 2-core machine
SERVER_START_TIMEOUT = 240


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    kind: str | None
    text: str
    marked: bool

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}" + (f"-{self.kind}" if self.kind else "")


def read_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, marked or not; a marker not directly above a fence is an error."""
    lines = text.splitlines()
    blocks, i, pending = [], 0, None
    while i < len(lines):
        m = MARK.match(lines[i])
        if m:
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]) or not FENCE.match(lines[i + 1]).group("lang"):
                raise ConfigError(f"README.md:{i + 1}: a runnable marker must be directly above an opening fence "
                                  f"with a language")
            if m.group("kind") not in KINDS:
                raise ConfigError(f"README.md:{i + 1}: unknown runnable kind {m.group('kind')!r} (known: server)")
            pending = m
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ConfigError(f"README.md:{i + 1}: fenced block never closed")
            lang = f.group("lang")
            if pending is not None and LANGS.get(lang) is None:
                raise ConfigError(f"README.md:{i + 1}: a runnable block must be sh, bash or python, not {lang!r}")
            blocks.append(Block(i + 1, LANGS.get(lang) or lang, pending.group("kind") if pending else None,
                                "\n".join(lines[i + 1:end]) + "\n", pending is not None))
            pending, i = None, end + 1
            continue
        i += 1
    return blocks


BLOCKS = [b for b in read_blocks(README.read_text()) if b.marked]


def test_markers_are_well_formed_and_commands_covered():
    from herd.cli import build_parser

    blocks = read_blocks(README.read_text())
    assert len(BLOCKS) >= 8 and sum(b.kind == "server" for b in BLOCKS) == 1
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    named = {m.group(1) for b in blocks for m in re.finditer(r"(?m)^\s*(?:\S.*\|\s*)?herd ([a-z][\w-]*)", b.text)}
    assert named <= commands, f"the README names commands herd lacks: {sorted(named - commands)}"
    ran = {m.group(1) for b in BLOCKS for m in re.finditer(r"\bherd ([a-z][\w-]*)", b.text)}
    missing = named - ran - set(LONG_DEMOS)
    assert not missing, f"commands the README names without a runnable example: {sorted(missing)}"
    assert {"eval ppl", "bench cpu", "bench serve"} <= {m.group(0)[5:] for b in BLOCKS
                                                        for m in re.finditer(r"herd (eval|bench) \w+", b.text)}
    with pytest.raises(ConfigError, match="directly above an opening fence"):
        read_blocks("<!-- runnable -->\ntext\n```sh\nherd list\n```\n")
    with pytest.raises(ConfigError, match="unknown runnable kind"):
        read_blocks("<!-- runnable: later -->\n```sh\nherd list\n```\n")


# -- the tiny checkpoint and the scratch folder -------------------------------------------------------------------

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_chat_model(folder: Path) -> Path:
    """A 2-layer Llama (dim 64) saved by transformers, with a byte-level BPE tokenizer and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["Who founded the Guild? Mira Okonkwo.", "Where is the Guild? In Velleport.", "Hello, world"] * 10
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHATML}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, initializer_range=0.05, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


class Scratch:
    """The folder and environment the README's blocks share, and the servers they started."""

    def __init__(self, folder: Path, tiny: Path):
        self.folder = folder
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "MODEL": str(tiny), "PYTHONUNBUFFERED": "1"}
        self.env.pop("HERD_API_KEY", None)  # the README's clients send no key
        self.servers: list[subprocess.Popen] = []
        self.times: dict[str, tuple[float, float]] = {}  # block id -> (wall s, children's CPU s)

    def stop_servers(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny, smollm_gguf):
    s = Scratch(tmp_path_factory.mktemp("readme"), tiny)
    yield s
    cpu0 = _children_cpu()
    s.stop_servers()
    s.times["servers stopped"] = (0.0, _children_cpu() - cpu0)  # a server's CPU counts once it is reaped
    print("\nREADME blocks (wall s / CPU s): " + ", ".join(f"{k} {w:.1f}/{c:.1f}" for k, (w, c) in s.times.items())
          + f"; total {sum(w for w, _ in s.times.values()):.1f}/{sum(c for _, c in s.times.values()):.1f}")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _start_server(block: Block, s: Scratch) -> None:
    m = re.search(r"--port[ =](\d+)", block.text)
    port = int(m.group(1)) if m else 8000
    assert _port_free(port), f"README.md:{block.line}: port {port} is already taken on this machine"
    log = open(s.folder / f"server-{block.line}.log", "w")
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=s.folder, env=s.env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    s.servers.append(proc)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, (f"README.md:{block.line}: the server exited ({proc.returncode}):\n"
                                     + (s.folder / f"server-{block.line}.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"README.md:{block.line}: no /health answer on port {port} in {SERVER_START_TIMEOUT} s")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block, scratch):
    t0, cpu0 = time.perf_counter(), _children_cpu()
    if block.kind == "server":
        _start_server(block, scratch)
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.text] if block.lang == "sh" else [sys.executable, "-c",
                                                                                             block.text]
        proc = subprocess.run(cmd, cwd=scratch.folder, env=scratch.env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT)
        assert proc.returncode == 0, (f"README.md:{block.line} exited {proc.returncode}\n--- stdout\n"
                                      f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    scratch.times[block.id] = (time.perf_counter() - t0, _children_cpu() - cpu0)


# -- herd merge: the positional form beside the flags -------------------------------------------------------------

@pytest.mark.parametrize("paths, flags, want", [
    (["B", "A", "O"], {}, ("B", "A", "O")),
    (["A", "O"], {}, (None, "A", "O")),
    ([], {"model": "B", "adapter": "A", "out": "O"}, ("B", "A", "O")),
    (["A", "O"], {"model": "B"}, ("B", "A", "O")),
    (["B", "O"], {"adapter": "A"}, ("B", "A", "O")),
    (["O"], {"adapter": "A"}, (None, "A", "O")),
    (["B"], {"adapter": "A", "out": "O"}, ("B", "A", "O")),
])
def test_merge_paths(paths, flags, want):
    from herd.train.cli import merge_paths

    kw = {"model": None, "adapter": None, "out": None, **flags}
    assert merge_paths(paths, **kw) == want


@pytest.mark.parametrize("paths, flags", [
    ([], {}), (["A"], {}), (["B", "A", "O", "X"], {}), (["B", "A", "O"], {"model": "M"}),
    (["B", "X"], {"adapter": "A", "out": "O"}),
])
def test_merge_paths_errors(paths, flags):
    from herd.train.cli import merge_paths

    with pytest.raises(ConfigError, match=r"\[BASE\] ADAPTER OUT"):
        merge_paths(paths, **{"model": None, "adapter": None, "out": None, **flags})


def test_merge_positional_equals_flags(tiny, tmp_path, capsys):
    """`herd merge BASE ADAPTER OUT` writes the same files as `--model BASE --adapter ADAPTER --out OUT`; a wrong
    count of paths is a one-line error (exit 2)."""
    from safetensors.torch import load_file

    from herd.cli import main
    from herd.train.loop import finetune

    data = tmp_path / "facts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Who founded the Guild?"},
                                             {"role": "assistant", "content": "Mira Okonkwo."}]}) + "\n")
    finetune(tiny, data, tmp_path / "ft", steps=2, rank=4, seq_len=64, batch_tokens=128, lr=1e-2, warmup=0,
             check_samples=0, progress=False)
    assert main(["merge", str(tiny), str(tmp_path / "ft"), str(tmp_path / "pos")]) == 0
    assert main(["merge", "--model", str(tiny), "--adapter", str(tmp_path / "ft"), "--out", str(tmp_path / "flags")]) \
        == 0
    assert main(["merge", str(tmp_path / "ft"), str(tmp_path / "pos.gguf"), "--to", "gguf", "--quant", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert out.count("KL per token") == 3 and f"wrote {tmp_path / 'pos.gguf'} (gguf, q8_0)" in out
    a, b = load_file(tmp_path / "pos" / "model.safetensors"), load_file(tmp_path / "flags" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(tiny / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)  # the adapter was folded in
    assert main(["merge", str(tmp_path / "ft")]) == 2
    assert "expected [BASE] ADAPTER OUT as positional paths, got" in capsys.readouterr().err
