"""Llama 4 text models: herd against transformers' Llama4ForCausalLM, Meta's llama_models.llama4 reference and
llama.cpp, on tiny random configs; the three checkpoint formats; the bounded chunked-attention cache; the MoE."""

import json

import numpy as np
import pytest
import torch

from herd.config import PRESETS, ModelConfig, MoEConfig, RopeScaling
from herd.models.kv_cache import KVCache
from herd.errors import ConfigError, FormatError
from herd.formats import load_gguf as load_gguf_llama4
from herd.formats import load_hf, load_meta, save_hf, save_meta
from herd.formats import write_gguf as write_gguf_llama4
from herd.models.llama import build_model
from herd.models.moe import MoE

TOL = 1e-4
CHUNK = 16
SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 1.0, "original_max_position_embeddings": 32}

# name -> Llama4TextConfig kwargs over BASE: 4 layers (layer 3 NoPE), 4 experts, chunk 16, temperature tuning that
# starts acting at position 7 (floor_scale 8), so every Llama 4 piece shows within 45 tokens.
BASE = dict(hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, num_local_experts=4, num_experts_per_tok=1,
            no_rope_layer_interval=4, attention_chunk_size=CHUNK, attn_temperature_tuning=True, floor_scale=8,
            attn_scale=0.1, rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.3, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
CASES = {
    "moe-qknorm-scout-rope": dict(interleave_moe_layer_step=1, use_qk_norm=True, rope_parameters=SCOUT_ROPE),
    "interleaved-no-qknorm": dict(interleave_moe_layer_step=2, use_qk_norm=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "interleaved-top2-qknorm": dict(interleave_moe_layer_step=2, use_qk_norm=True, num_experts_per_tok=2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "dense-qknorm": dict(moe_layers=[], use_qk_norm=True, rope_parameters=SCOUT_ROPE),
}


def hf_model(case: str, seed: int = 0, **over):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    return Llama4ForCausalLM(Llama4TextConfig(**{**BASE, **CASES[case], **over})).eval()


def _tokens(n=45, batch=2, seed=1, vocab=300):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = hf_model(request.param)
    ref.save_pretrained(folder)
    config, sd = load_hf(folder)  # the production reader, through hf.py's dispatch
    return ref, build_model(config, sd), (config, sd)


# --- parity with transformers -----------------------------------------------------------------------------------

def test_config_read_from_hf(pair):
    ref, model, (config, _) = pair
    c = ref.config
    assert config.family == "llama4" and config.attention_chunk_size == CHUNK and config.nope_layer_interval == 4
    assert config.use_qk_norm == c.use_qk_norm and config.floor_scale == 8.0 and config.attn_temperature_tuning
    assert [config.is_moe_layer(i) for i in range(4)] == [i in c.moe_layers for i in range(4)]
    assert [config.uses_rope(i) for i in range(4)] == [bool(v) for v in c.no_rope_layers]
    total, _ = config.param_counts()
    assert total == sum(p.numel() for p in ref.parameters())


def test_full_forward_matches_transformers(pair):
    ref, model, _ = pair
    tokens = _tokens()  # 45 tokens: three chunks of 16
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max().item() <= TOL


def test_incremental_decoding_matches_transformers(pair):
    ref, model, _ = pair
    tokens = _tokens(seed=2)
    with torch.no_grad():
        want = ref(tokens).logits
        cache = KVCache(model.config, batch=2, max_len=64)
        pieces, t = [model(tokens[:, :17], torch.arange(17), cache)], 17
        while t < 32:  # multi-token steps that straddle a chunk boundary
            pieces.append(model(tokens[:, t:t + 5], torch.arange(t, t + 5), cache))
            t += 5
        for t in range(32, 45):
            pieces.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache))
        got = torch.cat(pieces, dim=1)
    assert (got - want).abs().max().item() <= TOL


def test_chunked_layers_cache_is_bounded_by_the_chunk(pair):
    _, model, _ = pair
    c = model.config
    cache = KVCache(c, batch=1, max_len=4096)
    for i in range(c.n_layers):
        assert cache.k[i].shape[2] == (CHUNK if c.is_chunked_layer(i) else 4096)
    assert KVCache(c, batch=1, max_len=CHUNK).window == 0  # short caches need no ring


def test_rows_at_different_positions_with_ring_cache(pair):
    _, model, _ = pair
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 300, (1, 9), generator=g)
    b = torch.randint(0, 300, (1, 37), generator=g)
    with torch.no_grad():
        cache = KVCache(model.config, batch=2, max_len=64)
        model(a, torch.arange(9), cache.rows(0))
        model(b, torch.arange(37), cache.rows(1))
        nxt = torch.tensor([[5], [7]])
        batched = model(nxt, torch.tensor([[9], [37]]), cache)
        alone_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        alone_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    assert (batched[0, -1] - alone_a[0]).abs().max().item() <= TOL
    assert (batched[1, -1] - alone_b[0]).abs().max().item() <= TOL


