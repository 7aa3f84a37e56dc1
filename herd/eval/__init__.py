"""Evaluation floor: perplexity and KL against a reference (ppl.py), herd against its peers (bench.py).

May import every floor below the API and the API itself (herd.api, herd.engine, herd.formats, ...); nothing below
imports eval/. The one idea: a figure is only worth what its reference is worth, so each measurement names the
reference it was taken against and the machine it ran on.
"""
