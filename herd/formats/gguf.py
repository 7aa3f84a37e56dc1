"""GGUF models: config and weights loading, and the one writer, for any architecture given as data.

Format facts are in SPEC.md §4; the file reader (every count and offset checked) is gguf_file.py.

q/k rows: llama.cpp's converter undoes HF's rotate-half permutation, so GGUF `attn_q` / `attn_k` of arch llama hold
rows in Meta's interleaved-pair order (ggml rope mode NORM), which is herd's order: no permutation here
(checked against transformers' GGUF loader in tests/test_gguf.py).

A container: it knows arch llama (its names, config keys and metadata) and takes any other architecture as a
`GGUFArch` value (names, layouts, config reader, metadata) that the family module builds (llama4.py); it never
imports a model family. Floor 6 (formats); imports herd.config, herd.errors, herd.quant and formats' own
gguf_file / keymaps / shapes.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from herd.config import ModelConfig, RopeScaling
from herd.errors import ConfigError, FormatError
from herd.formats import keymaps
from herd.formats.gguf_file import (NUMPY_OF, T_ARRAY, T_BOOL, T_FLOAT32, T_INT32, T_INT64, T_STRING, T_UINT8, T_UINT32,
                                    GGUFFile, GGUFTensor, read_gguf)
from herd.formats.gguf_file import _ggml_block_sizes  # noqa: F401  (tests/test_gguf.py checks it through this module)
from herd.formats.shapes import check_state_dict, expected_shapes
from herd.quant import blocks

# ---------------------------------------------------------------------------------------------------------------
# Config

def metadata_value(g: GGUFFile, key: str, kind: type, default: Any = ...) -> Any:
    """A metadata value of the expected kind (int or float), or default; errors name the file and key."""
    if key not in g.metadata:
        if default is ...:
            raise FormatError(f"{g.path}: metadata key {key} is missing")
        return default
    v = g.metadata[key]
    if isinstance(v, list) and v and all(x == v[0] for x in v):  # per-layer arrays with one value
        v = v[0]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else (
        isinstance(v, int) and not isinstance(v, bool))
    if not ok:
        raise FormatError(f"{g.path}: metadata {key} should be {'a number' if kind is float else 'an integer'}, "
                          f"found {v!r}")
    return kind(v)


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 scaling, as llama.cpp's `rope_freqs` tensor (SPEC.md §4): (hd/2,)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    s, lf, hf, lo = (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                     scaling.original_max_position_embeddings)
    out = np.ones_like(freqs)
    out[wavelen > lo / lf] = s
    band = (wavelen >= lo / hf) & (wavelen <= lo / lf)
    if hf > lf:
        smooth = (lo / wavelen[band] - lf) / (hf - lf)
        out[band] = 1 / ((1 - smooth) / s + smooth)
    return out.astype(np.float32)


def rope_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float,
                              original_context: int | None = None) -> RopeScaling | None:
    """The RopeScaling whose llama3 divisors equal `factors`; None if they are all 1 or match no setting tried.

    The divisors fix only Lo/lf and Lo/hf, so (factor, 1, hf, Lo) with lf = 1 stands for every equivalent setting.
    """
    f = np.asarray(factors, np.float64).reshape(-1)
    if f.size != head_dim // 2 or not np.all(np.isfinite(f)) or f.min() <= 0:
        return None
    s = float(f.max())
    if s <= 1.0:
        return None
    los = [original_context] if original_context else []
    los += [8192] + [1 << k for k in range(8, 21) if 1 << k != 8192]
    for lo in los:
        for hf in (4.0, 1.0, 2.0, 8.0, 16.0, 32.0):
            try:
                cand = RopeScaling(factor=s, low_freq_factor=1.0, high_freq_factor=hf,
                                   original_max_position_embeddings=int(lo))
            except ConfigError:
                continue
            if np.allclose(llama3_rope_factors(cand, head_dim, theta), f, rtol=1e-5, atol=0):
                return cand
    return None


_FAMILY_FROM_NAME = [
    (re.compile(r"llama[ _-]?4", re.I), "llama4"),
    (re.compile(r"llama[ _-]?3[._-]3", re.I), "llama3.3"),
    (re.compile(r"llama[ _-]?3[._-]2", re.I), "llama3.2"),
    (re.compile(r"llama[ _-]?3[._-]1", re.I), "llama3.1"),
    (re.compile(r"llama[ _-]?3", re.I), "llama3"),
    (re.compile(r"llama[ _-]?2", re.I), "llama2"),
]


def _guess_family(g: GGUFFile, vocab: int, scaling: RopeScaling | None) -> str:
    """Family from general.name & co., else from the Llama 3 vocabulary and rope factor; 'llama' if unsure."""
    text = " ".join(str(g.metadata.get(k, "")) for k in ("general.name", "general.basename", "general.finetune"))
    for pattern, family in _FAMILY_FROM_NAME:
        if pattern.search(text):
            return family
    if vocab == 128256:
        if scaling is None:
            return "llama3"
        return {8.0: "llama3.1", 32.0: "llama3.2"}.get(scaling.factor, "llama3")
    return "llama"


def _llama_config(g: GGUFFile) -> ModelConfig:
    a = g.architecture
    if metadata_value(g, f"{a}.expert_count", int, 0) > 0:
        raise ConfigError(f"{g.path}: {a} with {g.metadata[f'{a}.expert_count']} experts (Mixtral-style MoE) "
                          f"is not supported")
    dim = metadata_value(g, f"{a}.embedding_length", int)
    n_heads = metadata_value(g, f"{a}.attention.head_count", int)
    n_kv = metadata_value(g, f"{a}.attention.head_count_kv", int, n_heads)
    head_dim = metadata_value(g, f"{a}.attention.key_length", int, 0) or (dim // n_heads if n_heads else 0)
    n_rot = metadata_value(g, f"{a}.rope.dimension_count", int, head_dim)
    if n_rot != head_dim or metadata_value(g, f"{a}.attention.value_length", int, head_dim) != head_dim:
        raise ConfigError(f"{g.path}: rope over {n_rot} of {head_dim} head dims, or a value head size other than "
                          f"the key's, is not supported")
    theta = metadata_value(g, f"{a}.rope.freq_base", float, 10000.0)
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise FormatError(f"{g.path}: tensor token_embd.weight is missing")
    vocab = emb.shape[0]
    declared = metadata_value(g, f"{a}.vocab_size", int, vocab)
    if declared != vocab:
        raise FormatError(f"{g.path}: {a}.vocab_size is {declared} but token_embd.weight has {vocab} rows")

    scaling = None
    kind = g.metadata.get(f"{a}.rope.scaling.type", "none")
    if kind == "linear" and metadata_value(g, f"{a}.rope.scaling.factor", float, 1.0) == 1.0:
        kind = "none"  # linear scaling by 1 changes nothing
    if kind not in ("none", "llama3"):
        raise ConfigError(f"{g.path}: {a}.rope.scaling.type {kind!r} is not supported (herd has llama3 scaling)")
    freqs = g.tensors.get("rope_freqs.weight")
    if freqs is not None:
        factors = freqs.dequantize() if freqs.type_name in blocks.GGML_TYPES else None
        if factors is None or factors.size != head_dim // 2:
            raise FormatError(f"{g.path}: rope_freqs.weight should be {head_dim // 2} float values, found "
                              f"shape {freqs.shape} of {freqs.type_name}")
        ctx0 = metadata_value(g, f"{a}.rope.scaling.original_context_length", int, 0) or None
        scaling = rope_scaling_from_factors(factors, head_dim, theta, ctx0)
    elif kind == "llama3":
        scaling = RopeScaling(factor=metadata_value(g, f"{a}.rope.scaling.factor", float, 8.0),
                              original_max_position_embeddings=metadata_value(
                                  g, f"{a}.rope.scaling.original_context_length", int, 8192))
    fields = dict(
        dim=dim, n_layers=metadata_value(g, f"{a}.block_count", int), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=vocab, ffn_dim=metadata_value(g, f"{a}.feed_forward_length", int),
        norm_eps=metadata_value(g, f"{a}.attention.layer_norm_rms_epsilon", float), rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=metadata_value(g, f"{a}.context_length", int), tie_embeddings="output.weight" not in g.tensors,
        head_dim_override=head_dim if head_dim * n_heads != dim else None, family=_guess_family(g, vocab, scaling),
    )
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{g.path}: {e}") from None


def rope_factors(config: ModelConfig) -> np.ndarray:
    """The rope_freqs divisors a config implies: llama3 scaling, or ones."""
    if config.rope_scaling is None:
        return np.ones(config.head_dim // 2, np.float32)
    return llama3_rope_factors(config.rope_scaling, config.head_dim, config.rope_theta)


def llama_metadata(config: ModelConfig, a: str = "llama", extra_u32: list[tuple[str, int]] = ()
                   ) -> list[tuple[str, Any, str]]:
    """(key, value, GGUF value type name) of the architecture keys llama.cpp's llama loader reads; a family adds
    its own integer keys through extra_u32 (written after the shared ones, before the floats)."""
    u32 = [("context_length", config.max_seq_len), ("embedding_length", config.dim), ("block_count", config.n_layers),
           ("feed_forward_length", config.ffn_dim), ("attention.head_count", config.n_heads),
           ("attention.head_count_kv", config.n_kv_heads), ("rope.dimension_count", config.head_dim),
           ("vocab_size", config.vocab_size)]
    if config.head_dim_override is not None:
        u32 += [("attention.key_length", config.head_dim), ("attention.value_length", config.head_dim)]
    return ([(f"{a}.{k}", v, "UINT32") for k, v in [*u32, *extra_u32]]
            + [(f"{a}.attention.layer_norm_rms_epsilon", config.norm_eps, "FLOAT32"),
               (f"{a}.rope.freq_base", config.rope_theta, "FLOAT32")])


# ---------------------------------------------------------------------------------------------------------------
# Architectures, as data

@dataclass(frozen=True)
class GGUFArch:
    """One GGUF architecture: what the reader, the loader and the writer need to know of it, and nothing else."""

    name: str  # general.architecture
    tensor_names: dict[str, str]  # GGUF pattern -> herd pattern ("{i}": the layer index)
    read_config: Callable[[GGUFFile], ModelConfig]
    metadata: Callable[[ModelConfig], list[tuple[str, Any, str]]]  # (key, value, GGUFValueType name)
    transposed: tuple[str, ...] = ()  # herd-name suffixes stored with their last two axes swapped
    quantized_stacks: tuple[str, ...] = ()  # 3-D herd tensors (experts) kept block-quantized with keep_quantized
    float32: tuple[str, ...] = ()  # herd-name suffixes written F32 whatever the quant (1-D tensors always are)
    ignored: re.Pattern = keymaps.GGUF_IGNORED  # GGUF tensors that carry nothing herd needs
    rules: tuple[list, list] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        table = self.tensor_names
        object.__setattr__(self, "rules", (keymaps.compile_names(table),
                                           keymaps.compile_names({v: k for k, v in table.items()})))

    def to_herd(self, gguf_name: str) -> str | None:
        """'blk.3.ffn_gate.weight' -> 'layers.3.feed_forward.w1.weight'; None if the name is not in the table."""
        return keymaps.rename(gguf_name, self.rules[0])

    def to_gguf(self, herd_name: str) -> str | None:
        return keymaps.rename(herd_name, self.rules[1])

    def is_transposed(self, herd_name: str) -> bool:
        return bool(self.transposed) and herd_name.endswith(self.transposed)


LLAMA = GGUFArch("llama", keymaps.GGUF_NAMES, _llama_config, llama_metadata)


def _arch(arch: GGUFArch | str) -> GGUFArch:
    if isinstance(arch, GGUFArch):
        return arch
    if arch != LLAMA.name:
        raise ConfigError(f"GGUF architecture {arch!r}: the gguf container knows only 'llama'; load other "
                          f"architectures through herd.formats")
    return LLAMA


def gguf_to_herd_name(name: str, arch: GGUFArch | str = LLAMA) -> str | None:
    """'blk.3.ffn_gate.weight' -> 'layers.3.feed_forward.w1.weight'; None if the name is not in the table."""
    return _arch(arch).to_herd(name)


def herd_to_gguf_name(name: str, arch: GGUFArch | str = LLAMA) -> str | None:
    return _arch(arch).to_gguf(name)


def config_from_gguf(g: GGUFFile, arch: GGUFArch = LLAMA) -> ModelConfig:
    """herd ModelConfig from a GGUF file's metadata and tensor list."""
    if g.architecture != arch.name:
        raise ConfigError(f"{g.path}: GGUF architecture {g.architecture!r} is not supported here "
                          f"(expected {arch.name!r})")
    return arch.read_config(g)


