"""Helper of tests/test_pretrain_scale.py, run under torchrun:

  torchrun --nproc-per-node N tests/reshard_logits.py CKPT LAYOUT INPUT OUTPUT

loads the herd training checkpoint CKPT into this world's LAYOUT (fsdp or tp) with herd's own parallel.setup,
apply_layout and dcp.load (DCP reshards whatever layout saved it), runs the tokens of INPUT (a (B, T) tensor file)
through it and has rank 0 save the logits (B, T, V) to OUTPUT. The model starts with every parameter NaN, so a
weight the load leaves out shows in the logits.
"""

import sys

import torch


def poisoned_model(model_config: dict):
    """The plain Transformer of this config with every parameter NaN: only a load gives it numbers."""
    from herd.config import ModelConfig
    from herd.models.llama import Transformer

    model = Transformer(ModelConfig.from_dict(model_config))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def main(ckpt: str, kind: str, inp: str, out: str) -> None:
    from herd.train import dcp, parallel

    torch.set_num_threads(1)
    layout = parallel.setup(kind, None, parallel.env_world()[0], 1)
    try:
        model = poisoned_model(dcp.read_trainer(ckpt)["model_config"])
        module = parallel.apply_layout(model, layout)
        dcp.load(ckpt, model)
        x = torch.load(inp, weights_only=True)
        with torch.no_grad():
            logits = module.eval()(x)  # (B, T, V): every rank fed the same tokens, every rank holds them all
        if layout.is_main:
            torch.save(logits, out)
    finally:
        parallel.teardown(layout)


if __name__ == "__main__":
    main(*sys.argv[1:])
