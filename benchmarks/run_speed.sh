#!/usr/bin/env bash
# The README's "## Speed" runs, in order, each after the machine is quiet (1-minute load average below 1.0, polled
# every 20 s; at most WAIT_BUDGET_S of waiting over the whole suite, then each step runs anyway and is marked BUSY
# by its own load check). Usage: benchmarks/run_speed.sh [step ...]
# (steps: formats (= formats-main formats-rest), fmt:Q4_0 (one variant), shapes, serve, quality)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=benchmarks/results
M=.peers/models
DEFAULT=$($PY -c "from herd import hub; print(hub.resolve(None))")
WAIT_BUDGET_S=${WAIT_BUDGET_S:-900}
waited=0
quiet() {
  while awk '{exit !($1 >= 1.0)}' /proc/loadavg && [ "$waited" -lt "$WAIT_BUDGET_S" ]; do
    sleep 20; waited=$((waited + 20))
  done
  echo "[run_speed] $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) (waited ${waited}s in all): $*"
}
steps=${*:-formats shapes serve quality}
for step in $steps; do case $step in
  formats|formats-main|formats-rest)
    main="$DEFAULT $M/SmolLM2-135M-Instruct.Q4_0.gguf"
    rest="$M/SmolLM2-135M-Instruct.Q8_0.gguf $M/SmolLM2-135M-Instruct.Q4_K_M.gguf $M/SmolLM2-135M-Instruct.Q6_K.gguf"
    case $step in formats) files="$main $rest" ;; formats-main) files=$main ;; *) files=$rest ;; esac
    for f in $files; do
      quiet "bench cpu $f"
      $PY -m herd bench cpu --model "$f" --threads 1,2 --depths ${DEPTHS:-0,1024,4096} -r ${REPS:-5} --out $OUT
    done ;;
  fmt:*)
    f=$M/SmolLM2-135M-Instruct.${step#fmt:}.gguf
    quiet "bench cpu $f"
    $PY -m herd bench cpu --model "$f" --threads 1,2 --depths ${DEPTHS:-0,1024,4096} -r ${REPS:-5} --out $OUT ;;
  shapes)
    for f in $M/random-llama-3.2-1b.Q4_0.gguf $M/random-llama-3.2-1b.Q4_K_M.gguf \
             $M/random-llama-3.2-3b.Q4_0.gguf $M/random-llama-3.2-3b.Q4_K_M.gguf; do
      quiet "bench cpu $f"
      $PY -m herd bench cpu --model "$f" --threads 2 --depths 0 -r ${SHAPE_REPS:-5} \
          --batch-repetitions ${SHAPE_BATCH_REPS:-2} --out $OUT
    done ;;
  serve)  # the default file (Q4_1), and Q4_0: llama.cpp's fastest format here; SERVE_ROUNDS rounds, servers in turns
    for f in "$DEFAULT" $M/SmolLM2-135M-Instruct.Q4_0.gguf; do
      case $f in *Q4_0*) sfx=.Q4_0 ;; *) sfx= ;; esac
      for r in $(seq 1 ${SERVE_ROUNDS:-3}); do
        quiet "serve herd $f (round $r)"
        $PY benchmarks/peers.py serve --engine herd --model "$f" --threads 2 --concurrency 1,4,16 --input-len 64 \
            --output-len 128 --port 18081 --out $OUT/serve_herd$sfx.r$r.json
        quiet "serve llama-server $f (round $r)"
        $PY benchmarks/peers.py serve --engine llama-server --model "$f" -np 16 --threads 2 --concurrency 1,4,16 \
            --input-len 64 --output-len 128 --out $OUT/serve_llama_server$sfx.r$r.json
      done
    done ;;
  quality)
    quiet "quality"
    $PY benchmarks/quality.py --chunks ${CHUNKS:-16} --threads 2 --kv-types f16,q8_0 ;;
esac; done