# ---------------------------------------------------------------------------------------------------------------
# Loading

def load_gguf(path: str | os.PathLike | GGUFFile, dtype: torch.dtype = torch.float32, keep_quantized: bool = False,
              arch: GGUFArch = LLAMA) -> tuple[ModelConfig, dict[str, torch.Tensor | GGUFTensor], dict[str, Any]]:
    """(config, state dict in herd names, metadata) of a GGUF file (a path, or one read_gguf already parsed) of
    architecture `arch` (herd.formats.load_gguf picks it from the file).

    Weights are dequantized to `dtype`, in herd's layout; with keep_quantized, 2-D weights stored in a block-quantized
    type stay GGUFTensor objects (for the quantized linear layers), and so do the arch's quantized stacks (experts,
    in GGUF's layout (E, out, in)); transposed 2-D tensors (a router) are always dequantized. A tied model has no
    output.weight key. `rope.freqs` (float32 divisors, (head_dim/2,)) appears only when the file's rope_freqs match
    no llama3 setting.
    """
    g = path if isinstance(path, GGUFFile) else read_gguf(path)
    config = config_from_gguf(g, arch)
    shapes = expected_shapes(config)
    state: dict[str, torch.Tensor | GGUFTensor] = {}
    todo: list[tuple[str, GGUFTensor]] = []
    for gname, t in g.tensors.items():
        name = arch.to_herd(gname)
        if name is None:
            if arch.ignored.fullmatch(gname):
                continue
            raise FormatError(f"{g.path}: tensor {gname} is not a known {arch.name} tensor")
        if name == "rope.freqs":  # kept only when the config's rope settings do not already say the same
            factors = t.dequantize().reshape(-1)
            if not np.allclose(factors, rope_factors(config), rtol=1e-5, atol=0):
                state[name] = torch.from_numpy(factors)
            continue
        want = shapes.get(name)
        if want is None:
            raise FormatError(f"{g.path}: tensor {gname} does not belong to a {config.n_layers}-layer model")
        transposed = arch.is_transposed(name)
        layout = tuple(want[:-2]) + (want[-1], want[-2]) if transposed else tuple(want)
        if t.shape != layout:
            raise FormatError(f"{g.path}: tensor {gname} has shape {t.shape}, expected {layout} from the metadata")
        if t.type_name not in blocks.GGML_TYPES:
            raise FormatError(f"{g.path}: tensor {gname} is {t.type_name}, which herd cannot dequantize "
                              f"(supported: {', '.join(blocks.GGML_TYPES)})")
        stack = bool(arch.quantized_stacks) and name.endswith(arch.quantized_stacks)
        if keep_quantized and t.is_quantized and (stack or len(t.shape) == 2 and not transposed):
            state[name] = t
        else:
            todo.append((name, t))

    def convert(item: tuple[str, GGUFTensor]) -> tuple[str, torch.Tensor]:
        name, t = item
        w = torch.from_numpy(t.dequantize())
        if arch.is_transposed(name):
            w = w.transpose(-1, -2).contiguous()
        return name, (w if dtype == torch.float32 else w.to(dtype))

    # numpy releases the GIL inside its loops, so tensors dequantize in parallel on torch's thread budget
    n_workers = max(1, min(torch.get_num_threads(), 8))
    if n_workers == 1:
        state.update(map(convert, todo))
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            state.update(pool.map(convert, todo))
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise FormatError(f"{g.path}: tensors missing for herd names {missing[:8]}{' …' if len(missing) > 8 else ''}")
    return config, state, g.metadata


