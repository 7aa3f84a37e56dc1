"""`herd ...`: a thin shell over the library. Each command parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys

from herd.errors import GenerationError, HerdError


def _sampling(args) -> dict:
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if getattr(args, "stop", None):
        kw["stop"] = args.stop
    return kw


def _add_model(p, positional=False, adapter=True):
    """--model (or a positional model), --dtype, the quantization flags and (unless adapter=False) --adapter."""
    if positional:
        p.add_argument("model", nargs="?", default=None, help="checkpoint path or catalog name (default model if omitted)")
    else:
        p.add_argument("--model", "-m", default=None, help="checkpoint path or catalog name (default: the default model)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 for float weights (default: float32, the faster CPU path; a GGUF "
                   "keeps its blocks unless --dequantize)")
    if not positional and adapter:
        p.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT layout) to run unmerged")
    if not positional:
        add_quantization(p)


def add_quantization(p) -> None:
    """--quantized (the default for GGUF), --dequantize, --quantization SCHEME: how the weights are held."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quantized", action="store_true", help="GGUF: keep the weights in their block formats (the "
                   "default: native kernels and the C decode step); accepted for compatibility")
    g.add_argument("--dequantize", action="store_true", help="GGUF: dequantize to float and run the PyTorch float "
                   "path instead (slower; for comparisons)")
    g.add_argument("--quantization", default=None, metavar="SCHEME", help="quantize float weights (HF / Meta, or a "
                   "dequantized GGUF) in memory at load: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k (same kernels)")
    p.add_argument("--kv-type", default="f32", choices=("f32", "f16", "q8_0"), help="how the KV cache stores keys "
                   "and values (llama.cpp's -ctk/-ctv): f32 exact (default), f16 half the memory, q8_0 ~0.27 of it; "
                   "the cost in KL is in README's Speed section")


def load_options(args) -> dict:
    """herd.load keywords from add_quantization's flags: None lets load() choose (GGUF blocks kept)."""
    if getattr(args, "dequantize", False) or getattr(args, "quantization", None):
        keep = False
    else:
        keep = True if getattr(args, "quantized", False) else None
    return dict(keep_quantized=keep, quantization=getattr(args, "quantization", None),
                kv_type=getattr(args, "kv_type", None))


def _add_chat_template(p):
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_STRING", help="a Jinja chat template (a file, "
                   "a tokenizer_config.json, or the template text) replacing the model's, e.g. one that places images")


def _add_images(p):
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image to ask about (repeatable): needs a vision checkpoint or a vision model (--vision)")
    p.add_argument("--vision", default=None, metavar="DIR", help="vision model folder from `herd train-vision` "
                   "(default: HERD_HOME/vision/<model>, used when the model itself takes no images)")


def _add_sampling(p):
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _add_threads(p)


def _add_threads(p):
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _set_threads(args):
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _load_llm(args):
    """The model of --model (or the adapter's base), with --adapter applied unmerged."""
    from herd.api import load

    model = args.model
    adapter = getattr(args, "adapter", None)
    if adapter and model is None:
        from herd.formats.peft import adapter_base

        model = adapter_base(adapter)
    template = getattr(args, "chat_template", None)
    if template is not None:
        from herd.chat_format import load_chat_template

        template = load_chat_template(template)
    llm = load(model, args.dtype, chat_template=template, **load_options(args))
    if adapter:
        from herd.formats.peft import apply_adapter

        apply_adapter(llm.model, adapter)
    if getattr(args, "speculate", None):
        from herd.api import speculation

        llm.speculation = speculation(llm, args.speculate, args.draft_model, args.draft_tokens)
    elif getattr(args, "draft_model", None):
        raise GenerationError(f"--draft-model {args.draft_model!r} needs --speculate draft")
    return llm


