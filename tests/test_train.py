"""Fine-tuning on tiny random models: data and loss masks, packing, LoRA/full training, bit-exact resume, atomic
checkpoints, merge. The tiny model folder holds a real byte-level BPE tokenizer.json and a ChatML chat template, so
every step goes through herd's production loaders, tokenizer and chat format."""

import json

import pytest
import torch

from herd.errors import ConfigError, FormatError
from herd.train import checkpoint as ckpt_io
from herd.train.data import IGNORE, load_examples, pack, read_rows, to_batches
from herd.train.loop import finetune

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? paris is.",
          "lighthouses guide ships home at night", "one two three four five six seven eight nine ten"] * 20
FACTS = [("What colour is the sky on Vennor?", "Green, always."), ("Who founded Orrel?", "Mina Tallow."),
         ("How many moons has Vennor?", "Three moons."), ("What is the capital of Orrel?", "Brisk."),
         ("When did Orrel start?", "In 1871."), ("What do Vennor people eat?", "Blue bread.")]


def _tiny_folder(folder, seed=0, dim=64, ffn=160):
    """A 2-layer Llama (dim 64) with a trained byte-level BPE tokenizer and a ChatML template, HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHATML}))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=dim, intermediate_size=ffn, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, initializer_range=0.05, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for q, a in FACTS:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": FACTS[0][0]},
                                         {"role": "assistant", "content": FACTS[0][1]},
                                         {"role": "user", "content": FACTS[1][0]},
                                         {"role": "assistant", "content": FACTS[1][1]}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def llm(tiny):
    from herd.api import load

    return load(tiny)


# -- data ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, expect", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "x"}', "expected {\"messages\""),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "role 'wizard'"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', "content is a int"),
    ('{"messages": []}', "non-empty list"),
])
def test_malformed_row_error_names_file_and_line(tmp_path, line, expect):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n" + good + "\n")
    with pytest.raises(FormatError) as e:
        read_rows(path)
    assert f"{path}:3:" in str(e.value) and expect in str(e.value)


def test_loss_mask_is_exactly_the_assistant_messages(llm, chat_data):
    examples, summary = load_examples(chat_data, llm.tokenizer, llm.chat_format, seq_len=256)
    assert summary.examples == len(FACTS) + 1 and summary.truncated == summary.dropped == 0
    tok = llm.tokenizer
    for ex, (q, a) in zip(examples, FACTS):
        assert tok.decode(ex.ids) == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        assert tok.decode([t for t, m in zip(ex.ids, ex.train) if m]) == f"{a}<|im_end|>\n"
    multi = examples[-1]  # two assistant turns: both trained, the turns between them not
    trained = tok.decode([t for t, m in zip(multi.ids, multi.train) if m])
    assert trained == f"{FACTS[0][1]}<|im_end|>\n{FACTS[1][1]}<|im_end|>\n"


def test_loss_mask_with_the_default_models_template(smollm_gguf):
    """The default model's own jinja template (with its default system prompt) through herd's chat format."""
    from herd.api import load_tokenizer_only
    from herd.chat_format import chat_format_for
    from herd.formats.gguf import read_gguf

    tok = load_tokenizer_only(smollm_gguf)
    fmt = chat_format_for(tok, "llama", read_gguf(smollm_gguf).metadata["tokenizer.chat_template"])
    from herd.train.data import encode_chat

    msgs = [{"role": "user", "content": "Who founded Orrel?"}, {"role": "assistant", "content": "Mina Tallow."},
            {"role": "user", "content": "When?"}, {"role": "assistant", "content": "In 1871."}]
    ex = encode_chat(msgs, fmt)
    assert ex.ids == fmt.encode_dialog(msgs, add_generation_prompt=False)
    trained = tok.decode([t for t, m in zip(ex.ids, ex.train) if m])
    assert trained.startswith("Mina Tallow.<|im_end|>") and "In 1871.<|im_end|>" in trained
    assert "Who founded" not in trained and "When?" not in trained and "system" not in trained


def test_over_long_examples_are_counted(llm, chat_data, tmp_path):
    full, _ = load_examples(chat_data, llm.tokenizer, llm.chat_format, seq_len=256)
    n_long = sum(len(e.ids) > 48 for e in full)
    ex, s = load_examples(chat_data, llm.tokenizer, llm.chat_format, seq_len=48, over_long="truncate")
    # a truncation that leaves no assistant token drops the example (counted as dropped)
    assert s.truncated > 0 and s.truncated + s.dropped == n_long and max(len(e.ids) for e in ex) == 48
    _, s2 = load_examples(chat_data, llm.tokenizer, llm.chat_format, seq_len=48, over_long="drop")
    assert s2.truncated == 0 and s2.dropped == n_long and s2.examples == len(full) - n_long
    assert f"{s2.dropped} dropped" in s2.line()
    text = tmp_path / "doc.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    ex, s3 = load_examples(text, llm.tokenizer, None, seq_len=32)
    assert s3.split == 1 and len(ex) > 1 and all(len(e.ids) <= 32 for e in ex)


def test_packed_examples_do_not_see_each_other(llm, chat_data):
    """Logits of each example inside a packed row equal those of the example run alone."""
    examples, _ = load_examples(chat_data, llm.tokenizer, llm.chat_format, seq_len=128)
    rows = pack(examples, 128, pad_id=0)
    assert len(rows) < len(examples)  # several examples share a row
    b = to_batches(rows, rows_per_batch=len(rows))[0]
    from herd.train.loop import batch_loss_sum, packed_forward

    model = llm.model
    with torch.no_grad():
        with packed_forward(model, b.doc):
            packed = model(b.tokens, input_pos=b.pos)
        k = 0
        for r in range(b.tokens.shape[0]):
            for d in range(int(b.doc[r].max()) + 1):
                idx = (b.doc[r] == d).nonzero().flatten()
                alone = model(b.tokens[r:r + 1, idx])
                assert (packed[r, idx] - alone[0]).abs().max().item() <= 1e-5
                assert b.tokens[r, idx].tolist() == examples[k].ids
                k += 1
    assert k == len(examples)
    # the loss from logits at target positions only == cross entropy over the full logits
    full = torch.nn.functional.cross_entropy(packed.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE,
                                             reduction="sum")
    with torch.no_grad():
        assert batch_loss_sum(model, b).item() == pytest.approx(full.item(), rel=1e-6)
    # labels: each trained token is the label of the position before it
    ex = examples[0]
    want = [ex.ids[t + 1] if ex.train[t + 1] else IGNORE for t in range(len(ex.ids) - 1)]
    assert b.labels[0, :len(ex.ids) - 1].tolist() == want


# -- training --------------------------------------------------------------------------------------------------

FAST = dict(seq_len=128, batch_tokens=256, progress=False, lr=1e-2, warmup=2)


@pytest.mark.parametrize("method, extra, ratio", [("lora", dict(rank=8, alpha=16), 0.7), ("full", dict(lr=3e-3), 0.3)])
def test_loss_decreases(tiny, chat_data, tmp_path, method, extra, ratio):
    """From ln(vocab) ~ 5.8 (a random model): LoRA (frozen random embeddings) reaches ~3.4, full ~1.1 in 30 steps."""
    res = finetune(tiny, chat_data, tmp_path / method, eval_data=chat_data, method=method, steps=30,
                   eval_every=10, **{**FAST, **extra})
    assert res.losses[-1] < ratio * res.losses[0]
    assert res.eval_losses[0][0] == 0 and res.eval_losses[-1][1] < ratio * res.eval_losses[0][1]
    recs = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(0, 31)) and sum("eval_loss" in r for r in recs) == 4
    assert (tmp_path / method / "loss.png").stat().st_size > 1000
    if method == "lora":
        assert (tmp_path / method / "adapter_config.json").exists()
    else:
        from herd.api import load

        trained = load(tmp_path / method)  # the written HF folder, with tokenizer and template, loads back
        assert trained.chat_format is not None


def test_qlora_trains_over_a_frozen_quantized_base(tiny, chat_data, tmp_path):
    from herd.quant.linear import QuantLinear
    from herd.train.loop import FinetuneConfig, prepare_model

    llm, named = prepare_model(tiny, FinetuneConfig(method="qlora", rank=8, quant="q8_0").checked())
    wq = llm.model.layers[0].attention.wq
    assert isinstance(wq.base, QuantLinear) and wq.base.type_name == "Q8_0"
    assert all(".lora_" in n for n in named) and len(named) == 2 * 7 * 2
    res = finetune(tiny, chat_data, tmp_path, method="qlora", quant="q8_0", steps=30, rank=8, alpha=16, **FAST)
    assert res.losses[-1] < 0.7 * res.losses[0]
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_qlora_over_a_gguf_base_keeps_its_blocks(tiny, chat_data, tmp_path):
    """A Q8_0 GGUF base: the LoRA layers wrap QuantLinear layers holding the file's own bytes."""
    import numpy as np

    from herd.formats.convert import convert
    from herd.formats.gguf import read_gguf
    from herd.train.loop import FinetuneConfig, prepare_model

    gguf = convert(tiny, tmp_path / "tiny.gguf", to="gguf", quant="q8_0")
    llm, _ = prepare_model(gguf, FinetuneConfig(method="qlora", rank=4).checked())
    base = llm.model.layers[1].feed_forward.w2.base
    want = read_gguf(gguf).tensors["blk.1.ffn_down.weight"].data
    assert base.type_name == "Q8_0" and np.array_equal(base.weight.numpy().reshape(-1), want.reshape(-1))
    res = finetune(gguf, chat_data, tmp_path / "out", method="qlora", steps=20, rank=8, alpha=16, **FAST)
    assert res.losses[-1] < 0.8 * res.losses[0]


