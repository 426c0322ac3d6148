#!/bin/sh
# The GPU checks in one run (what tests/kernels/pack_for_gpu.sh packed into .devrun/): every
# CUDA op against the CPU op (sampling too), end to end on the GPU, then the 7B-shaped benchmark (`mpi`, on its
# own: lqd compress under the packed mpirun, tests/mpi/compare_ranks.py). Logs go to
# $OUT when it is set (the device tool's output folder), else to .devrun/logs.
root=$(cd "$(dirname "$0")/../.." && pwd)
run="$root/.devrun"
logs=${OUT:-$run/logs}
mkdir -p "$logs"
[ -d "$run/lib" ] || tar -C "$run" -xJf "$run/lib.tar.xz"
cuda_libs=$(dirname "$(find / -name 'libcublas.so.13*' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$run/lib:$cuda_libs:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export LQD="$run/lqd" LQ_REPO_ROOT="$root" LQ_PPL_TEXT="$run/tinystories_val_subset.txt"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
script_start=$(date +%s)
step() { # name, command... (skipped once BUDGET seconds have gone since the script began)
    name=$1; shift
    start=$(date +%s)
    if [ $(( start - script_start )) -gt "${BUDGET:-1000000}" ]; then
        echo "== $name: skipped, past BUDGET=$BUDGET s"
        return
    fi
    timeout "${STEP_TIMEOUT:-300}" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc in $(( $(date +%s) - start )) s"
    tail -n "${TAIL:-25}" "$logs/$name.log"
    [ $rc -eq 0 ] || status=1
}
pstep() { # name, command...: in the background (STEP_TIMEOUT, default 240 s), exit status in name.rc
    name=$1; shift
    (timeout "${STEP_TIMEOUT:-240}" "$@" >"$logs/$name.log" 2>&1; echo $? >"$logs/$name.rc") &
}
pwait() { # waits for the pstep runs, then each one's exit status and its log's last TAIL lines
    wait
    for f in "$logs"/*.rc; do
        name=$(basename "$f" .rc); rc=$(cat "$f")
        echo "== $name: exit $rc"; tail -n "${TAIL:-6}" "$logs/$name.log"
        [ "$rc" = 0 ] || status=1
    done
}
sass_page() { # name, launches to skip: ncu's source page (SASS with its warp-stall samples) of
    # one v6 decode kernel of a 2-layer batch-1 step, into name.csv (tests/bench/sass_stalls.py)
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=2 STEP_TIMEOUT=90 step "$1" sh -c \
        "'$ncu' --clock-control none --kernel-name regex:'lq_gemv_mma1_kernel' \
        --launch-skip $2 --launch-count 1 --section SourceCounters --section LaunchStats \
        --page source --print-source sass --csv \
        '$run/bench_cuda' --decode-profile --layers 2 > '$logs/$1.csv'"
}
case "${1:-all}" in
all|ops)
    step cuda_ops "$run/test_cuda_ops"
    step cuda_train_ops "$run/test_cuda_train_ops"
    step cuda_attention_backward "$run/test_cuda_attention_backward" --time
    step cuda_sample "$run/test_cuda_sample" --time
    # the device-drawn LQ sketch against core's host RNG, value for value
    LQ_CUDA_DECOMPOSE_SKETCH=check step sketch_check "$run/test_cuda_ops" decompose ;;
esac
case "${1:-all}" in
time) TAIL=200 step kernel_times "$run/test_cuda_ops" "${CASE:-linear}" --time ;;
esac
case "${1:-all}" in
all|e2e) step gpu_e2e python3 "$root/tests/kernels/test_gpu_e2e.py" ;;
esac
case "${1:-all}" in
all|bench) TAIL=40 step bench_cuda "$run/bench_cuda" ${BENCH_ARGS:-} ;;
esac
case "${1:-}" in
graphs) # decode-step graphs and weight prefetch: correctness, then decode with each on and off
    step cuda_graph "$run/test_cuda_graph"
    for case in embed rope fused attention_batch linear; do
        step "cuda_ops_$case" "$run/test_cuda_ops" "$case"
    done
    TAIL=40 step bench_variants "$run/bench_cuda" --decode-variants ;;
esac
case "${1:-}" in
gemv) # the one-token decode kernels (LQ_CUDA_DECODE v1 to v4; `test_cuda_ops linear`, in the
    # graphs case, checks all four against the CPU and each other bit for bit): each linear layer
    # alone under each variant, then the whole batch-1 step (graphs on) under each
    TAIL=40 STEP_TIMEOUT=90 step bench_gemv "$run/bench_cuda" --linear-only \
        "${VARIANTS:-v1,v2,v3,v4}"
    TAIL=40 step decode_kernels "$run/bench_cuda" --decode-variants 1 --decode-kernels \
        "${VARIANTS:-v1,v2,v3,v4}" ;;
esac
case "${1:-}" in
backward) # the training ops (token_nll among them) and both attention backwards, timed
    step cuda_train_ops "$run/test_cuda_train_ops"
    TAIL=40 step cuda_attention_backward "$run/test_cuda_attention_backward" --time ;;
esac
case "${1:-}" in
sample) # both implementations (LQ_CUDA_SAMPLE=bisect, radix) against the CPU and each other,
    # timed side by side; then a small run under compute-sanitizer's racecheck and memcheck
    TAIL=60 step cuda_sample "$run/test_cuda_sample" --time
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
        2>/dev/null | head -1)
    if [ -n "$sanitizer" ]; then
        for tool in racecheck memcheck; do
            step "cuda_sample_$tool" "$sanitizer" --tool "$tool" --error-exitcode 1 \
                "$run/test_cuda_sample" --quick
        done
    else
        echo "== compute-sanitizer not found: racecheck and memcheck skipped"
    fi ;;
esac
case "${1:-}" in
decompose) # the LQ decomposition alone: its checks (the block sketch kernel against the host
    # rng, and the old one), then the old path, the morning's best (cholesky+tf32), the
    # default and the default with 16 streams, each with full 243-configuration rows and the
    # whole 7B table's time
    step cuda_decompose "$run/test_cuda_ops" decompose
    LQ_CUDA_DECOMPOSE_SKETCH=check step sketch_check "$run/test_cuda_ops" decompose
    LQ_CUDA_DECOMPOSE_SKETCH=check LQ_CUDA_DECOMPOSE_SKETCH_KERNEL=thread \
        step sketch_check_thread "$run/test_cuda_ops" decompose
    old=householder+fp32+thread-sketch+team-values
    TAIL=80 step bench_decompose "$run/bench_cuda" --only-decompose --variants \
        "${VARIANTS:-$old,cholesky+tf32+thread-sketch+team-values,default,default+streams16}" \
        ${BENCH_ARGS:-} ;;
esac
case "${1:-}" in
profile) # where a batch-1 decode step's GPU time goes: ncu per kernel, cold caches
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_GRAPHS=0 step ncu_decode sh -c "'$ncu' --csv --metrics gpu__time_duration.sum \
        --cache-control all --clock-control none '$run/bench_cuda' --decode-profile --layers 2 \
        > '$logs/ncu_decode.csv'"
    TAIL=60 step ncu_summary python3 "$root/tests/bench/ncu_decode_summary.py" \
        "$logs/ncu_decode.csv" --layers 2 ;;
esac
case "${1:-}" in
smollm2) # bench_compress_mpi.py on the GPU. SmolLM2's GGUF does not fit one device-tool call
    # (64 MiB), and a carried folder does not outlive its call, so the GGUF travels
    # xz-compressed in parts (here: xz -9 < the GGUF | split -b 37000000 - smol.xz., the parts
    # in git-ignored .smolA/ and .smolB/), each copied to /tmp/parts by its own call to the same
    # warm machine (carry .smolA: mkdir -p /tmp/parts && cp .smolA/* /tmp/parts; then .smolB),
    # then this case (carry .devrun) joins them
    . "$run/mpi-env.sh" || exit 1
    export OMPI_MCA_btl_vader_single_copy_mechanism=none
    gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f "$gguf" ] || cat /tmp/parts/smol.xz.* | xz -d > "$gguf" || exit 1
    TAIL=40 STEP_TIMEOUT=${STEP_TIMEOUT:-300} step bench_compress_mpi python3 \
        "$root/tests/bench/bench_compress_mpi.py" --lqd "$run/lqd" --gguf "$gguf" --device cuda \
        --ranks 1,2 ;;
esac
case "${1:-}" in
diag) # why the batch-1 decode kernels and the error table run where they do: ncu's warp-state,
    # scheduler and memory sections for the first 4096 x 4096 and 11008 x 4096 decode kernels of
    # a step, then an error-table row's time against the number of concurrent decompositions
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_GRAPHS=0 TAIL=5 step ncu_decode_sections sh -c "'$ncu' --clock-control none \
        --kernel-name regex:'lq_decode_kernel|lq_lowrank_project' --launch-skip 14 --launch-count 10 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        '$run/bench_cuda' --decode-profile --layers 2"
    TAIL=3 STEP_TIMEOUT=150 step ncu_decompose sh -c "'$ncu' --csv --clock-control none \
        --metrics gpu__time_duration.sum --launch-count 600 '$run/bench_cuda' --only-decompose \
        --table-sample 81 --variants default+streams1 > '$logs/ncu_decompose.csv'"
    TAIL=60 STEP_TIMEOUT=200 step decompose_streams "$run/bench_cuda" --only-decompose \
        --table-sample 3 --variants "${VARIANTS:-default+streams1,default+streams4,default}" ;;
esac
case "${1:-}" in
rows) # the whole-row one-token decode kernel (LQ_CUDA_DECODE=v5): against the CPU, under graph
    # replay, each linear layer alone, then the whole batch-1 step, against v1
    step cuda_ops_gemv "$run/test_cuda_ops" lq_gemv
    LQ_CUDA_DECODE=v5 step cuda_graph_v5 "$run/test_cuda_graph"
    TAIL=40 STEP_TIMEOUT=120 step bench_gemv "$run/bench_cuda" --linear-only \
        "${VARIANTS:-v1,v5,v5r2,v5r4}"
    TAIL=40 step decode_kernels "$run/bench_cuda" --decode-variants 1 --decode-kernels \
        "${VARIANTS:-v1,v5,v5r2,v5r4}"
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    for v in v1 v5; do
        LQ_CUDA_DECODE=$v LQ_CUDA_GRAPHS=0 TAIL=2 step "ncu_decode_$v" sh -c "'$ncu' --csv \
            --metrics gpu__time_duration.sum --cache-control none --clock-control none \
            '$run/bench_cuda' --decode-profile --layers 2 > '$logs/ncu_decode_$v.csv'"
        TAIL=14 step "ncu_summary_$v" python3 "$root/tests/bench/ncu_decode_summary.py" \
            "$logs/ncu_decode_$v.csv" --layers 2
    done ;;
esac
case "${1:-}" in
pending) # what the 2026-11-26 CPU-only sessions wrote, in one call, the figures the issue's
    # batch-1 target needs first: v6 (tuned by its SASS) and linear_fused (rmsnorm, swiglu and
    # the residual add inside v6) against the CPU, then the batch-1..64 step under auto and v6
    # (which fuses at batch 1) and v6 without the fusion (LQ_CUDA_FUSE=0); then the rest against
    # the CPU (linear_group, RoPE in attention, the attention kernels, graphs, end to end), the
    # step with none of the grouping, RoPE fusion and fusion, PDL off, the tile attention
    # kernel, each layer alone (and v6 with fatter CTAs), and v6 under ncu; the training ops
    # and training tokens/s with the frozen products in fp32, TF32 and bf16; steps past BUDGET
    # (default 540 s) are skipped
    BUDGET=${BUDGET:-540}
    STEP_TIMEOUT=240 step cuda_ops_gemv "$run/test_cuda_ops" lq_gemv
    TAIL=60 STEP_TIMEOUT=120 step cuda_ops_fused "$run/test_cuda_ops" linear_fused --time
    TAIL=40 STEP_TIMEOUT=300 step decode_steps "$run/bench_cuda" --decode-variants 1 \
        --decode-kernels auto,v6
    LQ_CUDA_FUSE=0 TAIL=20 STEP_TIMEOUT=200 step decode_steps_no_fuse "$run/bench_cuda" \
        --decode-variants 1 --decode-kernels v6
    LQ_CUDA_MMA1_CTAS=4 TAIL=20 STEP_TIMEOUT=200 step decode_steps_ctas4 "$run/bench_cuda" \
        --decode-variants 1 --decode-kernels v6
    TAIL=45 STEP_TIMEOUT=120 step cuda_ops_group "$run/test_cuda_ops" linear_group --time
    # 5-64 tokens (the projection beside the GEMM, x staged by it) and prefill (TF32 low rank)
    TAIL=12 STEP_TIMEOUT=180 step cuda_ops_linear "$run/test_cuda_ops" 'linear_lq$' \
        linear_lq_mma linear_lq_lowrank linear_dense linear_adapter
    TAIL=20 STEP_TIMEOUT=120 step cuda_ops_rope_attention "$run/test_cuda_ops" rope_attention \
        --time
    TAIL=30 STEP_TIMEOUT=120 step attention_times "$run/test_cuda_ops" attention --time
    TAIL=10 STEP_TIMEOUT=120 step attention_batch "$run/test_cuda_ops" attention_batch --time
    STEP_TIMEOUT=120 step cuda_graph "$run/test_cuda_graph"
    LQ_CUDA_DECODE=v6 STEP_TIMEOUT=120 step cuda_graph_v6 "$run/test_cuda_graph"
    TAIL=8 STEP_TIMEOUT=240 step gpu_e2e python3 "$root/tests/kernels/test_gpu_e2e.py"
    LQ_CUDA_DECODE=v6 TAIL=8 STEP_TIMEOUT=240 step gpu_e2e_v6 python3 \
        "$root/tests/kernels/test_gpu_e2e.py"
    # the prefill's low-rank products on TF32 (default) and as SGEMMs; 5-64 tokens with the
    # projection beside the GEMM (each layer's time with and without factors)
    TAIL=12 STEP_TIMEOUT=90 step bench_linear_lowrank_tf32 "$run/bench_cuda" --linear-all
    LQ_CUDA_LOWRANK_TF32=0 TAIL=12 STEP_TIMEOUT=90 step bench_linear_lowrank_sgemm \
        "$run/bench_cuda" --linear-all
    # training's frozen products on TF32 (default) or bf16 tensor cores, tiles by the prefill's
    # tile kernel
    TAIL=20 STEP_TIMEOUT=180 step cuda_train_ops "$run/test_cuda_train_ops"
    TAIL=4 STEP_TIMEOUT=120 step bench_train "$run/bench_cuda" --train-only
    LQ_CUDA_GROUP=0 LQ_CUDA_ROPE_FUSED=0 LQ_CUDA_FUSE=0 TAIL=40 STEP_TIMEOUT=300 \
        step decode_steps_apart \
        "$run/bench_cuda" --decode-variants 1 --decode-kernels auto,v6
    LQ_CUDA_PDL=0 TAIL=20 STEP_TIMEOUT=200 step decode_steps_no_pdl "$run/bench_cuda" \
        --decode-variants 1 --decode-kernels v6
    LQ_CUDA_ATTENTION_DECODE=0 TAIL=8 STEP_TIMEOUT=120 step decode_attention_tile \
        "$run/bench_cuda" --decode-variants 1
    TAIL=30 STEP_TIMEOUT=120 step bench_gemv "$run/bench_cuda" --linear-only auto,v1,v5,v6
    LQ_CUDA_MMA1_CTAS=4 TAIL=12 STEP_TIMEOUT=60 step bench_gemv_v6_ctas4 "$run/bench_cuda" \
        --linear-only v6 # 4 CTAs per SM at 64 registers
    for g in 2 4; do # v6 with fatter CTAs (fewer stagings of x; default: the fewest for a wave)
        LQ_CUDA_MMA1_ROW_GROUPS=$g TAIL=12 STEP_TIMEOUT=60 step "bench_gemv_v6_rows$g" \
            "$run/bench_cuda" --linear-only v6
    done
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=2 STEP_TIMEOUT=150 step ncu_decode_v6 sh -c "'$ncu' \
        --csv --metrics gpu__time_duration.sum --cache-control none --clock-control none \
        '$run/bench_cuda' --decode-profile --layers 2 > '$logs/ncu_decode_v6.csv'"
    TAIL=14 step ncu_summary_v6 python3 "$root/tests/bench/ncu_decode_summary.py" \
        "$logs/ncu_decode_v6.csv" --layers 2 ;;
esac
case "${1:-}" in
session) # one short call (2026-11-27): the batch-1..64 step under auto and v6 alone on the GPU,
    # then every correctness check of the CPU-only sessions' code side by side (each one's CPU
    # reference on 2 threads; no timings among them), then the timings one at a time, most wanted
    # first; steps past BUDGET (default 400 s) are skipped
    BUDGET=${BUDGET:-400}
    TAIL=40 STEP_TIMEOUT=200 step decode_steps "$run/bench_cuda" --decode-variants 1 \
        --decode-kernels auto,v6
    parallel_start=$(date +%s)
    export OPENBLAS_NUM_THREADS=2 LQ_THREADS=2
    pstep cuda_ops_gemv "$run/test_cuda_ops" lq_gemv
    pstep cuda_ops_fused "$run/test_cuda_ops" linear_fused
    pstep cuda_ops_group "$run/test_cuda_ops" linear_group
    pstep cuda_ops_linear "$run/test_cuda_ops" 'linear_lq$' linear_lq_mma linear_lq_lowrank \
        linear_dense linear_adapter
    pstep cuda_ops_rope_attention "$run/test_cuda_ops" rope_attention
    pstep cuda_ops_attention "$run/test_cuda_ops" attention attention_batch
    pstep cuda_ops_rest "$run/test_cuda_ops" rmsnorm embed 'rope$' swiglu fused_ops matmul \
        memory_accounting decompose cholqr
    pstep cuda_sample "$run/test_cuda_sample"
    pstep cuda_attention_backward "$run/test_cuda_attention_backward"
    pstep cuda_eig "$run/test_cuda_eig"
    pstep cuda_graph "$run/test_cuda_graph"
    pstep cuda_graph_v6 env LQ_CUDA_DECODE=v6 "$run/test_cuda_graph"
    pstep cuda_train_ops "$run/test_cuda_train_ops"
    pstep gpu_e2e python3 "$root/tests/kernels/test_gpu_e2e.py"
    pstep gpu_e2e_v6 env LQ_CUDA_DECODE=v6 python3 "$root/tests/kernels/test_gpu_e2e.py"
    pwait
    unset OPENBLAS_NUM_THREADS LQ_THREADS
    echo "== side by side: $(( $(date +%s) - parallel_start )) s"
    TAIL=30 STEP_TIMEOUT=90 step bench_gemv "$run/bench_cuda" --linear-only auto,v1,v5,v6
    LQ_CUDA_FUSE=0 TAIL=12 STEP_TIMEOUT=120 step decode_steps_no_fuse "$run/bench_cuda" \
        --decode-variants 1 --decode-kernels v6
    TAIL=12 STEP_TIMEOUT=90 step bench_linear_lowrank_tf32 "$run/bench_cuda" --linear-all
    LQ_CUDA_LOWRANK_TF32=0 TAIL=12 STEP_TIMEOUT=90 step bench_linear_lowrank_sgemm \
        "$run/bench_cuda" --linear-all
    TAIL=4 STEP_TIMEOUT=120 step bench_train "$run/bench_cuda" --train-only
    LQ_CUDA_MMA1_CTAS=4 TAIL=12 STEP_TIMEOUT=120 step decode_steps_ctas4 "$run/bench_cuda" \
        --decode-variants 1 --decode-kernels v6
    LQ_CUDA_GROUP=0 LQ_CUDA_ROPE_FUSED=0 LQ_CUDA_FUSE=0 TAIL=12 STEP_TIMEOUT=120 \
        step decode_steps_apart "$run/bench_cuda" --decode-variants 1 --decode-kernels v6
    LQ_CUDA_PDL=0 TAIL=12 STEP_TIMEOUT=120 step decode_steps_no_pdl "$run/bench_cuda" \
        --decode-variants 1 --decode-kernels v6
    TAIL=30 STEP_TIMEOUT=60 step fused_times "$run/test_cuda_ops" linear_fused --time
    TAIL=30 STEP_TIMEOUT=60 step group_times "$run/test_cuda_ops" linear_group --time
    TAIL=20 STEP_TIMEOUT=60 step attention_times "$run/test_cuda_ops" attention attention_batch \
        --time
    LQ_CUDA_ATTENTION_DECODE=0 TAIL=8 STEP_TIMEOUT=120 step decode_attention_tile \
        "$run/bench_cuda" --decode-variants 1 ;;
esac
case "${1:-}" in
second) # the call after `session` (2026-11-27): the attention harness's fixed timing, the whole
    # benchmark (both models, prefill), v6's L2 prefetch distance and row groups per CTA, each
    # layer alone and in the step, then where a v6 step's GPU time goes (ncu per kernel, and
    # v6's warp states), and the training checks with bf16 as the default
    BUDGET=${BUDGET:-330}
    TAIL=14 STEP_TIMEOUT=60 step rope_attention_times "$run/test_cuda_ops" rope_attention --time
    TAIL=30 STEP_TIMEOUT=150 step bench_full "$run/bench_cuda"
    for p in 0 4 8; do
        LQ_CUDA_MMA1_PREFETCH=$p TAIL=10 STEP_TIMEOUT=60 step "bench_gemv_v6_prefetch$p" \
            "$run/bench_cuda" --linear-only v6
    done
    for g in 2 4; do
        LQ_CUDA_MMA1_ROW_GROUPS=$g TAIL=10 STEP_TIMEOUT=60 step "bench_gemv_v6_rows$g" \
            "$run/bench_cuda" --linear-only v6
    done
    LQ_CUDA_MMA1_PREFETCH=4 TAIL=8 STEP_TIMEOUT=100 step decode_steps_prefetch4 \
        "$run/bench_cuda" --decode-variants 1 --decode-kernels v6
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=2 STEP_TIMEOUT=150 step ncu_decode_v6 sh -c "'$ncu' \
        --csv --metrics gpu__time_duration.sum --cache-control none --clock-control none \
        '$run/bench_cuda' --decode-profile --layers 2 > '$logs/ncu_decode_v6.csv'"
    TAIL=16 step ncu_summary_v6 python3 "$root/tests/bench/ncu_decode_summary.py" \
        "$logs/ncu_decode_v6.csv" --layers 2
    LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=5 STEP_TIMEOUT=120 step ncu_sections_v6 sh -c \
        "'$ncu' --clock-control none --kernel-name regex:'lq_gemv_mma1_kernel' --launch-skip 7 \
        --launch-count 3 --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section LaunchStats --section MemoryWorkloadAnalysis \
        '$run/bench_cuda' --decode-profile --layers 2"
    TAIL=6 STEP_TIMEOUT=120 step cuda_train_ops "$run/test_cuda_train_ops"
    TAIL=14 STEP_TIMEOUT=200 step gpu_e2e python3 "$root/tests/kernels/test_gpu_e2e.py" ;;
esac
case "${1:-}" in
ceiling) # the best a step of one streaming kernel per layer can reach (plain, PDL, PDL with the
    # loads before the wait: bench_stream_ceiling), then where v6's warps stall (ncu source
    # counters) and what the low-rank projection kernel does (ncu sections)
    TAIL=40 STEP_TIMEOUT=120 step stream_ceiling "$run/bench_stream_ceiling"
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=3 STEP_TIMEOUT=120 step ncu_source_v6 sh -c \
        "'$ncu' --clock-control none --kernel-name regex:'lq_gemv_mma1_kernel' --launch-skip 7 \
        --launch-count 2 --section WarpStateStats --section SourceCounters \
        --section InstructionStats --print-details all \
        '$run/bench_cuda' --decode-profile --layers 2"
    LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=3 STEP_TIMEOUT=90 step ncu_projection sh -c \
        "'$ncu' --clock-control none --kernel-name regex:'lq_lowrank_project' --launch-skip 3 \
        --launch-count 2 --section SpeedOfLight --section LaunchStats --section Occupancy \
        --section WarpStateStats '$run/bench_cuda' --decode-profile --layers 2" ;;
esac
case "${1:-}" in
stalls) # where v6's warps wait, instruction by instruction (ncu's source page: SASS with its
    # warp-stall samples), for a 4096 x 4096 layer with the fused norm (Q, K, V) and an
    # 11008 x 4096 one (gate, up), for reading offline with tests/bench/sass_stalls.py
    sass_page ncu_sass_v6_q 7
    sass_page ncu_sass_v6_gate 11 ;;
esac
case "${1:-}" in
loads) # v6 with its loads a tile ahead (one tile a pass), x read once in the staging and the
    # scale window formed at decode: against the CPU and the other kernels (side by side; v6 at
    # 2, 3 and 4 CTAs a SM), end to end with the default (auto: v6), then the batch-1..64 step
    # and each layer alone, new (the default's choice of 2 or 3 CTAs a SM per layer, and each
    # forced) against the build before (.devrun/bench_cuda_old.xz, when packed: xz -c
    # build-before/tests/bench_cuda), then ncu's source page of a normed 4096 x 4096 layer
    export OPENBLAS_NUM_THREADS=2 LQ_THREADS=2
    pstep cuda_ops_gemv "$run/test_cuda_ops" lq_gemv
    pstep cuda_ops_fused "$run/test_cuda_ops" linear_fused
    pstep cuda_ops_group "$run/test_cuda_ops" linear_group
    pstep cuda_graph_v6 env LQ_CUDA_DECODE=v6 "$run/test_cuda_graph"
    pstep gpu_e2e python3 "$root/tests/kernels/test_gpu_e2e.py"
    TAIL=4 pwait
    unset OPENBLAS_NUM_THREADS LQ_THREADS
    [ -f "$run/bench_cuda_old.xz" ] && xz -dc "$run/bench_cuda_old.xz" > "$run/bench_cuda_old" &&
        chmod +x "$run/bench_cuda_old"
    TAIL=12 STEP_TIMEOUT=60 step decode_new "$run/bench_cuda" --decode-variants 1 \
        --decode-kernels auto,v1
    [ -x "$run/bench_cuda_old" ] && TAIL=7 STEP_TIMEOUT=60 step decode_old \
        "$run/bench_cuda_old" --decode-variants 1 --decode-kernels v6
    for c in 2 3; do
        LQ_CUDA_MMA1_CTAS=$c TAIL=7 STEP_TIMEOUT=60 step "decode_new_ctas$c" "$run/bench_cuda" \
            --decode-variants 1 --decode-kernels v6
    done
    TAIL=10 STEP_TIMEOUT=30 step gemv_new "$run/bench_cuda" --linear-only v6,v1
    [ -x "$run/bench_cuda_old" ] && TAIL=10 STEP_TIMEOUT=30 step gemv_old \
        "$run/bench_cuda_old" --linear-only v6
    LQ_CUDA_MMA1_CTAS=2 TAIL=10 STEP_TIMEOUT=30 step gemv_new_ctas2 "$run/bench_cuda" \
        --linear-only v6
    sass_page ncu_sass_v6_q 7
    TAIL=30 step sass_stalls_q python3 "$root/tests/bench/sass_stalls.py" \
        "$logs/ncu_sass_v6_q.csv" --top 12 ;;
esac
case "${1:-}" in
staged) # Written 2026-11-27 without a GPU, off by default until this has run: v6 with its codes
    # staged in shared memory (each warp's ring of LQ_M1_RING tiles, cp.async;
    # LQ_CUDA_MMA1_STAGE=1), with t = x·L2ᵀ projected by the decode kernels' CTAs
    # (LQ_CUDA_MMA1_INLINE_T=1: no projection kernel between a layer and the kernel before) and
    # with x staged by clusters (LQ_CUDA_MMA1_CLUSTER=2|4).
    # First the batch-1 step under the variants that do not poll, alone on the GPU (what a
    # short call must bring back): bench_cuda --decode-env, one model, fresh backends, the
    # variants interleaved over 3 rounds, medians. Then the checks, side by side: against the
    # CPU and bit for bit against the codes in registers, against x staged by clusters and
    # against the projection kernel (test_cuda_ops lq_gemv, also v6 at 2, 3 and 4 CTAs a SM),
    # the fused and grouped layers, graphs, end to end, all staged (the fused layers also in
    # clusters of 4) and staged with t projected here. Then the variants that poll (t projected
    # here, never run on a GPU: a fault would end the process) in a process of their own; the
    # step at batch 1 to 64;
    # each layer alone; ncu's L2 and DRAM sections of a staged normed 4096 x 4096 layer and the
    # next two (before: L2 at 31% of its peak beside DRAM's 15%,
    # ncu_sections_v6_h100_2026-11-27.log). `staged_more` has the source page.
    s=LQ_CUDA_MMA1_STAGE=1 c=LQ_CUDA_MMA1_CTAS
    TAIL=12 STEP_TIMEOUT=200 step decode_sweep "$run/bench_cuda" --decode-env \
        "-;$s;$s $c=2;$s $c=3;$c=2;$c=3;$s LQ_CUDA_MMA1_CLUSTER=2;$s LQ_CUDA_MMA1_CLUSTER=4"
    export OPENBLAS_NUM_THREADS=2 LQ_THREADS=2
    pstep cuda_ops_gemv "$run/test_cuda_ops" lq_gemv
    pstep cuda_ops_fused env LQ_CUDA_MMA1_STAGE=1 "$run/test_cuda_ops" linear_fused
    pstep cuda_ops_fused_cluster env LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_CLUSTER=4 \
        "$run/test_cuda_ops" linear_fused
    pstep cuda_ops_group env LQ_CUDA_MMA1_STAGE=1 "$run/test_cuda_ops" linear_group
    pstep cuda_graph_v6 env LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_DECODE=v6 "$run/test_cuda_graph"
    pstep gpu_e2e env LQ_CUDA_MMA1_STAGE=1 python3 "$root/tests/kernels/test_gpu_e2e.py"
    pstep cuda_ops_fused_inline env LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_INLINE_T=1 \
        "$run/test_cuda_ops" linear_fused
    pstep cuda_ops_group_inline env LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_INLINE_T=1 \
        "$run/test_cuda_ops" linear_group
    pstep cuda_graph_inline env LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_INLINE_T=1 LQ_CUDA_DECODE=v6 \
        "$run/test_cuda_graph"
    pstep gpu_e2e_inline env LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_INLINE_T=1 \
        python3 "$root/tests/kernels/test_gpu_e2e.py"
    TAIL=4 pwait
    unset OPENBLAS_NUM_THREADS LQ_THREADS
    i=LQ_CUDA_MMA1_INLINE_T=1 r=LQ_CUDA_MMA1_ROOM=1
    TAIL=10 STEP_TIMEOUT=200 step decode_sweep_inline "$run/bench_cuda" --decode-env \
        "-;$i;$s $i;$s $i $c=2;$s $i $c=3;$s $i $r $c=2;$s $i $r $c=3;$i $r"
    TAIL=7 STEP_TIMEOUT=60 step decode_batches "$run/bench_cuda" --decode-env "-;$s" \
        --decode-batches 1,8,32,64 --rounds 1
    LQ_CUDA_MMA1_STAGE=1 TAIL=10 STEP_TIMEOUT=30 step gemv_staged "$run/bench_cuda" \
        --linear-only v6,v1
    TAIL=10 STEP_TIMEOUT=30 step gemv_registers "$run/bench_cuda" --linear-only v6
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=5 STEP_TIMEOUT=120 \
        step ncu_sections_staged sh -c "'$ncu' --clock-control none \
        --kernel-name regex:'lq_gemv_mma1_kernel' --launch-skip 7 --launch-count 3 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section LaunchStats --section MemoryWorkloadAnalysis \
        '$run/bench_cuda' --decode-profile --layers 2" ;;
staged_more) # each layer alone under the staged v6's variants (32-row CTAs, 3 CTAs a SM,
    # clusters of 2 and 4), then ncu's source page of a staged normed 4096 x 4096 layer
    LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_ROW_GROUPS=2 TAIL=10 STEP_TIMEOUT=30 \
        step gemv_staged_rg2 "$run/bench_cuda" --linear-only v6
    LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_CTAS=3 TAIL=10 STEP_TIMEOUT=30 \
        step gemv_staged_ctas3 "$run/bench_cuda" --linear-only v6
    for c in 2 4; do
        LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_CLUSTER=$c TAIL=10 STEP_TIMEOUT=30 \
            step "gemv_staged_cluster$c" "$run/bench_cuda" --linear-only v6
    done
    LQ_CUDA_MMA1_STAGE=1 sass_page ncu_sass_staged_q 7
    TAIL=30 step sass_stalls_staged_q python3 "$root/tests/bench/sass_stalls.py" \
        "$logs/ncu_sass_staged_q.csv" --top 12 ;;
esac
case "${1:-}" in
attention) # the one-token attention kernel (attention_decode_kernel.h): both kernels against
    # the CPU and timed, then the batch-1..64 decode step with the tile kernel and with it
    TAIL=40 step attention_times "$run/test_cuda_ops" attention --time
    TAIL=20 step attention_batch_times "$run/test_cuda_ops" attention_batch --time
    LQ_CUDA_ATTENTION_DECODE=0 TAIL=12 step decode_attention_tile "$run/bench_cuda" \
        --decode-variants 1
    TAIL=12 step decode_attention_one_token "$run/bench_cuda" --decode-variants 1 ;;
esac
case "${1:-}" in
pdl) # every kernel of a step launched with programmatic dependent launch (pdl_cuda.cuh): the
    # ops and graphs against the CPU and eager runs, end to end, then batch 1-64 decode with
    # it on, off (LQ_CUDA_PDL=0), on again, with graphs and with ops launched one by one
    step cuda_ops "$run/test_cuda_ops"
    step cuda_graph "$run/test_cuda_graph"
    TAIL=8 step gpu_e2e python3 "$root/tests/kernels/test_gpu_e2e.py"
    TAIL=40 step decode_pdl "$run/bench_cuda" --decode-variants 13 --decode-pdl 101 ;;
esac
case "${1:-}" in
mma1) # the one-token tensor-core decode kernel (LQ_CUDA_DECODE=v6, gemv_mma1_kernel.h): against
    # the CPU, under graph replay, each linear layer alone, the whole batch-1 step against v1 and
    # v5, then ncu per kernel and v6's warp states
    step cuda_ops_gemv "$run/test_cuda_ops" lq_gemv
    LQ_CUDA_DECODE=v6 step cuda_graph_v6 "$run/test_cuda_graph"
    TAIL=40 STEP_TIMEOUT=120 step bench_gemv "$run/bench_cuda" --linear-only \
        "${VARIANTS:-v1,v5,v6}"
    for p in 0 1 4; do # v6's L2 prefetch distance (default 2)
        LQ_CUDA_MMA1_PREFETCH=$p TAIL=12 STEP_TIMEOUT=60 step "bench_gemv_v6_prefetch$p" \
            "$run/bench_cuda" --linear-only v6
    done
    TAIL=40 step decode_kernels "$run/bench_cuda" --decode-variants 1 --decode-kernels \
        "${VARIANTS:-v1,auto,v6}"
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=2 step ncu_decode_v6 sh -c "'$ncu' --csv \
        --metrics gpu__time_duration.sum --cache-control none --clock-control none \
        '$run/bench_cuda' --decode-profile --layers 2 > '$logs/ncu_decode_v6.csv'"
    TAIL=14 step ncu_summary_v6 python3 "$root/tests/bench/ncu_decode_summary.py" \
        "$logs/ncu_decode_v6.csv" --layers 2
    LQ_CUDA_DECODE=v6 LQ_CUDA_GRAPHS=0 TAIL=60 step ncu_sections_v6 sh -c "'$ncu' \
        --clock-control none --kernel-name regex:'lq_gemv_mma1_kernel' --launch-skip 7 \
        --launch-count 3 --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section InstructionStats '$run/bench_cuda' --decode-profile --layers 2" ;;
esac
case "${1:-}" in
table) # the error table's small solvers: the CholeskyQR kernels (new against old and a host
    # reference, timed), the decomposition checks, then error-table rows with each kernel
    TAIL=30 step cuda_ops_cholqr "$run/test_cuda_ops" cholqr --time
    step cuda_decompose "$run/test_cuda_ops" decompose
    TAIL=12 STEP_TIMEOUT=200 step decompose_table "$run/bench_cuda" --only-decompose \
        --table-sample "${SAMPLE:-3}" --variants "${VARIANTS:-default}"
    LQ_CUDA_CHOLQR_KERNEL=old TAIL=12 STEP_TIMEOUT=200 step decompose_table_old_cholqr \
        "$run/bench_cuda" --only-decompose --table-sample "${SAMPLE:-3}" --variants default ;;
esac
case "${1:-}" in
eig) # the one-launch Jacobi eigensolver of the error table (LQ_CUDA_DECOMPOSE_EIG=jacobi):
    # against Dsyevd and timed, the decomposition checks with it, then error-table rows
    TAIL=30 step cuda_eig "$run/test_cuda_eig" --time
    step cuda_decompose "$run/test_cuda_ops" decompose
    LQ_CUDA_DECOMPOSE_EIG=jacobi step cuda_decompose_jacobi "$run/test_cuda_ops" decompose
    TAIL=40 STEP_TIMEOUT=240 step decompose_table "$run/bench_cuda" --only-decompose \
        --table-sample "${SAMPLE:-3}" --variants "${VARIANTS:-default,jacobi,jacobi+streams16}" ;;
esac
case "${1:-}" in
connections) # error-table rows with more concurrent decompositions than CUDA's default 8
    # hardware queues, with CUDA_DEVICE_MAX_CONNECTIONS raised to 32
    CUDA_DEVICE_MAX_CONNECTIONS=32 TAIL=40 STEP_TIMEOUT=240 step decompose_connections \
        "$run/bench_cuda" --only-decompose --table-sample "${SAMPLE:-3}" \
        --variants "${VARIANTS:-jacobi+streams8,jacobi+streams16,jacobi+streams32,default+streams16}" ;;
esac
case "${1:-}" in
final) # the defaults of this round (the Jacobi eigensolver, 16 workers, 32 hardware queues,
    # the auto one-token decode kernel): the decomposition checks, error-table rows, end to end
    step cuda_decompose "$run/test_cuda_ops" decompose
    TAIL=40 STEP_TIMEOUT=240 step decompose_table "$run/bench_cuda" --only-decompose \
        --table-sample "${SAMPLE:-3}" --variants "${VARIANTS:-default,default+tf32,default+streams32}"
    [ -n "${SKIP_E2E:-}" ] || TAIL=8 step gpu_e2e python3 "$root/tests/kernels/test_gpu_e2e.py" ;;
esac
case "${1:-}" in
sass) # the batch-1 decode kernels' machine code and where their warps stall (ncu source
    # counters), for reading offline
    cuobjdump=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
    TAIL=2 step sass_all "$cuobjdump" -sass "$run/liblqd_cuda.so"
    gzip -f "$logs/sass_all.log"
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    LQ_CUDA_GRAPHS=0 TAIL=2 step ncu_decode_source sh -c "'$ncu' --clock-control none \
        --kernel-name regex:'lq_decode_kernel' --launch-skip 7 --launch-count 2 \
        --section WarpStateStats --section SourceCounters --section InstructionStats \
        --print-details all '$run/bench_cuda' --decode-profile --layers 2" ;;
esac
case "${1:-}" in
train) step cuda_train_ops "$run/test_cuda_train_ops"
    step cuda_attention_backward "$run/test_cuda_attention_backward" --time
    TAIL=4 step bench_train "$run/bench_cuda" --train-only
    step gpu_e2e python3 "$root/tests/kernels/test_gpu_e2e.py" ;;
esac
case "${1:-}" in
mpi) # `mpirun -n 2 lqd compress --device cuda` (both ranks on cuda:0) against the plain command,
    # byte for byte, then the CPU's 2 ranks (equal or not: printed), on stories260K, with the
    # Open MPI runtime pack_for_gpu.sh packed (the GPU machine has none)
    export LQD_DEVRUN="$run" # where mpi-env.sh finds the runtime
    if [ -f "$run/mpi-env.sh" ] && . "$run/mpi-env.sh"; then
        # containers often forbid the cross-process reads of the shared-memory transport
        export OMPI_MCA_btl_vader_single_copy_mechanism=none
        TAIL=40 STEP_TIMEOUT=200 step mpi_compress python3 "$root/tests/mpi/compare_ranks.py" \
            --devices cuda,cpu --ranks 2
    else
        echo "== mpi: no Open MPI in $run (pack_for_gpu.sh packs it where Open MPI is" \
            "installed): not run"
        status=1
    fi ;;
esac
exit $status
