"""The CLI contract, run as a user runs it: `python -m herd ...` in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

import herd


def run(*args, input=None, check=True):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    p = subprocess.run([sys.executable, "-m", "herd", *args], capture_output=True, text=True, input=input, env=env,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"herd {' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}")
    return p


def test_generate_json_equals_library(smollm_gguf):
    p = run("generate", "--model", str(smollm_gguf), "--prompt", "Name a colour.", "--max-tokens", "12", "--json")
    out = json.loads(p.stdout)
    llm = herd.load(smollm_gguf)
    c = llm.generate("Name a colour.", max_tokens=12)
    assert out["prompt_ids"] == c.prompt_ids and out["output_ids"] == c.output_ids and out["text"] == c.text
    raw = json.loads(run("generate", "--model", str(smollm_gguf), "--prompt", "The sky is", "--raw",
                         "--max-tokens", "5", "--json").stdout)
    assert raw["prompt_ids"] == llm.tokenizer.encode("The sky is", bos=llm.tokenizer.add_bos)


def test_generate_quantized_equals_the_quantized_library_model_and_the_float_one(smollm_gguf):
    """--quantized runs the GGUF blocks (kernels + C decode step): the library's quantized model exactly, and here
    the same greedy tokens as the float model."""
    args = ("generate", "--model", str(smollm_gguf), "--prompt", "Name a colour.", "--max-tokens", "12", "--json")
    out = json.loads(run(*args, "--quantized").stdout)
    q = herd.load(smollm_gguf, keep_quantized=True).generate("Name a colour.", max_tokens=12)
    assert out["output_ids"] == q.output_ids
    assert out["output_ids"] == json.loads(run(*args).stdout)["output_ids"]


def test_generate_streams_text_and_default_model_is_used():
    p = run("generate", "--prompt", "What is the capital of France?", "--max-tokens", "12")
    assert "Paris" in p.stdout


def test_seeded_sampling_is_reproducible(smollm_gguf):
    a = run("generate", "-m", str(smollm_gguf), "-p", "Tell me a story.", "--temperature", "0.9", "--top-p", "0.9",
            "--seed", "7", "--max-tokens", "16", "--json").stdout
    b = run("generate", "-m", str(smollm_gguf), "-p", "Tell me a story.", "--temperature", "0.9", "--top-p", "0.9",
            "--seed", "7", "--max-tokens", "16", "--json").stdout
    assert json.loads(a)["output_ids"] == json.loads(b)["output_ids"]


def test_chat_with_piped_stdin_answers_once(smollm_gguf):
    p = run("chat", "--model", str(smollm_gguf), "--max-tokens", "16", input="What is the capital of France?\n")
    assert "Paris" in p.stdout


def test_tokenize_and_info(smollm_gguf):
    out = json.loads(run("tokenize", "--model", str(smollm_gguf), "Hello world", "--json").stdout)
    assert out["ids"] == herd.load(smollm_gguf).tokenizer.encode("Hello world")
    info = json.loads(run("info", str(smollm_gguf)).stdout)
    assert info["format"] == "gguf" and info["config"]["n_layers"] == 30
    assert 130e6 < info["params"] < 140e6


def test_errors_are_clear_and_exit_2(tmp_path):
    p = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x", check=False)
    assert p.returncode == 2 and "is not an existing path" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    p = run("info", str(bad), check=False)
    assert p.returncode == 2 and "bad.gguf" in p.stderr and "Traceback" not in p.stderr
    p = run("generate", "--prompt", "x", "--temperature", "-1", check=False)
    assert p.returncode == 2 and "temperature" in p.stderr


def test_convert_hf_meta_gguf(tmp_path):
    from refmodels import save_hf_model

    save_hf_model("llama3-gqa", tmp_path / "hf")
    run("convert", str(tmp_path / "hf"), str(tmp_path / "meta"), "--to", "meta", "--shards", "2")
    run("convert", str(tmp_path / "meta"), str(tmp_path / "hf2"), "--to", "hf", "--dtype", "bfloat16")
    info = json.loads(run("info", str(tmp_path / "hf2")).stdout)
    assert info["format"] == "hf" and info["config"]["n_kv_heads"] == 2
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == 2