def _add_speculation(p) -> None:
    p.add_argument("--speculate", default=None, choices=("ngram", "draft"), help="speculative decoding: guess tokens "
                   "by prompt lookup (ngram) or with --draft-model, verify them in one target step (same output)")
    p.add_argument("--draft-model", default=None, metavar="M", help="draft checkpoint sharing the vocabulary, or "
                   "prune:N (the target's first and last layers, N in all)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens guessed per step, at most "
                   "(default 4; fewer, or none, where the guesses kept so far do not pay for their verification: "
                   "a guess row costs about a third of a step, and batched decoding leaves little to gain)")


def _check_images(args) -> None:
    """A bad --image fails before any model loads, with a FormatError naming the file."""
    from herd.images import load_image

    for path in getattr(args, "image", None) or []:
        load_image(path)


def _image_model(args, llm):
    """What answers about images: the model itself when it is a vision checkpoint, else the vision model of
    --vision (default: the one `herd train-vision` wrote for this base model) attached to it."""
    from herd.chat import accepts_images

    if accepts_images(llm):
        return llm
    from herd.api import ImageChat

    return ImageChat.load(args.vision, llm=llm, model=args.model)


def cmd_generate(args):
    _set_threads(args)
    _check_images(args)
    llm = _load_llm(args)
    sampling = _sampling(args)
    images = args.image or None
    if images or args.vision:
        if args.raw:
            raise GenerationError("--raw cannot take --image: images go into a chat message")
        llm = _image_model(args, llm)
        call = dict(images=images)
    else:
        call = dict(raw=args.raw)
    if args.json:
        c = llm.generate(args.prompt, **call, **sampling)
        print(json.dumps({"prompt_ids": c.prompt_ids, "output_ids": c.output_ids, "text": c.text,
                          "finish_reason": c.finish_reason}, ensure_ascii=False))
        return
    for piece in llm.stream(args.prompt, **call, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args):
    from herd.chat import run_chat

    _set_threads(args)
    _check_images(args)
    llm = _load_llm(args)
    if args.vision:
        llm = _image_model(args, llm)
    run_chat(llm, system=args.system, sampling=_sampling(args), stdin=sys.stdin, stdout=sys.stdout,
             images=args.image, vision_loader=lambda: _image_model(args, llm))


def cmd_tokenize(args):
    from herd.api import load_tokenizer_only

    tok = load_tokenizer_only(args.model)
    ids = tok.encode(args.text, bos=args.bos, allow_special=args.special)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))


def cmd_embed(args):
    texts = list(args.text)
    if args.file:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with stream:
            texts += [line.rstrip("\n") for line in stream if line.strip()]
    if not texts:
        raise GenerationError("herd embed: give texts as arguments or --file FILE (one text per line)")
    _set_threads(args)
    vectors = _load_llm(args).embed(texts, pooling=args.pooling)
    for i, (text, v) in enumerate(zip(texts, vectors.tolist())):
        print(json.dumps({"index": i, "text": text, "embedding": v}, ensure_ascii=False))


def cmd_info(args):
    from herd.formats import load_checkpoint
    from herd.hub import resolve

    ckpt = load_checkpoint(resolve(args.model), keep_quantized=True, with_tokenizer=False)
    total, active = ckpt.config.param_counts()
    info = {"path": str(ckpt.path), "format": ckpt.format, "params": total, "active_params": active,
            "config": ckpt.config.to_dict()}
    print(json.dumps(info, indent=2, default=str))


def cmd_models(args):
    from herd.config import PRESETS

    rows = []
    for name, cfg in PRESETS.items():
        total, active = cfg.param_counts()
        rows.append((name, total, active, cfg))
    if args.json:
        print(json.dumps([{"name": n, "params": t, "active_params": a, "config": c.to_dict()}
                          for n, t, a, c in rows], indent=2, default=str))
        return
    print(f"{'preset':<27}{'params':>10}{'active':>10}  layers  dim    heads kv  ffn    vocab   context")
    for n, t, a, c in rows:
        print(f"{n:<27}{t / 1e9:>9.2f}B{a / 1e9:>9.2f}B  {c.n_layers:<7} {c.dim:<6} {c.n_heads:<5} {c.n_kv_heads:<3} "
              f"{c.ffn_dim:<6} {c.vocab_size:<7} {c.max_seq_len}")