# ---------------------------------------------------------------------------------------------------------------
# Writing

# quant option -> (type of 2-D weights, of the output layer (and of a tied token_embd), llama file type)
# Like llama-quantize, the output layer gets more bits: Q8_0 here (llama.cpp uses Q6_K when the row length is a
# multiple of 256, which herd does not quantize; it also uses Q8_0 otherwise, as for the default model).
WRITE_QUANTS: dict[str, tuple[str, str, int]] = {
    "f32": ("F32", "F32", 0), "f16": ("F16", "F16", 1), "bf16": ("BF16", "BF16", 32),
    "q8_0": ("Q8_0", "Q8_0", 7), "q4_0": ("Q4_0", "Q8_0", 2), "q4_1": ("Q4_1", "Q8_0", 3),
    "q4_k": ("Q4_K", "Q8_0", 15),
}
# a row that does not fill whole blocks of its type falls back along this chain (llama.cpp also falls back from
# k-quants to 32-element blocks, and to F16 when even those do not fit)
_FALLBACK = {"Q4_K": "Q4_1", "Q4_1": "F16", "Q4_0": "F16", "Q8_0": "F16"}


def _encode(t: torch.Tensor, kind: str) -> np.ndarray:
    x = t.detach().to(torch.float32).numpy()
    if kind == "Q4_K":
        from herd.quant.linear import quantize_q4_k

        return quantize_q4_k(x)
    return blocks.quantize(x, kind)

