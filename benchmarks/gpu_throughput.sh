#!/usr/bin/env bash
# Every GPU measurement of the throughput issue (13) in one run: < 9 minutes wall on one H100 / H200, compile
# included. Writes under $OUT when set (the device machine's output folder), else benchmarks/results/gpu_<time>/:
#   environment.txt        nvidia-smi, Python / torch / transformers / CUDA versions
#   throughput.json/.txt   benchmarks/throughput.py: realistic (real title lengths) and full-length modes, every
#                          switch (packed, static, bf16 cache, fused AdamW, compile), host syncs per static step
#   profile_*.txt          torch.profiler table of the final configuration (all+static)
#   throughput_cudagraphs.json/.txt  the final configuration compiled with mode="reduce-overhead" (CUDA graphs)
#   pipeline.json/.txt     benchmarks/pipeline.py: end-to-end training through the collator + DataLoader workers
#                          (data-loading stalls), and full ranking of 10k users x 1M items (exact, FAISS)
#
#   bash benchmarks/gpu_throughput.sh            # the GPU run (cuda, size full)
#   bash benchmarks/gpu_throughput.sh --smoke    # CPU check that everything runs (size tiny, ~3-5 minutes)
#
# Each part has its own time limit (timeout), and throughput.py rewrites its JSON after every configuration and
# skips the ones that would start after --time-budget-s, so a slow part leaves the results it has.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT_DIR="${OUT:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$OUT_DIR"

if [[ $SMOKE == 1 ]]; then
  export OMP_NUM_THREADS=1
  SIZE=tiny DEVICE=cpu STEPS=2 WARMUP=1 BUDGET=150 TP_LIMIT=240 CG_LIMIT=90 PIPE_LIMIT=120 THREADS="--num-threads 1"
  COMPILE_BACKEND=aot_eager EVAL="--eval-users 500 --eval-items 20000" PIPE_DATA="--num-items 300 --num-users 200"
  WORKERS=1 PIPE_STEPS=4
else
  SIZE=full DEVICE=cuda STEPS=20 WARMUP=2 BUDGET=240 TP_LIMIT=300 CG_LIMIT=90 PIPE_LIMIT=120 THREADS=""
  COMPILE_BACKEND=inductor EVAL="--eval-users 10000 --eval-items 1000000 --eval-bf16 --faiss-users 2000"
  PIPE_DATA="--num-items 4000 --num-users 4000" WORKERS=8 PIPE_STEPS=30
fi

{
  date -u
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  python - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

# 1-3, 5: the model step. Realistic first (what the goal is about), the slow fp32 / compile rows last.
timeout "$TP_LIMIT" python benchmarks/throughput.py --size "$SIZE" --device "$DEVICE" --steps "$STEPS" \
  --warmup "$WARMUP" $THREADS --modes realistic,full-length --all-switches dedup,cache,packed,bf16,sdpa,fused_adamw \
  --realistic-configs baseline,dedup,bf16+dedup,bf16+dedup+packed,cache,all,all+static,all+static+compile \
  --configs baseline,bf16,cache,all,all+compile \
  --compile-backend "$COMPILE_BACKEND" --time-budget-s "$BUDGET" \
  --profile-configs all+static --profile-dir "$OUT_DIR" --output "$OUT_DIR/throughput.json" \
  2>&1 | tee "$OUT_DIR/throughput.txt"
echo "throughput.py exit status: ${PIPESTATUS[0]} (124: stopped by its time limit; the JSON keeps what ran)"

# 2: the same final configuration compiled with CUDA graphs (mode reduce-overhead: static shapes required)
CG_MODE=reduce-overhead
[[ $SMOKE == 1 ]] && CG_MODE=default  # no CUDA graphs on the CPU
timeout "$CG_LIMIT" python benchmarks/throughput.py --size "$SIZE" --device "$DEVICE" --steps "$STEPS" \
  --warmup 3 $THREADS --modes realistic --realistic-configs all+static+compile \
  --all-switches dedup,cache,packed,bf16,sdpa,fused_adamw --compile-backend "$COMPILE_BACKEND" \
  --compile-mode "$CG_MODE" --output "$OUT_DIR/throughput_cudagraphs.json" 2>&1 | tee "$OUT_DIR/throughput_cudagraphs.txt"
echo "throughput.py (compile mode $CG_MODE) exit status: ${PIPESTATUS[0]}"

# 4: end to end through the real collator and DataLoader, and evaluation throughput
timeout "$PIPE_LIMIT" python benchmarks/pipeline.py --size "$SIZE" --device "$DEVICE" --steps "$PIPE_STEPS" \
  --warmup 3 $THREADS --num-workers "$WORKERS" --bf16 --sdpa --fused-adamw $PIPE_DATA $EVAL \
  --data-folder "$OUT_DIR/pipeline_dataset" --output "$OUT_DIR/pipeline.json" 2>&1 | tee "$OUT_DIR/pipeline.txt"
echo "pipeline.py exit status: ${PIPESTATUS[0]}"
rm -rf "$OUT_DIR/pipeline_dataset"  # regenerated data: not a result
echo "results in $OUT_DIR"
