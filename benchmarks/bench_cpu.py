"""herd vs llama.cpp vs transformers on the same GGUF file: `python benchmarks/bench_cpu.py --help` (= `herd bench`)."""

import sys

from herd.eval.bench import main

if __name__ == "__main__":
    sys.exit(main())
