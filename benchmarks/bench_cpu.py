"""herd vs llama-bench on the same GGUF file: `python benchmarks/bench_cpu.py --help` (= `herd bench cpu`)."""

import sys

from herd.eval.bench import main

if __name__ == "__main__":
    sys.exit(main())