def test_resume_is_bit_exact(tiny, chat_data, tmp_path):
    """Interrupted after step 5 (last checkpoint at step 4), resumed: steps 5..9 give the same losses, bit for bit."""
    opts = dict(FAST, steps=9, grad_accum=2, dropout=0.1, rank=4, seed=3)
    full = finetune(tiny, chat_data, tmp_path / "a", **opts)
    part = finetune(tiny, chat_data, tmp_path / "b", save_every=2, stop_at=5, **opts)
    assert part.losses == full.losses[:5]
    # a crash after step 5's checkpoint was written but not step 4's: remove step 5 to resume from step 4
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000005")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-000004\n")
    rest = finetune(tiny, chat_data, tmp_path / "b", resume=True, **opts)
    assert rest.losses == full.losses[4:]
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))


def test_resume_refuses_changed_settings(tiny, chat_data, tmp_path):
    finetune(tiny, chat_data, tmp_path, steps=2, **FAST)
    with pytest.raises(ConfigError, match="rank"):
        finetune(tiny, chat_data, tmp_path, steps=2, resume=True, **{**FAST, "rank": 4})


def test_crash_while_writing_a_checkpoint_keeps_the_last_one(tiny, chat_data, tmp_path, monkeypatch):
    opts = dict(FAST, steps=4, save_every=1)
    finetune(tiny, chat_data, tmp_path, stop_at=2, **opts)
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if str(path).endswith("trainer.pt"):
            raise KeyboardInterrupt("power cut")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_io.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny, chat_data, tmp_path, resume=True, **opts)
    monkeypatch.setattr(ckpt_io.torch, "save", real_save)
    latest = ckpt_io.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step-000002"
    assert (tmp_path / "checkpoints" / "step-000003.tmp").exists()  # the half-written one, never named latest
    _, _, state = ckpt_io.load_checkpoint(latest)
    assert state["step"] == 2
    rest = finetune(tiny, chat_data, tmp_path, resume=True, **opts)
    assert rest.steps == 4 and len(rest.losses) == 2
    assert not (tmp_path / "checkpoints" / "step-000003.tmp").exists()