# GGUF value type of the tokenizer keys llama.cpp reads with a strict type check
_TOKENIZER_TYPES: dict[str, tuple[int, int | None]] = {
    "tokenizer.ggml.model": (T_STRING, None), "tokenizer.ggml.pre": (T_STRING, None),
    "tokenizer.ggml.tokens": (T_ARRAY, T_STRING), "tokenizer.ggml.merges": (T_ARRAY, T_STRING),
    "tokenizer.ggml.scores": (T_ARRAY, T_FLOAT32), "tokenizer.ggml.token_type": (T_ARRAY, T_INT32),
    "tokenizer.ggml.precompiled_charsmap": (T_ARRAY, T_UINT8), "tokenizer.chat_template": (T_STRING, None),
}


_GGUF_OF_DTYPE = {np.dtype(d): t for t, d in NUMPY_OF.items() if t != T_BOOL} | {np.dtype(bool): T_BOOL}


def _value_type(key: str, v: Any) -> tuple[int, int | None]:
    if isinstance(v, np.ndarray) and key not in _TOKENIZER_TYPES:
        if v.dtype not in _GGUF_OF_DTYPE:
            raise ConfigError(f"metadata {key}: numpy arrays of {v.dtype} cannot be stored in GGUF")
        return T_ARRAY, _GGUF_OF_DTYPE[v.dtype]
    if key in _TOKENIZER_TYPES:
        return _TOKENIZER_TYPES[key]
    if key.endswith("_token_id"):
        return T_UINT32, None
    if isinstance(v, bool):
        return T_BOOL, None
    if isinstance(v, int):
        return (T_UINT32 if 0 <= v < 1 << 32 else T_INT64), None
    if isinstance(v, float):
        return T_FLOAT32, None
    if isinstance(v, (str, bytes)):
        return T_STRING, None
    if isinstance(v, (list, tuple)) and v:
        return T_ARRAY, _value_type("", v[0])[0]
    raise ConfigError(f"metadata {key}: cannot store {type(v).__name__} value {v!r:.80} in GGUF")


