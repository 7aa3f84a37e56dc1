"""CLI flags that had no test: each run through `herd.cli.main([...])` in-process (output captured), checked
against the library call with the same options and shown to change what it should. The models are tiny (a 2-layer
Llama saved by transformers with a small BPE tokenizer and a ChatML template, and its Q8_0 GGUF), except for
Ctrl-C, which needs a real process, a real signal and a reply long enough to interrupt: `python -m herd chat` on
the default model in a subprocess."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import herd.api
from herd.api import load
from herd.cli import main
from herd.formats.peft import apply_adapter, save_adapter
from herd.models.lora import apply_lora, lora_modules

PROMPT = "Paris is the capital of"
N = 12  # generated tokens per check


def tiny_chat_model(folder: Path) -> Path:
    """A 2-layer Llama (dim 64) saved by transformers, with a small byte-level BPE tokenizer and a ChatML template,
    so that it chats, and GGUF files made from it carry a vocabulary llama.cpp can load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
              "One, two, three, four, five, six, seven."] * 4
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": chatml}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                      rope_theta=10000.0, initializer_range=0.3, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def random_adapter(llm, folder: Path, base: Path, targets: str, seed: int, scale: float) -> Path:
    """Give llm's model a LoRA adapter with random non-zero A and B and save it (PEFT layout) naming `base`."""
    apply_lora(llm.model, rank=4, alpha=8, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora_modules(llm.model).values():
            mod.lora_A.weight.copy_(torch.randn(mod.lora_A.weight.shape, generator=g) * scale)
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * scale)
    save_adapter(llm.model, folder, base_model=str(base))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    from herd.formats.convert import convert

    return Path(convert(tiny, tmp_path_factory.mktemp("gguf") / "tiny.q8_0.gguf", to="gguf", quant="q8_0"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 6)
    return path


def cli(capsys, *argv) -> str:
    """Run `herd ARGV` in-process; exit code 0 expected; its stdout."""
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return out.out


def cli_json(capsys, *argv) -> dict:
    return json.loads(cli(capsys, *argv))


# --------------------------------------------------------------------------- generate: sampling flags

def test_generate_top_k_min_p_and_repetition_penalty(capsys, tiny):
    m = ("generate", "-m", str(tiny), "-p", PROMPT, "--max-tokens", str(N), "--json")
    llm = load(tiny)
    greedy = cli_json(capsys, *m)["output_ids"]
    sampled = cli_json(capsys, *m, "--temperature", "1.0", "--seed", "5")["output_ids"]
    assert sampled == llm.generate(PROMPT, max_tokens=N, temperature=1.0, seed=5).output_ids
    assert sampled != greedy

    # top-k 1 and min-p 1 leave only the most likely token: the same seed now gives the greedy tokens
    assert cli_json(capsys, *m, "--temperature", "1.0", "--seed", "5", "--top-k", "1")["output_ids"] == greedy
    assert cli_json(capsys, *m, "--temperature", "1.0", "--seed", "5", "--min-p", "1.0")["output_ids"] == greedy
    # looser settings: the library's tokens with the same options, and not the unfiltered draws
    for flags, kw in ((("--top-k", "3"), dict(top_k=3)), (("--min-p", "0.3"), dict(min_p=0.3))):
        got = cli_json(capsys, *m, "--temperature", "1.0", "--seed", "5", *flags)["output_ids"]
        assert got == llm.generate(PROMPT, max_tokens=N, temperature=1.0, seed=5, **kw).output_ids
        assert got != sampled, flags

    # the repetition penalty (greedy): the library's tokens, fewer repeats than without it
    penalised = cli_json(capsys, *m, "--repetition-penalty", "3.0")["output_ids"]
    assert penalised == llm.generate(PROMPT, max_tokens=N, repetition_penalty=3.0).output_ids
    assert penalised != greedy and len(set(penalised)) > len(set(greedy)), (greedy, penalised)


def test_generate_stop_strings(capsys, tiny):
    m = ("generate", "-m", str(tiny), "-p", PROMPT, "--max-tokens", "24")
    text = cli_json(capsys, *m, "--json")["text"]
    stop_a, stop_b = text[6:8], text[10:13]  # two pieces of the greedy answer; a repeatable flag
    assert stop_a.strip() and stop_b.strip() and stop_a not in text[:6], text
    got = cli_json(capsys, *m, "--json", "--stop", stop_b, "--stop", stop_a)
    cut = min(text.index(stop_a), text.index(stop_b))  # the first match of either ends the answer
    assert got["finish_reason"] == "stop" and got["text"] == text[:cut]
    want = load(tiny).generate(PROMPT, max_tokens=24, stop=[stop_b, stop_a])
    assert (got["text"], got["output_ids"]) == (want.text, want.output_ids)
    # streamed (no --json): the same text, and nothing of a stop string leaks out
    assert cli(capsys, *m, "--stop", stop_b, "--stop", stop_a) == want.text + "\n"


# --------------------------------------------------------------------------- generate: --dtype and --adapter

def test_generate_dtype_bfloat16(capsys, monkeypatch, tiny):
    """--dtype bfloat16: the weights the CLI ran are bfloat16 (the checkpoint is float32), and its tokens are those
    of herd.load(path, "bfloat16") run separately; the logits differ from float32's."""
    real, used = herd.api.load, []
    monkeypatch.setattr(herd.api, "load", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    m = ("generate", "-m", str(tiny), "-p", PROMPT, "--max-tokens", str(N), "--json")
    got = cli_json(capsys, *m, "--dtype", "bfloat16")
    assert {p.dtype for p in used[0].model.parameters()} == {torch.bfloat16}
    ref = real(tiny, "bfloat16")
    assert got["output_ids"] == ref.generate(PROMPT, max_tokens=N).output_ids
    cli_json(capsys, *m, "--dtype", "float32")
    assert {p.dtype for p in used[1].model.parameters()} == {torch.float32}
    ids = torch.tensor([ref.encode_prompt(PROMPT)])
    with torch.inference_mode():
        bf = used[0].model(ids)[0, -1].float()
        assert torch.equal(bf, ref.model(ids)[0, -1].float())
        assert (bf - used[1].model(ids)[0, -1]).abs().max() > 1e-3  # bf16 rounding shows in the logits
    assert main(["generate", "-m", str(tiny), "-p", "x", "--dtype", "float8"]) == 2
    assert "float8" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_adapter(tiny, tmp_path_factory) -> Path:
    return random_adapter(load(tiny), tmp_path_factory.mktemp("adapter"), tiny, "wq,wv,w2", seed=0, scale=0.3)


def test_generate_adapter(capsys, tiny, tiny_adapter):
    """--adapter without --model: the base comes from the adapter; the tokens are the library's with the adapter
    applied, and not the base model's."""
    got = cli_json(capsys, "generate", "--adapter", str(tiny_adapter), "-p", PROMPT, "--max-tokens", str(N),
                   "--json")["output_ids"]
    adapted = load(tiny)
    apply_adapter(adapted.model, tiny_adapter)
    assert got == adapted.generate(PROMPT, max_tokens=N).output_ids
    assert got != load(tiny).generate(PROMPT, max_tokens=N).output_ids


# --------------------------------------------------------------------------- eval ppl

def test_eval_ppl_quantized_dequantize_adapter(capsys, tiny_gguf, text_file, tmp_path):
    """On a Q8_0 GGUF: --quantized runs the blocks (native kernels), --dequantize the float path, --adapter adds a
    LoRA adapter over the blocks; each report equals herd.eval.ppl.perplexity on the library's model loaded and
    adapted the same way, and each flag changes the figure."""
    from herd.eval.ppl import perplexity

    e = ("eval", "ppl", "-m", str(tiny_gguf), "--file", str(text_file), "--ctx", "32", "--max-chunks", "3", "--json")

    def lib(llm):
        return perplexity(llm, text_file.read_text(), ctx=32, max_chunks=3, progress=False)

    blocks = load(tiny_gguf, keep_quantized=True)
    assert type(blocks.model.layers[0].attention.wq).__name__ == "QuantLinear"
    dense = load(tiny_gguf, keep_quantized=False)
    assert type(dense.model.layers[0].attention.wq) is torch.nn.Linear
    got_q = cli_json(capsys, *e, "--quantized")
    got_d = cli_json(capsys, *e, "--dequantize")
    assert got_q == lib(blocks) and got_d == lib(dense)
    # the same weights: int8/int16 activations in the kernels against float32; close, not equal
    assert got_q["ppl"] != got_d["ppl"] and abs(got_q["ppl"] / got_d["ppl"] - 1) < 0.01, (got_q, got_d)

    adapter = random_adapter(load(tiny_gguf), tmp_path / "adapter", tiny_gguf, "wq,wv", seed=2, scale=0.3)
    got_a = cli_json(capsys, *e, "--adapter", str(adapter))
    apply_adapter(blocks.model, adapter)
    assert got_a == lib(blocks)
    assert abs(got_a["ppl"] / got_q["ppl"] - 1) > 0.01  # the adapter matters


# --------------------------------------------------------------------------- chat

class _Stdin(io.StringIO):
    def __init__(self, text: str, tty: bool):
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _replies(out: str) -> list[str]:
    """The assistant's replies in an interactive session: what follows each '> ' prompt, less the notes '(...)'."""
    after = [seg.removesuffix("\n") for seg in out.split("\n> ")[1:]]
    return [seg for seg in after if seg and not seg.startswith("(")]


def test_chat_system_piped(capsys, monkeypatch, tiny):
    c = ("chat", "-m", str(tiny), "--max-tokens", str(N))
    system, question = "You are a fox.", "Who jumps over the dog?"
    llm = load(tiny)
    monkeypatch.setattr(sys, "stdin", _Stdin(question + "\n", tty=False))
    got = cli(capsys, *c, "--system", system)
    want = llm.generate([{"role": "system", "content": system}, {"role": "user", "content": question}],
                        max_tokens=N).text
    assert got == want + "\n"
    monkeypatch.setattr(sys, "stdin", _Stdin(question + "\n", tty=False))
    assert cli(capsys, *c) == llm.generate(question, max_tokens=N).text + "\n" != got


def test_chat_commands_system_and_reset(capsys, monkeypatch, tiny):
    """An interactive session (stdin a terminal): /system replaces the system prompt and clears the history,
    /reset clears the history and keeps the system prompt; each reply is the library's for the messages the
    session should hold at that point."""
    llm = load(tiny)
    sys_a, sys_b = "Answer in French.", "Answer in one word."
    q1, q2 = "What is the capital of France?", "And of Italy?"
    script = [f"/system {sys_a}", q1, q2, "/reset", q2, f"/system {sys_b}", q2, "/system", q2, "/exit"]
    monkeypatch.setattr(sys, "stdin", _Stdin("\n".join(script) + "\n", tty=True))
    out = cli(capsys, "chat", "-m", str(tiny), "--system", "Be brief.", "--max-tokens", str(N))
    assert out.count("(system prompt set; history cleared)") == 2 and "(history cleared)" in out
    assert "(system prompt removed)" in out

    def reply(*messages):
        return llm.generate([{"role": r, "content": t} for r, t in messages], max_tokens=N).text

    r1 = reply(("system", sys_a), ("user", q1))
    r2 = reply(("system", sys_a), ("user", q1), ("assistant", r1), ("user", q2))
    r3 = reply(("system", sys_a), ("user", q2))  # after /reset: the system prompt stays, the history goes
    r4 = reply(("system", sys_b), ("user", q2))
    r5 = reply(("user", q2))  # /system alone: no system prompt
    assert _replies(out) == [r1, r2, r3, r4, r5]
    assert len({r2, r3, r4, r5}) == 4  # each change of history or system prompt is seen in the reply


# --------------------------------------------------------------------------- Ctrl-C in herd chat (real signals)

def _spawn_chat(model, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
    # SIGINT back to its default in the child: a test run started in the background (`cmd &` in a script) ignores
    # SIGINT, the child would inherit that, and Python installs no KeyboardInterrupt handler for an ignored signal
    return subprocess.Popen([sys.executable, "-m", "herd", "chat", "-m", str(model), *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _read_some(p: subprocess.Popen, timeout: float) -> bytes:
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return os.read(p.stdout.fileno(), 4096) if ready else b""


def test_ctrl_c_stops_a_reply_and_keeps_what_was_said(smollm_gguf):
    """SIGINT mid-reply: the reply stops with ' [stopped]', the process exits 0 at once, no traceback."""
    p = _spawn_chat(smollm_gguf, "--max-tokens", "2000")
    try:
        p.stdin.write(b"Count from 1 to 500, one number per line.\n")
        p.stdin.close()
        first = _read_some(p, 120)
        assert first, p.stderr.read().decode()[-2000:]
        p.send_signal(signal.SIGINT)
        t = time.monotonic()
        p.wait(timeout=60)
        took = time.monotonic() - t
        rest, err = p.stdout.read(), p.stderr.read()
    finally:
        p.kill()
    out = (first + rest).decode()
    assert p.returncode == 0 and out.endswith(" [stopped]\n"), (p.returncode, out[-300:], err.decode()[-2000:])
    assert b"Traceback" not in err and took < 30
    assert out.count("\n") < 400  # it did stop: 500 numbers would be 500 lines


def _waits_on_stdin(pid: int) -> bool:
    """Whether the process's main thread is blocked in read(0, ...) (Linux: syscall 0 with fd 0)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[:2] == ["0", "0x0"]
    except OSError:
        return False


def test_ctrl_c_while_waiting_for_input_exits_130(tiny):
    """SIGINT while the chat waits for the piped question (model loaded): exit 130, nothing printed, no traceback."""
    p = _spawn_chat(tiny, "--max-tokens", "4")
    try:
        deadline = time.monotonic() + 120
        while not _waits_on_stdin(p.pid) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert _waits_on_stdin(p.pid), "herd chat never blocked reading its stdin"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and b"Traceback" not in err and out == b"", (p.returncode, err.decode()[-2000:])


# --------------------------------------------------------------------------- convert and merge to GGUF

def gguf_types(path: Path) -> dict[str, str]:
    """tensor name -> GGML type name, read by llama.cpp's own gguf-py."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """Every position's logits (T, V) of a GGUF file run by llama.cpp (llama-cpp-python)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF reference")
    ll = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        ll.eval(ids)
        return torch.tensor(ll.scores[:len(ids)]).float()
    finally:
        ll.close()


IDS = [270, 293, 296, 101, 55, 12, 33]


def test_convert_to_gguf_with_quant(capsys, tiny, tmp_path):
    """--quant picks the block format: the tensors' types read back with llama.cpp's gguf-py, their blocks
    bit-identical to gguf-py's reference quantizer applied to the checkpoint's weights, and the whole file
    byte-identical to the library's convert() with the same options."""
    from gguf import GGMLQuantizationType, GGUFReader, quants
    from safetensors.torch import load_file

    from herd.formats.convert import convert

    hf = load_file(tiny / "model.safetensors")
    sizes = {}
    for quant in ("q8_0", "q4_0"):
        ggml = GGMLQuantizationType[quant.upper()]
        out = tmp_path / f"{quant}.gguf"
        assert f"wrote {out}" in cli(capsys, "convert", str(tiny), str(out), "--to", "gguf", "--quant", quant)
        tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
        assert {tensors[n].tensor_type for n in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight")} == {ggml}
        assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
        # tensors that keep HF's row order (q and k are permuted for llama.cpp's rope layout)
        for name, key in (("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                          ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight")):
            want = quants.quantize(hf[key].float().numpy(), ggml)
            assert (tensors[name].data.reshape(want.shape) == want).all(), (quant, name)
        lib = convert(tiny, tmp_path / f"lib-{quant}.gguf", to="gguf", quant=quant)
        assert out.read_bytes() == Path(lib).read_bytes()
        sizes[quant] = out.stat().st_size
    assert sizes["q4_0"] < sizes["q8_0"]


def test_merge_to_gguf(capsys, tiny, tmp_path):
    """`herd merge --adapter A --out M.gguf --to gguf`: f16 blocks by default; llama.cpp and herd both run the
    merged file close to the unmerged base + adapter; the same file as herd.train.merge.merge()."""
    from herd.train.merge import merge

    base = load(tiny)
    random_adapter(base, tmp_path / "adapter", tiny, "wq,wv,w2", seed=1, scale=0.3)
    with torch.inference_mode():
        want = base.model(torch.tensor([IDS]))[0].float()
        plain = load(tiny).model(torch.tensor([IDS]))[0].float()
    assert (want - plain).abs().max() > 0.5  # the adapter matters

    out = tmp_path / "merged.gguf"
    text = cli(capsys, "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--to", "gguf")
    assert f"wrote {out} (gguf, f16)" in text and "KL per token" in text
    assert gguf_types(out)["blk.0.attn_v.weight"] == "F16"
    merge(None, tmp_path / "adapter", tmp_path / "lib.gguf", to="gguf")
    assert out.read_bytes() == (tmp_path / "lib.gguf").read_bytes()
    with torch.inference_mode():
        herd_err = (load(out).model(torch.tensor([IDS]))[0].float() - want).abs().max().item()
    cpp_err = (llama_cpp_logits(out, IDS) - want).abs().max().item()
    # f16 weights against the float32 unmerged sum, logits up to ~8 on this random model: measured max |diff|
    # 0.015 (herd) and 0.018 (llama.cpp); the adapter itself moves them by more than 0.5
    assert herd_err < 0.15 and cpp_err < 0.15, (herd_err, cpp_err)


# --------------------------------------------------------------------------- bench and tokenize

def test_bench_smallest_run_reports(capsys, tiny_gguf, tmp_path):
    """`herd bench` at its smallest: herd alone on the tiny GGUF, 1 thread, depth 0, one repetition of an 8-token
    prefill and 4 decode steps; it prints the table and writes the JSON with positive rates for both tests."""
    out = cli(capsys, "bench", "--model", str(tiny_gguf), "--engines", "herd", "--threads", "1", "--depths", "0",
              "-r", "1", "-p", "8", "-n", "4", "--batch", "0", "--out", str(tmp_path))
    assert "| pp8 | 1 | 0 |" in out and "| tg4 | 1 | 0 |" in out
    (js,) = tmp_path.glob("bench_cpu_*.json")
    report = json.loads(js.read_text())
    (run,) = report["engines"]["herd"]
    rates = {r["test"]: r["tok_s_mean"] for r in run["results"]}
    assert rates.keys() == {"pp8", "tg4"} and all(v > 0 for v in rates.values()), rates
    assert report["settings"]["n_prompt"] == 8 and report["settings"]["n_gen"] == 4


@pytest.mark.parametrize("flag", [["--quantized"], ["--dequantize"], ["--adapter", "x"], ["--dtype", "bfloat16"],
                                  ["--quantization", "q8_0"], ["--kv-type", "f16"]])
def test_tokenize_offers_no_weight_flags(capsys, flag):
    """tokenize loads no weights: a weight flag is an argparse error (exit 2) naming it, not silently ignored."""
    with pytest.raises(SystemExit) as e:
        main(["tokenize", "hello", *flag])
    assert e.value.code == 2 and f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err
