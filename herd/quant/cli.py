"""`herd quantize SRC OUT.gguf --scheme int8|int4|q4_1|q4_k` (registered into herd.cli's subcommands)."""

from __future__ import annotations

import json

from herd.quant.quantize import SCHEMES


def cmd_quantize(args) -> None:
    from herd.quant.quantize import quantize_checkpoint

    report = quantize_checkpoint(args.src, args.out, args.scheme, progress=not args.json)
    if args.json:
        print(json.dumps({"out": str(report.out), "scheme": report.scheme, "params": report.params,
                          "src_bytes": report.src_bytes, "out_bytes": report.out_bytes, "seconds": report.seconds,
                          "types": report.types}))
    else:
        print(report.summary())


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint's weights group-wise (int8/int4) into a GGUF file")
    p.add_argument("src", help="checkpoint path or catalog name (HF folder, Meta folder or GGUF file)")
    p.add_argument("out", help="output .gguf file (run it with `herd generate -m OUT`, or with llama.cpp)")
    p.add_argument("--scheme", default="int4", choices=sorted(SCHEMES),
                   help="int8 = q8_0, int4 = q4_0 (32-weight groups, fp16 scale); q4_1 adds a minimum per group; "
                        "q4_k: 256-weight super-blocks (default: int4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_quantize)