def write_gguf(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
               tokenizer_metadata: dict[str, Any], chat_template: str | None, quant: str = "f16",
               name: str = "", progress: bool = False, arch: GGUFArch = LLAMA) -> None:
    """Write a llama.cpp-loadable GGUF of architecture `arch` (herd.formats.write_gguf picks it from the config).
    Norms (and the arch's float32 tensors) stay F32; other weights get `quant` where their rows fill whole blocks,
    else the next type down the fallback chain. Atomic. progress: a bar over the tensors on stderr."""
    import gguf

    if quant not in WRITE_QUANTS:
        raise ConfigError(f"quant {quant!r} is not supported for GGUF output (choose from {', '.join(WRITE_QUANTS)})")
    weight_type, output_type, file_type = WRITE_QUANTS[quant]
    sd = {k: v for k, v in state_dict.items() if not (k == "output.weight" and config.tie_embeddings)}
    check_state_dict(sd, config, "state dict")
    metadata = arch.metadata(config)
    meta = {k: v for k, v in tokenizer_metadata.items() if k.startswith("tokenizer.")}
    n_tokens = len(meta.get("tokenizer.ggml.tokens", ()))
    if n_tokens and n_tokens != config.vocab_size:
        raise ConfigError(f"the tokenizer has {n_tokens} tokens but the model's vocabulary is {config.vocab_size}; "
                          f"llama.cpp needs them equal")
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template

    # plan every tensor (GGUF name, tensor in GGUF's layout, type) before writing anything
    plan: list[tuple[str, torch.Tensor, str]] = []
    if config.rope_scaling is not None:
        plan.append(("rope_freqs.weight", torch.from_numpy(rope_factors(config)), "F32"))
    elif "rope.freqs" in sd:
        plan.append(("rope_freqs.weight", sd["rope.freqs"].reshape(-1), "F32"))
    for hname in expected_shapes(config):
        t = sd[hname]
        gname = arch.to_gguf(hname)
        if gname is None:
            raise FormatError(f"tensor {hname} has no name in GGUF architecture {arch.name}")
        if arch.is_transposed(hname):
            t = t.transpose(-1, -2).contiguous()
        kind = "F32" if t.dim() == 1 or (arch.float32 and hname.endswith(arch.float32)) else weight_type
        if hname == "output.weight" or (hname == "tok_embeddings.weight" and config.tie_embeddings):
            kind = output_type
        while t.shape[-1] % blocks.GGML_TYPES[kind][1]:
            kind = _FALLBACK.get(kind, "F32")  # rows that do not fill whole blocks
        plan.append((gname, t, kind))

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch.name)
    kv = w.add_key_value
    if name:
        w.add_name(name)
    kv("general.file_type", file_type, gguf.GGUFValueType.UINT32)
    kv("general.quantization_version", gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)
    for key, value, vtype in metadata:
        kv(key, value, gguf.GGUFValueType[vtype])
    for key, value in meta.items():
        if value is None:
            continue  # not set
        vtype, item = _value_type(key, value)
        if vtype == T_ARRAY:
            value = value.tolist() if isinstance(value, np.ndarray) else list(value)
            if not value:
                continue  # GGUF arrays cannot be empty
        kv(key, value, gguf.GGUFValueType(vtype),
           sub_type=gguf.GGUFValueType(item) if item is not None else None)
    # declare every tensor, then encode and write one at a time: memory holds one encoded tensor, not the model
    for gname, t, kind in plan:
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), blocks.nbytes(kind, tuple(t.shape)),
                          raw_dtype=gguf.GGMLQuantizationType(blocks.type_id(kind)))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        from tqdm import tqdm

        total = sum(t.numel() for _, t, _ in plan)
        with tqdm(total=total, unit="w", unit_scale=True, desc=f"writing {path.name}", disable=not progress,
                  leave=False) as bar:
            for gname, t, kind in plan:
                w.write_tensor_data(_encode(t, kind))
                bar.update(t.numel())
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