def test_greedy_generation_matches_transformers(pair):
    """herd's generation engine (per-row prefill, batched decode, ring cache) past two chunk boundaries: every
    token is the argmax of transformers' full forward over the prompt and the tokens before it (teacher forcing:
    no EOS rules, which transformers' generate applies with min_new_tokens)."""
    from herd.engine.generate import generate_batch
    from herd.ops.sampling import SamplingParams

    ref, model, _ = pair
    prompts = [_tokens(10, 1, seed=10)[0].tolist(), _tokens(25, 1, seed=11)[0].tolist()]
    got = generate_batch(model, prompts, SamplingParams(max_tokens=30, ignore_eos=True))
    for prompt, completion in zip(prompts, got):
        out = completion.output_ids
        assert len(out) == 30
        with torch.no_grad():
            want = ref(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert out == want


def test_hf_writer_loads_in_transformers(pair, tmp_path):
    from transformers import Llama4ForCausalLM

    ref, model, (config, sd) = pair
    save_hf(tmp_path, config, sd, max_shard_bytes=200_000)  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = Llama4ForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _tokens(seed=4)
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, ref(tokens).logits)  # the same model, bit for bit
    config2, sd2 = load_hf(tmp_path)
    assert config2 == config and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_text_part_of_the_multimodal_checkpoint(tmp_path):
    """Released HF Llama 4 checkpoints are Llama4ForConditionalGeneration: herd reads the language model."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  vision_output_dim=64, image_size=28, patch_size=14, projector_input_dim=32, projector_output_dim=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    ref = Llama4ForConditionalGeneration(Llama4Config(text_config={**BASE, **CASES["interleaved-no-qknorm"]},
                                                      vision_config=vision)).eval()
    ref.save_pretrained(tmp_path)
    config, sd = load_hf(tmp_path)
    tokens = _tokens(seed=8)
    with torch.no_grad():  # text only: compare with its language model (its own forward needs image outputs)
        assert (build_model(config, sd)(tokens) - ref.language_model(input_ids=tokens).logits).abs().max() <= TOL


# --- Meta's format and Meta's reference code -----------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 2])
def test_meta_format_round_trip(pair, tmp_path, shards):
    _, model, (config, sd) = pair
    save_meta(tmp_path, config, sd, n_shards=shards)
    names = set(torch.load(tmp_path / "consolidated.00.pth", weights_only=True))
    assert "layers.0.attention.wqkv.weight" in names and "layers.0.attention.wqkv.layer_norm_weight" in names
    if config.moe is not None:
        assert {"layers.3.feed_forward.experts.moe_w_in_eD_F", "layers.3.feed_forward.experts.moe_w_out_eF_D",
                "layers.3.feed_forward.router_DE", "layers.3.feed_forward.w_in_shared_FD.weight"} <= names
    config2, sd2 = load_meta(tmp_path)  # the production reader, through meta.py's dispatch
    assert config2 == config
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    tokens = _tokens(seed=5)
    with torch.no_grad():
        assert torch.equal(build_model(config2, sd2)(tokens), model(tokens))


@pytest.fixture(scope="module")
def meta_llama4(meta_model_parallel):
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.datatypes import TransformerInput
    from llama_models.llama4.model import Transformer

    return ModelArgs, Transformer, TransformerInput


@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_reference_llama4_agrees(meta_llama4, tmp_path, monkeypatch, case):
    """Meta's llama4 Transformer loads herd's Meta-format files through its own load hooks and computes the same
    logits. Meta's code hard-codes the scaling's original context (8192), so Scout's scaling is used as Meta has it."""
    ModelArgs, MetaTransformer, TransformerInput = meta_llama4
    config, sd = load_hf_case(case, tmp_path / "hf")
    if config.rope_scaling is not None:
        config = config.replace(rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0))
    save_meta(tmp_path / "meta", config, sd)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # its KV caches are allocated with .cuda()
    ref = MetaTransformer(ModelArgs(**{**params, "max_batch_size": 2, "max_seq_len": 64}))
    result = ref.load_state_dict(torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True),
                                 strict=False)
    assert not result.unexpected_keys and all("cache" in k for k in result.missing_keys)
    ref.eval()
    model = build_model(*load_meta(tmp_path / "meta"))
    tokens = _tokens(seed=6)
    with torch.no_grad():
        want = ref(TransformerInput(tokens=tokens, tokens_position=0)).logits
        got = model(tokens)
        assert (got - want).abs().max().item() <= TOL
        # decoding: Meta's decode step ignores the chunk mask (no mask for one token), so stay inside chunk 0
        cache = KVCache(model.config, 2, 64)
        ref(TransformerInput(tokens=tokens[:, :10], tokens_position=0))
        model(tokens[:, :10], torch.arange(10), cache)
        for t in range(10, 14):
            want = ref(TransformerInput(tokens=tokens[:, t:t + 1], tokens_position=t)).logits
            got = model(tokens[:, t:t + 1], torch.tensor([t]), cache)
            assert (got - want).abs().max().item() <= TOL


