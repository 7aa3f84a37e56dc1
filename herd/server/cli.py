"""`herd serve`: the OpenAI-compatible server (registered into herd.cli's subcommands)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page")
    p.add_argument("--model", "-m", default=None, help="checkpoint path or catalog name (default: the default model)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's; GGUF -> float32)")
    p.add_argument("--quantized", action="store_true", help="GGUF: keep the weights in their block formats (native "
                   "kernels)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $HERD_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (batch rows)")
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
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    import torch

    from herd.server import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch, ctx=args.ctx,
          kv_tokens=args.kv_tokens, max_queue=args.max_queue, page_size=args.page_size,
          prefill_chunk=args.prefill_chunk, prefix_cache=not args.no_prefix_cache, dtype=args.dtype,
          served_model_name=args.served_model_name, chat_template=args.chat_template, log_level=args.log_level,
          vision=args.vision, keep_quantized=args.quantized)