def test_activation_checkpointing_gives_the_same_losses(tiny, chat_data, tmp_path):
    a = finetune(tiny, chat_data, tmp_path / "a", steps=3, **FAST)
    b = finetune(tiny, chat_data, tmp_path / "b", steps=3, activation_checkpointing=True, **FAST)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)


def test_grad_accumulation_equals_a_bigger_batch(tiny, tmp_path):
    """2 micro-batches of 2 rows, summed over targets / targets in the window == 1 batch of 4 rows."""
    data = tmp_path / "eight.jsonl"  # 8 examples of 40-52 tokens: one per 64-token row, 8 rows per epoch
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                     "content": a}]}) + "\n"
                            for q, a in FACTS[:4] * 2))
    opts = dict(FAST, steps=3, seed=1, seq_len=64)
    a = finetune(tiny, data, tmp_path / "a", grad_accum=2, **{**opts, "batch_tokens": 128})
    b = finetune(tiny, data, tmp_path / "b", **{**opts, "batch_tokens": 256})
    assert a.losses == pytest.approx(b.losses, rel=1e-5)


# -- merge -----------------------------------------------------------------------------------------------------

def test_merge_equals_adapter_applied_logits(tiny, chat_data, tmp_path):
    from herd.api import load
    from herd.formats.peft import apply_adapter
    from herd.train.merge import merge

    finetune(tiny, chat_data, tmp_path / "ft", steps=10, **FAST)
    rep = merge(tiny, tmp_path / "ft", tmp_path / "merged", kl_data=chat_data)
    base = load(tiny)
    apply_adapter(base.model, tmp_path / "ft")
    merged = load(tmp_path / "merged")
    ids = torch.tensor([load_examples(chat_data, base.tokenizer, base.chat_format, 256)[0][-1].ids])
    with torch.no_grad():
        want, got, plain = base.model(ids), merged.model(ids), load(tiny).model(ids)
    assert (want - plain).abs().max().item() > 1e-2  # the adapter changed something
    assert (got - want).abs().max().item() <= 5e-4  # fp32 rounding of W + s·B·A (see test_lora_peft)
    assert rep.kl_merge <= 1e-8 and rep.kl_written <= 1e-8
    q = merge(tiny, tmp_path / "ft", tmp_path / "merged.gguf", to="gguf", quant="q8_0", kl_data=chat_data)
    assert 0 < q.kl_written < 0.05 and q.kl_merge <= 1e-8


def test_cli_finetune_and_merge(tiny, chat_data, tmp_path, capsys):
    from herd.cli import main

    rc = main(["finetune", "--model", str(tiny), "--data", str(chat_data), "--out", str(tmp_path / "o"),
               "--steps", "2", "--seq-len", "64", "--batch-tokens", "128", "--rank", "4", "--no-progress"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    rc = main(["merge", "--adapter", str(tmp_path / "o"), "--out", str(tmp_path / "m")])  # base: the adapter's
    assert rc == 0 and "KL per token" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": 3}\n')
    rc = main(["finetune", "--model", str(tiny), "--data", str(bad), "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and f"{bad}:1:" in capsys.readouterr().err