def load_hf_case(case: str, folder):
    hf_model(case).save_pretrained(folder)
    return load_hf(folder)


def test_meta_params_of_the_presets_follow_metas_rules():
    from herd.formats.llama4_config import config_from_params_llama4, params_from_config_llama4

    for name in ("llama-4-scout-17b-16e", "llama-4-maverick-17b-128e"):
        cfg = PRESETS[name]
        params = params_from_config_llama4(cfg)
        assert (params["multiple_of"], params["ffn_dim_multiplier"], params["ffn_exp"]) == (2048, 1.2, 4.0)
        assert params["moe_args"]["capacity_factor"] == 1.0 and params["moe_args"]["auto_scale_F"]
        assert config_from_params_llama4(params, name).replace(max_seq_len=cfg.max_seq_len) == cfg


def test_meta_files_with_extra_state_blobs_and_unsharded_names(pair, tmp_path):
    """Released files carry io.BytesIO `_extra_state` entries; Meta's own model names (wq, w1, ...) also read."""
    import io

    _, model, (config, sd) = pair
    save_meta(tmp_path, config, sd)
    f = tmp_path / "consolidated.00.pth"
    raw = torch.load(f, weights_only=True)
    raw["layers.0.attention.wqkv._extra_state"] = io.BytesIO(b"fp8 scales")
    qkv = raw.pop("layers.1.attention.wqkv.weight")
    hd = config.head_dim
    raw["layers.1.attention.wq.weight"], raw["layers.1.attention.wk.weight"], raw["layers.1.attention.wv.weight"] = \
        qkv.split([config.n_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd])
    torch.save(raw, f)
    config2, sd2 = load_meta(tmp_path)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


# --- GGUF llama4 ------------------------------------------------------------------------------------------------

def _tiny_vocab_metadata(vocab: int) -> dict:
    """A SentencePiece-style vocabulary llama.cpp accepts: 3 specials, 256 byte tokens, fillers."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"t{i}" for i in range(vocab - 259)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * vocab,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (vocab - 259),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def test_gguf_round_trip_and_layout(pair, tmp_path):
    import gguf

    _, model, (config, sd) = pair
    path = tmp_path / "m.gguf"
    write_gguf_llama4(path, config, sd, _tiny_vocab_metadata(config.vocab_size), quant="f32")
    config2, sd2, _ = load_gguf_llama4(path)
    assert config2 == config and sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    r = gguf.GGUFReader(path)  # gguf-py's reader: llama.cpp's names, ggml dims (ne order)
    assert r.fields["general.architecture"].contents() == "llama4"
    t = {x.name: [int(d) for d in x.shape] for x in r.tensors}
    D, E, F_ = config.dim, 4, 48
    if config.moe is not None:
        assert t["blk.3.ffn_gate_exps.weight"] == [D, F_, E] and t["blk.3.ffn_down_exps.weight"] == [F_, D, E]
        assert t["blk.3.ffn_gate_inp.weight"] == [D, E] and t["blk.3.ffn_up_shexp.weight"] == [D, F_]
    assert t["blk.0.attn_q.weight"] == [D, config.n_heads * config.head_dim]


def test_gguf_quantized_experts(pair, tmp_path):
    """q8_0 experts (rows along D) dequantize back to within the block format's error."""
    _, model, (config, sd) = pair
    write_gguf_llama4(tmp_path / "q.gguf", config, sd, _tiny_vocab_metadata(config.vocab_size), quant="q8_0")
    _, sd2, _ = load_gguf_llama4(tmp_path / "q.gguf")
    for k in sd:
        scale = sd[k].abs().max().item()
        assert (sd2[k] - sd[k]).abs().max().item() <= scale / 127 + 1e-6, k