def cmd_convert(args):
    from herd.api import parse_dtype
    from herd.formats.convert import convert
    from herd.hub import resolve
    from herd.train.export import export, is_training_checkpoint

    if is_training_checkpoint(args.src):  # OUT/checkpoints/step-N of herd pretrain / distill (any layout)
        print(f"wrote {export(args.src, args.out, to=args.to, quant=args.quant, dtype=parse_dtype(args.dtype))}")
        return
    out = convert(resolve(args.src), args.out, to=args.to, quant=args.quant, dtype=parse_dtype(args.dtype),
                  shards=args.shards)
    print(f"wrote {out}")


def cmd_quantize(args):
    from herd.formats.convert import quantize_checkpoint
    from herd.hub import resolve

    report = quantize_checkpoint(resolve(args.src), args.out, args.scheme, progress=not args.json)
    print(json.dumps(report.to_dict()) if args.json else report.summary())


def cmd_pull(args):
    from herd.hub import pull

    print(pull(args.name))


def cmd_list(args):
    from herd.hub import list_models

    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2, default=str))
        return
    if not models:
        print("no models pulled yet: try `herd pull smollm2-135m-instruct`")
    for m in models:
        print(f"{m['name']:<32} {m.get('size', 0) / 1e6:>9.1f} MB  {m['path']}")


def cmd_eval_ppl(args):
    from herd.api import load
    from herd.eval.ppl import perplexity, read_text, report_lines

    _set_threads(args)
    llm = _load_llm(args)
    ref = load(args.kl_vs, "float32") if args.kl_vs else None
    result = perplexity(llm, read_text(args.file), ctx=args.ctx, max_chunks=args.max_chunks, ref=ref,
                        progress=not args.json, llama_windows=args.llama_windows)
    if args.json:
        print(json.dumps(result))
        return
    print(report_lines(result, args.kl_vs))