LLAMA_CPP_CASE = dict(interleave_moe_layer_step=2, use_qk_norm=True, attention_chunk_size=8192, floor_scale=8192,
                      intermediate_size=64, intermediate_size_mlp=128, rope_parameters=SCOUT_ROPE)


def test_llama_cpp_runs_herds_llama4_gguf(tmp_path):
    """llama.cpp (f32 weights and KV cache) computes the same logits from herd's GGUF (MoE, shared experts, NoPE,
    QK-norm, Llama 4 rope scaling via rope_freqs). llama.cpp hard-codes chunk 8192, NoPE every 4th layer, QK-norm
    for != 128 experts and temperature floor 8192: the config uses those."""
    llama_cpp = pytest.importorskip("llama_cpp")
    hf_model("interleaved-no-qknorm", **LLAMA_CPP_CASE).save_pretrained(tmp_path / "hf")
    config, sd = load_hf(tmp_path / "hf")
    write_gguf_llama4(tmp_path / "m.gguf", config, sd, _tiny_vocab_metadata(config.vocab_size), quant="f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_batch=64, n_threads=1, logits_all=True,
                          verbose=False, type_k=0, type_v=0, flash_attn=False)  # type 0: GGML_TYPE_F32
    ids = torch.randint(3, config.vocab_size, (40,), generator=torch.Generator().manual_seed(7))
    llm.eval(ids.tolist())
    got = np.array(llm.scores[:40])
    with torch.no_grad():
        want = build_model(config, sd)(ids[None])[0].numpy()
    assert np.abs(got - want).max() <= TOL


def test_gguf_without_herd_keys_reads_what_llama_cpp_assumes(tmp_path, monkeypatch):
    """A llama.cpp-converted file states no chunk size, NoPE interval, QK-norm or temperature: herd assumes what
    llama.cpp hard-codes, and computes the same logits as from the file with herd's keys."""
    import herd.formats.llama4_config as l4

    hf_model("interleaved-no-qknorm", **LLAMA_CPP_CASE).save_pretrained(tmp_path / "hf")
    config, sd = load_hf(tmp_path / "hf")
    herd_keys = tuple(f"llama4.{k}" for k in l4.GGUF_HERD_KEYS) + ("llama4.rope.scaling.llama3.",)
    standard = l4.gguf_metadata_llama4
    monkeypatch.setattr(l4, "gguf_metadata_llama4", lambda c: [kv for kv in standard(c)
                                                                if not kv[0].startswith(herd_keys)])
    write_gguf_llama4(tmp_path / "m.gguf", config, sd, _tiny_vocab_metadata(config.vocab_size), quant="f32")
    config2, sd2, md = load_gguf_llama4(tmp_path / "m.gguf")
    assert not any(k.startswith(herd_keys) for k in md)
    assert (config2.attention_chunk_size, config2.nope_layer_interval, config2.use_qk_norm) == (8192, 4, True)
    assert config2.attn_temperature_tuning and (config2.attn_scale, config2.floor_scale) == (0.1, 8192.0)
    tokens = _tokens(seed=9)
    with torch.no_grad():
        assert torch.equal(build_model(config2, sd2)(tokens), build_model(config, sd)(tokens))


# --- mixture of experts -----------------------------------------------------------------------------------------

def _moe_config(top_k=1, n_experts=16):
    return ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=64, ffn_dim=64, family="llama4",
                       moe=MoEConfig(n_experts=n_experts, top_k=top_k, expert_ffn_dim=24))