def cmd_serve(args):
    from herd.server import serve

    _set_threads(args)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch, ctx=args.ctx,
          kv_tokens=args.kv_tokens, max_queue=args.max_queue, page_size=args.page_size,
          prefill_chunk=args.prefill_chunk, prefix_cache=not args.no_prefix_cache, dtype=args.dtype,
          served_model_name=args.served_model_name, chat_template=args.chat_template, log_level=args.log_level,
          vision=args.vision, adapters=args.adapter, drain_timeout=args.drain_timeout, speculate=args.speculate,
          draft_model=args.draft_model, draft_tokens=args.draft_tokens, **load_options(args))


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page")
    _add_model(p, adapter=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $HERD_API_KEY)")
    p.add_argument("--max-batch", type=int, default=None, help="requests decoded together (batch rows; default: "
                   "sized from the KV budget, at least 16)")
    p.add_argument("--ctx", type=int, default=None, help="context length per request (default: the model's)")
    p.add_argument("--kv-tokens", type=int, default=None,
                   help="KV-cache budget in tokens shared by all requests (default: max(16384, 2 x ctx))")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens computed per engine step")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not reuse the KV of shared prompt prefixes")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: from --model)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file replacing the model's")
    p.add_argument("--vision", default=None, metavar="DIR", help="vision model from `herd train-vision` that answers "
                   "requests with image_url parts (default: the one trained for --model, if any)")
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR", help="a LoRA adapter (PEFT "
                   "folder) served beside the base model, picked by a request's `model` (repeatable; NAME defaults "
                   "to the folder's name; more at run time with POST /v1/adapters)")
    _add_threads(p)
    _add_speculation(p)
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM/SIGINT, seconds to let requests in "
                   "flight finish (new ones get 503) before exiting")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Run, convert, serve and fine-tune Llama models.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt")
    _add_model(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--raw", action="store_true", help="no chat template: complete the text as it is")
    p.add_argument("--json", action="store_true", help="print {prompt_ids, output_ids, text}")
    _add_chat_template(p)
    _add_images(p)
    _add_sampling(p)
    _add_speculation(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (one answer when stdin is not a terminal)")
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_chat_template(p)
    _add_images(p)
    _add_sampling(p)
    _add_speculation(p)
    p.set_defaults(func=cmd_chat, max_tokens=512)

    p = sub.add_parser("tokenize", help="text -> token ids")
    # the tokenizer alone: no weights are loaded, so no --dtype, --adapter or quantization flags to ignore
    p.add_argument("--model", "-m", default=None, help="checkpoint path or catalog name (default: the default model)")
    p.add_argument("text")
    p.add_argument("--bos", action="store_true", help="prepend BOS")
    p.add_argument("--special", action="store_true", help="read special-token text as special tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("embed", help="texts -> embeddings (pooled final hidden states, normalised), JSON lines")
    _add_model(p, adapter=False)
    p.add_argument("text", nargs="*", help="texts to embed (or --file)")
    p.add_argument("--file", default=None, help="a file of texts, one per line ('-' reads stdin)")
    p.add_argument("--pooling", default="mean", choices=("mean", "last", "cls"), help="how token states become one "
                   "vector: mean (default), last token, or first token")
    _add_threads(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("info", help="print a checkpoint's config")
    p.add_argument("model", nargs="?", default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the presets of every official size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert a checkpoint to HF, Meta or GGUF")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to", choices=["hf", "meta", "gguf"], required=True)
    p.add_argument("--quant", default=None, help="GGUF: f32, f16, bf16, q8_0, q4_0, q4_1")
    p.add_argument("--dtype", default=None, help="HF/Meta: float32 or bfloat16 (default: the source's)")
    p.add_argument("--shards", type=int, default=1, help="Meta: model-parallel shards to write")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("pull", help="fetch a model from the catalog (or a Hugging Face repo id)")
    p.add_argument("name")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="models pulled into the cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("eval", help="evaluate a model")
    evsub = p.add_subparsers(dest="eval_command", required=True)
    p = evsub.add_parser("ppl", help="perplexity on a text file (default: the shipped English sample)")
    _add_model(p)
    p.add_argument("--file", default=None, help="UTF-8 text file (default: herd's shipped sample, ~27k tokens)")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--kl-vs", default=None, help="reference model: report mean KL(reference || model)")
    p.add_argument("--llama-windows", action="store_true", help="score the tokens llama-perplexity scores (windows "
                   "of --ctx tokens starting with BOS, the second half of each predicted), to compare with it")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_ppl)

    _add_serve(sub)
    from herd.eval import bench
    from herd.formats.convert import SCHEMES
    from herd.train import cli as train_cli

    for mod in (bench, train_cli):
        mod.register(sub)
    from herd.eval import doctor

    doctor.register(sub)
    p = sub.add_parser("quantize", help="quantize a checkpoint's weights group-wise (int8/int4) into a GGUF file")
    p.add_argument("src", help="checkpoint path or catalog name (HF folder, Meta folder or GGUF file)")
    p.add_argument("out", help="output .gguf file (run it with `herd generate -m OUT`, or with llama.cpp)")
    p.add_argument("--scheme", default="int4", choices=sorted(SCHEMES),
                   help="int8 = q8_0, int4 = q4_0 (32-weight groups, fp16 scale); q4_1 adds a minimum per group; "
                        "q4_k: 256-weight super-blocks (default: int4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_quantize)
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """No prefix of a long option stands for it (--quant is neither --quantized nor --quantization), in every
    subcommand: argparse reads allow_abbrev when it parses, so setting it after add_parser is enough."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