def _random_moe(config, seed=0):
    torch.manual_seed(seed)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_matches_a_per_token_reference(top_k):
    """Grouped computation = the definition: shared(x) + sum over chosen e of expert_e(x * sigmoid(logit_e))."""
    moe = _random_moe(_moe_config(top_k))
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        got = moe(x)
        want = torch.empty_like(x)
        for b in range(3):
            for t in range(7):
                v = x[b, t]
                logits = v @ moe.router_DE
                y = moe.shared_expert(v)
                for e in torch.topk(logits, top_k).indices.tolist():
                    u = v * torch.sigmoid(logits[e])
                    y = y + (torch.nn.functional.silu(u @ moe.experts.w1[e]) * (u @ moe.experts.w3[e])) @ \
                        moe.experts.w2[e]
                want[b, t] = y
    assert (got - want).abs().max().item() <= 1e-5


def test_moe_runs_only_the_chosen_experts():
    """Experts no token chose never run: poisoning their weights with NaN leaves the output finite (Meta's and HF's
    every-expert-on-every-token computation would give 0 * NaN = NaN)."""
    moe = _random_moe(_moe_config())
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        chosen = set(moe.route(x.reshape(-1, 32))[0].reshape(-1).tolist())
        clean = moe(x)
        for e in set(range(16)) - chosen:
            for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
                w[e] = float("nan")
        assert torch.equal(moe(x), clean)


def test_moe_trains():
    """Gradients reach the router and the experts that were chosen, and only those."""
    moe = _random_moe(_moe_config())
    x = torch.randn(2, 5, 32)
    moe(x).square().mean().backward()
    chosen = set(moe.route(x.reshape(-1, 32))[0].reshape(-1).tolist())
    assert moe.router_DE.grad.abs().sum() > 0 and moe.shared_expert.w1.weight.grad.abs().sum() > 0
    for e in range(16):
        assert (moe.experts.w1.grad[e].abs().sum() > 0) == (e in chosen)


# --- config, presets, errors --------------------------------------------------------------------------------------

def test_presets_total_and_active_parameters(capsys):
    from herd.cli import main

    scout, maverick = PRESETS["llama-4-scout-17b-16e"], PRESETS["llama-4-maverick-17b-128e"]
    assert [round(x / 1e9, 1) for x in scout.param_counts()] == [107.8, 17.2]  # 109B with the vision tower
    assert [round(x / 1e9, 1) for x in maverick.param_counts()] == [400.7, 17.2]
    assert scout.moe.n_experts == 16 and scout.moe.interleave_step == 1 and scout.use_qk_norm
    assert maverick.moe.n_experts == 128 and maverick.moe.interleave_step == 2 and not maverick.use_qk_norm
    assert ModelConfig.from_dict(json.loads(json.dumps(scout.to_dict()))) == scout
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("llama-4-maverick-17b-128e"))
    assert "400.71B" in line and "17.18B" in line


def test_bad_configs_are_named(tmp_path):
    from herd.formats.llama4_config import config_from_hf_llama4, config_from_params_llama4

    good = json.loads(json.dumps(hf_model("interleaved-no-qknorm").config.to_dict()))
    with pytest.raises(ConfigError, match="frobnicate"):
        config_from_hf_llama4({**good, "frobnicate": 1})
    with pytest.raises(ConfigError, match="moe_layers"):
        config_from_hf_llama4({**good, "moe_layers": [0, 3]})
    with pytest.raises(ConfigError, match="no_rope_layers"):
        config_from_hf_llama4({**good, "no_rope_layers": [1, 0, 1, 0, 1][:3]})
    with pytest.raises(ConfigError, match="quantization_args"):
        config_from_params_llama4({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 10, "use_qk_norm": True,
                                   "quantization_args": {"scheme": "int4_weight_int8_dynamic_activation"}}, "p.json")
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(n_experts=2, top_k=3)


def test_bad_tensors_are_named(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, _, (config, sd) = pair
    folder = tmp_path / "hf"
    ref.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:8]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="layers.0.attention.wk.weight"):
        load_hf(folder)
    bad = {k: v for k, v in sd.items() if k != "layers.2.ffn_norm.weight"}
    with pytest.raises(FormatError, match="layers.2.ffn_norm.weight"):
        write_gguf_llama4(tmp_path / "x.gguf", config, bad, _tiny_vocab_metadata(config.vocab_size))
