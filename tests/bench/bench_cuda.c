/* GPU figures for a model of LLaMA-2-7B's shapes (dim 4096, hidden 11008, 32 layers, 32 heads,
 * vocab 32000, untied head) held LQ-compressed on the GPU, random weights (speed does not
 * depend on their values; the packed codes are random bytes, the scales valid):
 *
 *   decode   tokens/s at batch 1, 8, 32, 64 (lq_forward_batch, logits copied to the host each
 *            step as the daemon does), against the memory-bandwidth limit: bytes read per step
 *            (packed Q, L1, L2, the fp32 head, norms, the KV cache) over the measured
 *            device-to-device copy bandwidth (bytes read + written);
 *   prefill  tokens/s and TFLOP/s of one 512-token prompt;
 *   decomposition  ms per LQ iteration (rank 64) on 4096 x 4096 and 4096 x 11008 with each
 *            phase's device time (LQ_CUDA_DECOMPOSE_PROFILE), and the time of one error-table
 *            row over the 243-configuration grid (or every K-th configuration with
 *            --table-sample K) on each shape, extrapolated to the whole 7B table (224 matrices
 *            x 243 configurations); for each variant of the decomposition named by
 *            --variants (default householder+fp32+thread-sketch+team-values,default: the
 *            old path and the default; words householder, cholesky, cholesky-trsm, syevd,
 *            batched, jacobi, tf32, fp32, thread-sketch, block-sketch, team-values, vec4-values,
 *            streamsN, default joined by '+' pick the QR, the eigensolver, the range products,
 *            the sketch kernel, the NF values kernel and the concurrent decompositions of a
 *            row, as the LQ_CUDA_DECOMPOSE_QR, _EIG, _TF32, _SKETCH_KERNEL, _NF_VALUES and
 *            _STREAMS environment variables do; a word not given leaves the decomposition's
 *            default).
 *
 * Two allocations are measured: ~3 bits (every matrix NF3 with double quantization, (3, 8,
 * fp32, 64, 256) = 3.127 bits) and ~2.75 bits (k, v and up at (2, 8, fp32, 64, 256), the rest
 * NF3: 2.74 bits, the kind of mix the ILP picks). Prints figures; exit 1 only on errors, 77
 * without a GPU. Also each linear layer alone at several batch sizes.
 * --train adds LoRA training tokens/s of the ~2.75-bit model (--train-only: nothing else).
 * --decode-variants [LIST] runs only the decode of the ~3-bit model, with decode-step graphs and
 * weight prefetch each on and off (LIST: which of the four, by index 0-3, e.g. "1" for graphs
 * without prefetch), and with
 * --decode-kernels v1,v2,... each of those under each one-token decode kernel (LQ_CUDA_DECODE),
 * --decode-pdl DIGITS (e.g. 101) each with programmatic dependent launch on (1) or off (0) in
 * that order (LQ_CUDA_PDL), all on fresh backends.
 * --decode-env SPECS runs only the decode of the ~3-bit model under each environment variant
 * of SPECS (tests/bench/env_variants.h: "A=1 B=2;A=1;-"), one fresh backend each, graphs on,
 * at the batch sizes of --decode-batches LIST (default 1), --rounds N times (default 3), then
 * a summary of the variants' medians; --list-variants prints what SPECS parses to and exits
 * (no GPU needed; a malformed SPECS exits 2 on any machine).
 * --linear-only [LIST] runs only the linear layers alone, at 1, 2 and 4 tokens, once per
 * one-token decode kernel named in LIST (LQ_CUDA_DECODE values, default v1,v2,v3,v4).
 * --linear-all runs only the linear layers alone, at every batch size (1 to 512 tokens).
 * Usage: bench_cuda [--layers N] [--skip-models] [--skip-decompose] [--only-decompose]
 *                   [--table-sample K] [--variants LIST] [--train] [--train-only]
 *                   [--decode-variants]
 *                   [--decode-kernels LIST] [--decode-pdl DIGITS] [--decode-profile]
 *                   [--decode-env SPECS [--decode-batches LIST] [--rounds N] [--list-variants]]
 *                   [--linear-only [LIST]] [--linear-all] */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/forward.h"
#include "core/lq.h"
#include "core/rng.h"
#include "core/train.h"
#include "kernels/backend.h"
#include "tests/bench/env_variants.h"

static double copy_bw; /* measured, bytes per second */
/* --decode-profile: one warm-up and one timed step at batch 1, for a profiler (ncu) to see
 * each kernel of a step (tests/bench/ncu_decode_summary.py) */
static int profile_steps;

enum { DIM = 4096, HIDDEN = 11008, HEADS = 32, VOCAB = 32000, RANK = 64, CONTEXT = 1024 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float *normal_array(struct lq_rng *rng, size_t count, float scale) {
    float *a = malloc(count * sizeof *a);
    if (!a) return NULL;
    for (size_t i = 0; i < count; i++) a[i] = scale * (float)(lq_rng_uniform(rng) * 2.0 - 1.0);
    return a;
}

static uint8_t *random_bytes(struct lq_rng *rng, size_t count) {
    uint8_t *b = malloc(count + 8);
    if (!b) return NULL;
    for (size_t i = 0; i < count; i += 8) {
        uint64_t word = lq_rng_next(rng);
        memcpy(b + i, &word, 8);
    }
    return b;
}

/* A packed LQ matrix with random codes and valid scales, plus rank-64 factors. */
static int random_lq(struct lq_rng *rng, int rows, int cols, struct lq_nf_config c,
                     struct lq_linear *w) {
    memset(w, 0, sizeof *w);
    w->rows = rows, w->cols = cols, w->is_lq = 1, w->rank = RANK;
    struct lq_nf_matrix *q = &w->q;
    q->config = c, q->rows = (size_t)rows, q->cols = (size_t)cols;
    q->codes = random_bytes(rng, lq_nf_codes_bytes(q));
    q->scale_codes = random_bytes(rng, lq_nf_scale_codes_bytes(q));
    size_t groups = lq_nf_group_count((size_t)rows * cols, &c);
    q->group_scales = malloc(groups * 4 + 8);
    for (size_t g = 0; q->group_scales && g < groups; g++) {
        float scale = 0.02f;
        memcpy(q->group_scales + 4 * g, &scale, 4); /* the configs here store fp32 scales */
    }
    q->scale_offset = 0.001f;
    w->lora_A = normal_array(rng, (size_t)RANK * cols, 0.01f);
    w->lora_B = normal_array(rng, (size_t)rows * RANK, 0.01f);
    return q->codes && q->scale_codes && q->group_scales && w->lora_A && w->lora_B ? 0 : -1;
}

static size_t linear_bytes(const struct lq_linear *w) {
    return lq_nf_matrix_bytes(&w->q) + (size_t)w->rank * (w->rows + w->cols) * sizeof(float);
}

static struct lq_model *build_model(int layers, int mixed, struct lq_rng *rng, double *bits) {
    struct lq_model *m = calloc(1, sizeof *m);
    struct lq_model_config *c = &m->config;
    *c = (struct lq_model_config){DIM,  layers,   HEADS, HEADS, DIM / HEADS, HIDDEN, VOCAB,
                                  4096, 10000.0f, 1e-5f, 0,     1,           2};
    m->embed = normal_array(rng, (size_t)VOCAB * DIM, 0.02f);
    m->lm_head = normal_array(rng, (size_t)VOCAB * DIM, 0.02f);
    m->final_norm = normal_array(rng, DIM, 1.0f);
    m->layers = calloc((size_t)layers, sizeof *m->layers);
    m->is_lq = 1;
    const struct lq_nf_config nf3 = {3, 8, LQ_SCALE_FP32, 64, 256};
    const struct lq_nf_config nf2 = {2, 8, LQ_SCALE_FP32, 64, 256};
    double total_bits = 0, params = 0;
    for (int l = 0; l < layers; l++) {
        m->layers[l].attn_norm = normal_array(rng, DIM, 1.0f);
        m->layers[l].ffn_norm = normal_array(rng, DIM, 1.0f);
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            int rows = k == LQ_GATE_PROJ || k == LQ_UP_PROJ ? HIDDEN : DIM;
            int cols = k == LQ_DOWN_PROJ ? HIDDEN : DIM;
            int low = mixed && (k == LQ_K_PROJ || k == LQ_V_PROJ || k == LQ_UP_PROJ);
            struct lq_nf_config cfg = low ? nf2 : nf3;
            if (random_lq(rng, rows, cols, cfg, &m->layers[l].linear[k])) return NULL;
            total_bits += lq_nf_storage_bits((size_t)rows * cols, &cfg);
            params += (double)rows * cols;
        }
    }
    *bits = total_bits / params;
    return m;
}

/* Device-to-device copy bandwidth, bytes read + written per second (median of 20). */
static double copy_bandwidth(void) {
    size_t bytes = (size_t)2 << 30;
    void *a = NULL, *b = NULL;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) return 0;
    cudaMemset(a, 1, bytes);
    cudaEvent_t start, stop;
    cudaEventCreate(&start), cudaEventCreate(&stop);
    float times[20];
    for (int i = 0; i < 23; i++) {
        cudaEventRecord(start, 0);
        cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(stop, 0);
        cudaEventSynchronize(stop);
        if (i >= 3) cudaEventElapsedTime(&times[i - 3], start, stop);
    }
    for (int i = 0; i < 20; i++) /* insertion sort for the median */
        for (int j = i; j > 0 && times[j] < times[j - 1]; j--) {
            float t = times[j];
            times[j] = times[j - 1], times[j - 1] = t;
        }
    cudaFree(a), cudaFree(b);
    cudaEventDestroy(start), cudaEventDestroy(stop);
    return 2.0 * (double)bytes / (times[10] * 1e-3);
}

static int decode(struct lq_runtime *runtime, const struct lq_model *m, int batch_size,
                  double bandwidth, double *ms_out, double *percent_out, struct lq_error *err) {
    struct lq_session *sessions[64] = {0};
    struct lq_batch *batch = NULL;
    float *logits = malloc((size_t)batch_size * VOCAB * sizeof *logits);
    int rc = lq_batch_create(runtime, batch_size, &batch, err);
    const int prompt = 64, warmup = profile_steps ? 1 : 3, steps = profile_steps ? 1 : 32;
    int tokens[64];
    for (int i = 0; i < batch_size && !rc; i++) {
        rc = lq_session_create(runtime, CONTEXT, prompt, &sessions[i], err);
        int ids[64];
        for (int t = 0; t < prompt; t++) ids[t] = (t * 97 + i * 13) % VOCAB;
        if (!rc) rc = lq_session_forward(sessions[i], ids, prompt, 0, logits, err);
    }
    double start = 0;
    for (int step = 0; step < warmup + steps && !rc; step++) {
        if (step == warmup) start = now();
        for (int i = 0; i < batch_size; i++) tokens[i] = (step * 31 + i * 7) % VOCAB;
        rc = lq_forward_batch(batch, sessions, tokens, batch_size, logits, err);
    }
    if (!rc) {
        double seconds = (now() - start) / steps;
        size_t bytes = (size_t)VOCAB * DIM * 4 + DIM * 4; /* head and final norm */
        for (int l = 0; l < m->config.n_layers; l++) {
            bytes += 2 * DIM * 4;
            for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++)
                bytes += linear_bytes(&m->layers[l].linear[k]);
        }
        double average_position = prompt + warmup + steps / 2.0;
        bytes += (size_t)(batch_size * average_position * DIM * 4.0 * 2 * m->config.n_layers);
        double limit = bandwidth / (double)bytes; /* steps per second at full bandwidth */
        printf("decode batch %2d: %8.1f tokens/s, %6.2f ms/step; %.2f GB read per step, "
               "bandwidth limit %.1f steps/s: %.0f%% of it\n",
               batch_size, batch_size / seconds, seconds * 1e3, bytes / 1e9, limit,
               100.0 / seconds / limit);
        fflush(stdout);
        if (ms_out) *ms_out = seconds * 1e3;
        if (percent_out) *percent_out = 100.0 / seconds / limit;
    }
    for (int i = 0; i < batch_size; i++) lq_session_free(sessions[i]);
    lq_batch_free(batch);
    free(logits);
    return rc;
}

static int prefill(struct lq_runtime *runtime, const struct lq_model *m, struct lq_error *err) {
    const int n = 512;
    struct lq_session *s = NULL;
    float *logits = malloc(VOCAB * sizeof *logits);
    int ids[512];
    for (int t = 0; t < n; t++) ids[t] = (t * 101) % VOCAB;
    int rc = lq_session_create(runtime, CONTEXT, n, &s, err);
    double best = 1e30;
    for (int round = 0; round < 4 && !rc; round++) {
        lq_session_reset(s);
        double start = now();
        rc = lq_session_forward(s, ids, n, 0, logits, err);
        double seconds = now() - start;
        if (round > 0 && seconds < best) best = seconds; /* round 0 warms up */
    }
    if (!rc) {
        double params = 0;
        for (int l = 0; l < m->config.n_layers; l++)
            for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++)
                params += (double)m->layers[l].linear[k].rows * m->layers[l].linear[k].cols;
        /* linears at 2 flops per weight per token, plus causal attention (QKᵀ and PV) */
        double flops =
            2.0 * params * n + 2.0 * 2.0 * m->config.n_layers * DIM * (n * (n + 1) / 2.0);
        printf("prefill %d tokens: %.3f s, %.0f tokens/s, %.1f TFLOP/s\n", n, best, n / best,
               flops / best / 1e12);
    }
    lq_session_free(s);
    free(logits);
    return rc;
}

/* One linear layer alone: microseconds per call (host clock over 50 queued calls, so launch
 * costs count as in a forward pass) and the bandwidth its bytes imply. With decode_variants
 * (a comma-separated list of LQ_CUDA_DECODE values, kernels/cuda/linear_cuda.cu) each layer is
 * timed at 1, 2 and 4 tokens once per variant, one line each; else at every batch size with
 * the environment as it is. */
static int linear_alone(struct lq_backend *gpu, const char *decode_variants, struct lq_error *err) {
    struct lq_rng rng;
    lq_rng_seed(&rng, 3);
    const int shapes[3][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
    const struct lq_nf_config configs[2] = {{2, 8, LQ_SCALE_FP32, 64, 256},
                                            {3, 8, LQ_SCALE_FP32, 64, 256}};
    const int all_batches[] = {1, 2, 4, 8, 9, 16, 32, 64, 512}, decode_batches[] = {1, 2, 4};
    const int *batches = decode_variants ? decode_batches : all_batches;
    const size_t batch_count = decode_variants ? 3 : sizeof all_batches / sizeof all_batches[0];
    char names[8][16], list[128];
    int variant_count = 0;
    snprintf(list, sizeof list, "%s", decode_variants ? decode_variants : "");
    for (char *save = NULL, *word = strtok_r(list, ",", &save); word && variant_count < 8;
         word = strtok_r(NULL, ",", &save))
        snprintf(names[variant_count++], sizeof names[0], "%s", word);
    if (decode_variants && variant_count == 0) {
        snprintf(err->message, sizeof err->message, "--linear-only: no variant named");
        return -1;
    }
    float *x = NULL, *y = NULL;
    if (gpu->ops->buffer_alloc(gpu, (size_t)512 * 11008 * 4, (void **)&x, err) ||
        gpu->ops->buffer_alloc(gpu, (size_t)512 * 11008 * 4, (void **)&y, err))
        return -1;
    float *host = normal_array(&rng, (size_t)512 * 11008, 1.0f);
    gpu->ops->copy_to_device(gpu, x, host, (size_t)512 * 11008 * 4);
    free(host);
    for (int s = 0; s < 3; s++)
        for (int c = 0; c < 3; c++) { /* b0 2 and 3 with rank 64; b0 3 without factors */
            struct lq_linear w;
            if (random_lq(&rng, shapes[s][0], shapes[s][1], configs[c < 2 ? c : 1], &w)) return -1;
            if (c == 2) {
                free(w.lora_A), free(w.lora_B);
                w.lora_A = w.lora_B = NULL, w.rank = 0;
            }
            if (gpu->ops->linear_prepare(gpu, &w, err)) return -1;
            for (int v = 0; v < (variant_count > 0 ? variant_count : 1); v++) {
                if (variant_count > 0) setenv("LQ_CUDA_DECODE", names[v], 1);
                printf("linear %5d x %5d b0=%d rank %2d (%.1f MB)%s%s:", w.rows, w.cols,
                       w.q.config.b0, w.rank, linear_bytes(&w) / 1e6,
                       variant_count > 0 ? " LQ_CUDA_DECODE=" : "",
                       variant_count > 0 ? names[v] : "");
                for (size_t b = 0; b < batch_count; b++) {
                    const int n = batches[b], calls = 50;
                    for (int i = 0; i < 5; i++)
                        if (gpu->ops->linear(gpu, &w, x, n, y)) {
                            snprintf(err->message, sizeof err->message,
                                     "linear %d x %d, n %d: the call failed", w.rows, w.cols, n);
                            return -1;
                        }
                    if (gpu->ops->synchronize(gpu, err)) return -1;
                    double start = now();
                    for (int i = 0; i < calls; i++) gpu->ops->linear(gpu, &w, x, n, y);
                    if (gpu->ops->synchronize(gpu, err)) return -1;
                    double us = (now() - start) / calls * 1e6;
                    printf(" n%d %.1fus", n, us);
                    if (n == 1)
                        printf(" (%.0f%% of copy bw)",
                               100.0 * linear_bytes(&w) / (us * 1e-6) / copy_bw);
                }
                printf("\n");
                fflush(stdout);
            }
            gpu->ops->linear_release(gpu, &w);
            lq_linear_free(&w);
        }
    if (variant_count > 0) unsetenv("LQ_CUDA_DECODE");
    gpu->ops->buffer_free(gpu, x), gpu->ops->buffer_free(gpu, y);
    return 0;
}

/* LoRA training (LQ init: every L1, L2 trained, Q frozen) of the model on the GPU: tokens/s of
 * optimizer steps of 8 rows x 256 tokens (micro-batches of 2), after one warm-up step; once
 * per way the frozen weights' products run (LQ_CUDA_TRAIN_MATH): as SGEMMs, on TF32 tensor
 * cores and in bf16 (the default). */
static int training(struct lq_backend *gpu, struct lq_model *m, struct lq_error *err) {
    static const char *const modes[][2] = {{"fp32", "fp32"}, {"tf32", "tf32"}, {"bf16", NULL}};
    const char *saved = getenv("LQ_CUDA_TRAIN_MATH");
    char *restore = saved ? strdup(saved) : NULL;
    int rc = 0;
    for (size_t mode = 0; mode < sizeof modes / sizeof modes[0] && !rc; mode++) {
        if (modes[mode][1])
            setenv("LQ_CUDA_TRAIN_MATH", modes[mode][1], 1);
        else
            unsetenv("LQ_CUDA_TRAIN_MATH");
        struct lq_train_options o;
        lq_train_options_default(&o);
        o.seq_len = 256, o.micro_batch = 2, o.learning_rate = 1e-4;
        struct lq_trainer *trainer = NULL;
        if (lq_trainer_create(gpu, m, &o, &trainer, err)) {
            rc = -1;
            break;
        }
        enum { ROWS = 8, LEN = 256 };
        static int inputs[ROWS * LEN], targets[ROWS * LEN];
        for (int i = 0; i < ROWS * LEN; i++)
            inputs[i] = (i * 131) % VOCAB, targets[i] = (i * 17 + 5) % VOCAB;
        struct lq_train_batch batch = {ROWS, LEN, inputs, targets, NULL};
        struct lq_train_stats stats;
        rc = lq_trainer_step(trainer, &batch, &stats, err);
        double start = now();
        const int steps = 3;
        for (int i = 0; i < steps && !rc; i++) rc = lq_trainer_step(trainer, &batch, &stats, err);
        if (!rc) {
            double seconds = (now() - start) / steps;
            struct lq_backend_memory memory;
            gpu->ops->memory(gpu, &memory);
            printf("training, frozen products %s (LQ init, rank %d, %d x %d tokens a step, "
                   "micro-batch %d): %.2f s/step, %.0f tokens/s, loss %.3f; %.2f GB on the GPU\n",
                   modes[mode][0], RANK, ROWS, LEN, o.micro_batch, seconds, ROWS * LEN / seconds,
                   stats.loss, (memory.weights + memory.buffers + memory.scratch) / 1e9);
            fflush(stdout);
        }
        lq_trainer_free(trainer);
    }
    if (restore)
        setenv("LQ_CUDA_TRAIN_MATH", restore, 1);
    else
        unsetenv("LQ_CUDA_TRAIN_MATH");
    free(restore);
    return rc;
}

/* The environment variables a decomposition variant sets; a variable its words do not name
 * is unset, so the decomposition's own default applies. */
static const char *const variant_variables[] = {
    "LQ_CUDA_DECOMPOSE_QR",      "LQ_CUDA_DECOMPOSE_EIG",
    "LQ_CUDA_DECOMPOSE_TF32",    "LQ_CUDA_DECOMPOSE_SKETCH_KERNEL",
    "LQ_CUDA_DECOMPOSE_STREAMS", "LQ_CUDA_DECOMPOSE_NF_VALUES",
};
#define VARIANT_VARIABLES (sizeof variant_variables / sizeof variant_variables[0])

static void unset_variant(void) {
    for (size_t i = 0; i < VARIANT_VARIABLES; i++) unsetenv(variant_variables[i]);
}

/* A variant of the GPU decomposition: '+'-joined words among householder, cholesky,
 * cholesky-trsm (the QR), syevd, batched, jacobi (the eigensolver), tf32, fp32 (the range products,
 * both for the table and the kept decompositions; unnamed: TF32 for the table, fp32 kept),
 * tf32-all (Bᵀ on TF32 too, both),
 * thread-sketch, block-sketch (the sketch kernel), team-values, vec4-values (the NF values
 * kernel), streamsN (N concurrent decompositions in an error-table row) and default (names
 * nothing), set as the environment variables the decomposition reads. Returns -1 on an
 * unknown word. */
static int set_variant(const char *variant) {
    const char *values[VARIANT_VARIABLES] = {NULL, NULL, NULL, NULL, NULL, NULL};
    char words[128], streams[16];
    snprintf(words, sizeof words, "%s", variant);
    for (char *save = NULL, *word = strtok_r(words, "+", &save); word;
         word = strtok_r(NULL, "+", &save)) {
        char *end = NULL;
        if (strcmp(word, "householder") == 0 || strcmp(word, "cholesky") == 0 ||
            strcmp(word, "cholesky-trsm") == 0)
            values[0] = word;
        else if (strcmp(word, "syevd") == 0 || strcmp(word, "batched") == 0 ||
                 strcmp(word, "jacobi") == 0)
            values[1] = word;
        else if (strcmp(word, "tf32") == 0 || strcmp(word, "fp32") == 0)
            values[2] = word[0] == 't' ? "1" : "0";
        else if (strcmp(word, "tf32-all") == 0)
            values[2] = "all";
        else if (strcmp(word, "thread-sketch") == 0 || strcmp(word, "block-sketch") == 0)
            values[3] = word[0] == 't' ? "thread" : "block";
        else if (strncmp(word, "streams", 7) == 0) {
            long n = strtol(word + 7, &end, 10);
            if (end == word + 7 || *end != '\0' || n < 1 || n > 64) return -1;
            snprintf(streams, sizeof streams, "%ld", n);
            values[4] = streams;
        } else if (strcmp(word, "team-values") == 0 || strcmp(word, "vec4-values") == 0)
            values[5] = word[0] == 't' ? "team" : "vec4";
        else if (strcmp(word, "default") != 0)
            return -1;
    }
    unset_variant();
    for (size_t i = 0; i < VARIANT_VARIABLES; i++)
        if (values[i]) setenv(variant_variables[i], values[i], 1);
    return 0;
}

/* Decode of one model on fresh backends with decode-step graphs and weight prefetch on and off
 * (each backend reads LQ_CUDA_GRAPHS / LQ_CUDA_PREFETCH when created), so that one run shows
 * what each contributes. */
static int decode_variants(const struct lq_model *m, double bandwidth, const char *which,
                           const char *kernels, const char *pdl, struct lq_error *err) {
    static const struct {
        const char *graphs, *prefetch, *label;
    } variants[] = {{"1", "1", "graphs + prefetch"},
                    {"1", "0", "graphs, no prefetch"},
                    {"0", "1", "prefetch, no graphs"},
                    {"0", "0", "neither (ops launched one by one)"}};
    char list[64];
    snprintf(list, sizeof list, "%s", kernels ? kernels : "");
    char *save = NULL, *kernel = strtok_r(list, ",", &save);
    do { /* --decode-kernels LIST: each one-token kernel (LQ_CUDA_DECODE) in turn */
        if (kernel) setenv("LQ_CUDA_DECODE", kernel, 1);
        for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++)
            for (const char *p = pdl ? pdl : "-"; *p; p++) {
                char index[8];
                snprintf(index, sizeof index, "%zu", v);
                if (which && !strstr(which, index)) continue; /* --decode-variants LIST: 0..3 */
                if (*p != '-' && *p != '0' && *p != '1') continue; /* --decode-pdl: digits 0, 1 */
                setenv("LQ_CUDA_GRAPHS", variants[v].graphs, 1);
                setenv("LQ_CUDA_PREFETCH", variants[v].prefetch, 1);
                if (*p != '-') setenv("LQ_CUDA_PDL", *p == '1' ? "1" : "0", 1);
                struct lq_backend *gpu = NULL;
                struct lq_runtime *runtime = NULL;
                int rc = lq_backend_cuda_create(0, 0, &gpu, err);
                if (!rc) rc = lq_runtime_create(gpu, (struct lq_model *)m, &runtime, err);
                printf("\n%s%s%s%s:\n", variants[v].label, kernel ? ", decode kernel " : "",
                       kernel ? kernel : "",
                       *p == '-'   ? ""
                       : *p == '1' ? ", PDL on"
                                   : ", PDL off (LQ_CUDA_PDL=0)");
                const int batches[] = {1, 8, 32, 64};
                for (int b = 0; b < 4 && !rc; b++)
                    rc = decode(runtime, m, batches[b], bandwidth, NULL, NULL, err);
                if (runtime) lq_runtime_free(runtime);
                if (gpu) gpu->ops->destroy(gpu);
                if (rc) return rc;
            }
    } while (kernel && (kernel = strtok_r(NULL, ",", &save)));
    unsetenv("LQ_CUDA_GRAPHS");
    unsetenv("LQ_CUDA_PREFETCH");
    if (pdl) unsetenv("LQ_CUDA_PDL");
    if (kernels) unsetenv("LQ_CUDA_DECODE");
    return LQ_OK;
}

/* --decode-env (env_variants_sweep): one variant's decode of the model on a fresh backend. */
struct sweep_context {
    const struct lq_model *model;
    double bandwidth;
};

static int sweep_measure(void *context, const int *batches, int batch_count, double *ms,
                         double *percent, char *why, size_t why_size) {
    const struct sweep_context *c = context;
    struct lq_error err = {0};
    struct lq_backend *gpu = NULL;
    struct lq_runtime *runtime = NULL;
    int rc = lq_backend_cuda_create(0, 0, &gpu, &err);
    if (!rc) rc = lq_runtime_create(gpu, (struct lq_model *)c->model, &runtime, &err);
    for (int b = 0; b < batch_count && !rc; b++)
        rc = decode(runtime, c->model, batches[b], c->bandwidth, &ms[b], &percent[b], &err);
    if (runtime) lq_runtime_free(runtime);
    if (gpu) gpu->ops->destroy(gpu);
    if (rc) snprintf(why, why_size, "%s", err.message);
    return rc ? -1 : 0;
}

/* ms per LQ iteration: 6 steps less 1 step (both after a warm-up), then one profiled 6-step
 * run whose phase times the decomposition prints to stderr. */
static int iteration_time(struct lq_backend *gpu, const float *w, size_t rows, size_t cols,
                          const char *variant, struct lq_error *err) {
    struct lq_nf_config nf3 = {3, 8, LQ_SCALE_FP32, 64, 256};
    struct lq_decompose_options o;
    lq_decompose_options_default(&o);
    o.rank = RANK;
    o.min_improvement = 0;
    double t[2];
    int iters[2];
    const int steps[2] = {1, 6};
    for (int k = 0; k < 2; k++) {
        struct lq_decomposition d;
        o.max_iters = steps[k];
        if (k == 0 && gpu->ops->decompose(gpu, w, rows, cols, &nf3, &o, &d, err)) return -1;
        if (k == 0) lq_decomposition_free(&d); /* warm-up: handles, workspaces */
        double start = now();
        if (gpu->ops->decompose(gpu, w, rows, cols, &nf3, &o, &d, err)) return -1;
        t[k] = now() - start, iters[k] = d.iters;
        lq_decomposition_free(&d);
    }
    double per_iter = iters[1] > iters[0] ? (t[1] - t[0]) / (iters[1] - iters[0]) : t[1];
    printf("[%s] LQ iteration %zu x %zu rank %d: %.2f ms (%d and %d steps took %.1f and %.1f ms)\n",
           variant, rows, cols, RANK, per_iter * 1e3, iters[0], iters[1], t[0] * 1e3, t[1] * 1e3);
    fflush(stdout);
    setenv("LQ_CUDA_DECOMPOSE_PROFILE", "1", 1);
    struct lq_decomposition d;
    int rc = gpu->ops->decompose(gpu, w, rows, cols, &nf3, &o, &d, err);
    unsetenv("LQ_CUDA_DECOMPOSE_PROFILE");
    if (rc) return -1;
    lq_decomposition_free(&d);
    return 0;
}

/* An error-table row, as lqd compress computes it on the GPU: every table_sample-th
 * configuration of Table 1 in one call. Returns the seconds extrapolated to all 243. */
static int table_row(struct lq_backend *gpu, const float *w, size_t rows, size_t cols,
                     int table_sample, const char *variant, double *row_seconds,
                     struct lq_error *err) {
    struct lq_nf_config grid[LQ_NF_TABLE1_SIZE], sample[LQ_NF_TABLE1_SIZE];
    uint64_t seeds[LQ_NF_TABLE1_SIZE];
    double errors[LQ_NF_TABLE1_SIZE];
    lq_nf_grid_table1(grid);
    size_t count = 0;
    for (size_t g = 0; g < LQ_NF_TABLE1_SIZE; g += (size_t)table_sample)
        seeds[count] = g, sample[count++] = grid[g];
    struct lq_decompose_options o;
    lq_decompose_options_default(&o);
    o.rank = RANK;
    double start = now();
    if (gpu->ops->decompose_errors(gpu, w, rows, cols, sample, seeds, count, &o, errors, err))
        return -1;
    double seconds = now() - start;
    *row_seconds = seconds / count * LQ_NF_TABLE1_SIZE;
    double mean = 0.0;
    for (size_t c = 0; c < count; c++) mean += sqrt(errors[c]);
    printf("[%s] error-table row %zu x %zu: %zu configurations (T = %d, stop when the error "
           "stops falling) in %.2f s: %.1f ms each, %.1f s for all 243; mean error %.6g\n",
           variant, rows, cols, count, o.max_iters, seconds, seconds / count * 1e3, *row_seconds,
           mean / count);
    fflush(stdout);
    return 0;
}

static int decomposition(struct lq_backend *gpu, int table_sample, const char *variants,
                         struct lq_error *err) {
    struct lq_rng rng;
    lq_rng_seed(&rng, 7);
    const int shapes[2][2] = {{4096, 4096}, {4096, 11008}};
    float *w[2] = {NULL, NULL};
    for (int s = 0; s < 2; s++) {
        size_t count = (size_t)shapes[s][0] * (size_t)shapes[s][1];
        w[s] = malloc(count * sizeof *w[s]);
        if (!w[s]) {
            free(w[0]);
            return lq_error_set(err, LQ_ENOMEM, "out of memory");
        }
        lq_rng_fill_normal(&rng, w[s], count);
        for (size_t i = 0; i < count; i++) w[s][i] *= 0.02f;
    }
    char list[512];
    snprintf(list, sizeof list, "%s", variants);
    int rc = 0;
    for (char *save = NULL, *variant = strtok_r(list, ",", &save); variant && !rc;
         variant = strtok_r(NULL, ",", &save)) {
        if (set_variant(variant)) {
            rc = lq_error_set(err, LQ_EINVAL,
                              "variant '%s': expected words householder, cholesky, "
                              "cholesky-trsm, syevd, batched, jacobi, tf32, fp32, thread-sketch, "
                              "block-sketch, team-values, vec4-values, streamsN, default "
                              "joined by '+'",
                              variant);
            break;
        }
        double row_seconds[2] = {0, 0};
        for (int s = 0; s < 2 && !rc; s++) {
            size_t rows = (size_t)shapes[s][0], cols = (size_t)shapes[s][1];
            rc = iteration_time(gpu, w[s], rows, cols, variant, err);
            if (!rc)
                rc = table_row(gpu, w[s], rows, cols, table_sample, variant, &row_seconds[s], err);
        }
        /* per layer: q, k, v, o are 4096 x 4096; gate, up, down 11008 x 4096 (same cost as
         * 4096 x 11008 up to the transpose) */
        if (!rc)
            printf("[%s] whole 7B error table (224 x 243), extrapolated from the rows above: "
                   "%.1f min\n\n",
                   variant, 32 * (4 * row_seconds[0] + 3 * row_seconds[1]) / 60.0);
    }
    unset_variant();
    free(w[0]), free(w[1]);
    return rc ? -1 : 0;
}

int main(int argc, char **argv) {
    int layers = 32, skip_decompose = 0, table_sample = 1, skip_models = 0, train = 0;
    int train_only = 0, linear_all = 0;
    int only_decompose = 0;
    /* the old path and the default */
    const char *variants = "householder+fp32+thread-sketch+team-values,default";
    int decode_variants_only = 0;
    const char *decode_which = NULL, *decode_kernels = NULL, *decode_pdl = NULL;
    const char *linear_variants = NULL;              /* --linear-only LIST */
    const char *env_spec = NULL, *env_batches = "1"; /* --decode-env, --decode-batches */
    int env_rounds = 3, list_variants = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--layers") == 0 && i + 1 < argc)
            layers = atoi(argv[++i]);
        else if (strcmp(argv[i], "--skip-decompose") == 0)
            skip_decompose = 1;
        else if (strcmp(argv[i], "--skip-models") == 0)
            skip_models = 1;
        else if (strcmp(argv[i], "--train") == 0)
            train = 1;
        else if (strcmp(argv[i], "--train-only") == 0)
            train_only = 1;
        else if (strcmp(argv[i], "--linear-all") == 0)
            linear_all = 1;
        else if (strcmp(argv[i], "--only-decompose") == 0)
            only_decompose = skip_models = 1;
        else if (strcmp(argv[i], "--table-sample") == 0 && i + 1 < argc)
            table_sample = atoi(argv[++i]);
        else if (strcmp(argv[i], "--decode-variants") == 0) {
            decode_variants_only = 1;
            if (i + 1 < argc && argv[i + 1][0] >= '0' && argv[i + 1][0] <= '9')
                decode_which = argv[++i];
        } else if (strcmp(argv[i], "--decode-kernels") == 0 && i + 1 < argc)
            decode_kernels = argv[++i];
        else if (strcmp(argv[i], "--decode-pdl") == 0 && i + 1 < argc)
            decode_pdl = argv[++i];
        else if (strcmp(argv[i], "--decode-profile") == 0)
            profile_steps = 1;
        else if (strcmp(argv[i], "--linear-only") == 0)
            linear_variants = i + 1 < argc && argv[i + 1][0] != '-' ? argv[++i] : "v1,v2,v3,v4";
        else if (strcmp(argv[i], "--variants") == 0 && i + 1 < argc)
            variants = argv[++i];
        else if (strcmp(argv[i], "--decode-env") == 0 && i + 1 < argc)
            env_spec = argv[++i];
        else if (strcmp(argv[i], "--decode-batches") == 0 && i + 1 < argc)
            env_batches = argv[++i];
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc)
            env_rounds = atoi(argv[++i]);
        else if (strcmp(argv[i], "--list-variants") == 0)
            list_variants = 1;
        else {
            fprintf(stderr,
                    "bench_cuda: unknown argument '%s' (usage: the top of "
                    "tests/bench/bench_cuda.c)\n",
                    argv[i]);
            return 2;
        }
    }
    /* --decode-env: checked before the GPU is asked for, so that a bad spec fails anywhere */
    static struct env_variant env_variants[ENV_VARIANTS_MAX];
    int env_count = 0, sweep_batches[ENV_SWEEP_BATCHES_MAX], sweep_batch_count = 0;
    if (env_spec) {
        char why[256];
        if (env_variants_parse(env_spec, env_variants, ENV_VARIANTS_MAX, &env_count, why,
                               sizeof why)) {
            fprintf(stderr, "bench_cuda: --decode-env: %s\n", why);
            return 2;
        }
        if (env_variants_parse_batches(env_batches, sweep_batches, ENV_SWEEP_BATCHES_MAX,
                                       &sweep_batch_count) ||
            env_rounds < 1 || env_rounds > ENV_SWEEP_ROUNDS_MAX) {
            fprintf(stderr,
                    "bench_cuda: --decode-batches %s, --rounds %d: up to %d sizes of 1 to 64, "
                    "1 to %d rounds\n",
                    env_batches, env_rounds, ENV_SWEEP_BATCHES_MAX, ENV_SWEEP_ROUNDS_MAX);
            return 2;
        }
        if (list_variants) {
            for (int v = 0; v < env_count; v++) printf("%d: %s\n", v, env_variants[v].label);
            printf("batches:");
            for (int b = 0; b < sweep_batch_count; b++) printf(" %d", sweep_batches[b]);
            printf("; rounds: %d\n", env_rounds);
            return 0;
        }
    } else if (list_variants) {
        fprintf(stderr, "bench_cuda: --list-variants lists --decode-env's variants\n");
        return 2;
    }
    if (table_sample < 1) {
        fprintf(stderr, "bench_cuda: --table-sample %d: must be >= 1\n", table_sample);
        return 2;
    }
    struct lq_error err = {0};
    struct lq_backend *gpu = NULL;
    if (lq_backend_cuda_create(0, 0, &gpu, &err)) {
        printf("SKIP: %s\n", err.message);
        return 77;
    }
    struct cudaDeviceProp properties;
    cudaGetDeviceProperties(&properties, 0);
    double bandwidth = copy_bw = copy_bandwidth();
    printf("device: %s; copy bandwidth %.2f TB/s (read + write)\n", properties.name,
           bandwidth / 1e12);
    struct lq_rng rng;
    lq_rng_seed(&rng, 1);
    if (profile_steps) { /* batch-1 decode of the all-NF3 model, two steps, for ncu */
        double bits = 0;
        struct lq_model *m = build_model(layers, 0, &rng, &bits);
        struct lq_runtime *runtime = NULL;
        int rc = !m ? LQ_ENOMEM : lq_runtime_create(gpu, m, &runtime, &err);
        if (!rc) rc = decode(runtime, m, 1, bandwidth, NULL, NULL, &err);
        if (rc) fprintf(stderr, "bench_cuda: decode profile: %s\n", m ? err.message : "no memory");
        if (runtime) lq_runtime_free(runtime);
        lq_model_free(m);
        gpu->ops->destroy(gpu);
        return rc ? 1 : 0;
    }
    if (env_spec || decode_variants_only) { /* the all-NF3 model only, decode only */
        double bits = 0;
        gpu->ops->destroy(gpu);
        struct lq_model *m = build_model(layers, 0, &rng, &bits);
        if (!m) return 1;
        printf("model: %d layers, %.3f bits/param (all NF3), rank %d fp32 factors\n", layers, bits,
               RANK);
        int rc;
        if (env_spec) { /* graphs on and prefetch off, as lqd serves, unless a variant says */
            struct env_variant base;
            int base_count = 0;
            env_variants_parse("LQ_CUDA_GRAPHS=1 LQ_CUDA_PREFETCH=0", &base, 1, &base_count, NULL,
                               0);
            struct sweep_context context = {m, bandwidth};
            rc = env_variants_sweep(env_variants, env_count, &base, sweep_batches,
                                    sweep_batch_count, env_rounds, sweep_measure, &context, stdout);
        } else if ((rc = decode_variants(m, bandwidth, decode_which, decode_kernels, decode_pdl,
                                         &err)))
            fprintf(stderr, "bench_cuda: decode: %s\n", err.message);
        lq_model_free(m);
        return rc ? 1 : 0;
    }
    if (train_only) { /* training of the ~2.75-bit model only */
        double bits = 0;
        struct lq_model *m = build_model(layers, 1, &rng, &bits);
        printf("model: %d layers, %.3f bits/param (k, v, up NF2 + rest NF3), rank %d fp32 "
               "factors\n",
               layers, bits, RANK);
        int rc = !m ? LQ_ENOMEM : training(gpu, m, &err);
        if (rc) fprintf(stderr, "bench_cuda: training: %s\n", m ? err.message : "no memory");
        lq_model_free(m);
        gpu->ops->destroy(gpu);
        return rc ? 1 : 0;
    }
    if (linear_variants) { /* the linear layers alone, per decode kernel variant */
        int rc = linear_alone(gpu, linear_variants, &err);
        if (rc) fprintf(stderr, "bench_cuda: linear: %s\n", err.message);
        gpu->ops->destroy(gpu);
        return rc ? 1 : 0;
    }
    if (!only_decompose && linear_alone(gpu, NULL, &err)) {
        fprintf(stderr, "bench_cuda: linear: %s\n", err.message);
        return 1;
    }
    if (linear_all) {
        gpu->ops->destroy(gpu);
        return 0;
    }
    for (int mixed = 1; mixed >= 0 && !skip_models; mixed--) {
        double bits = 0;
        double t0 = now();
        struct lq_model *m = build_model(layers, mixed, &rng, &bits);
        struct lq_runtime *runtime = NULL;
        if (!m || lq_runtime_create(gpu, m, &runtime, &err)) {
            fprintf(stderr, "bench_cuda: %s\n", m ? err.message : "out of memory");
            return 1;
        }
        struct lq_backend_memory memory;
        gpu->ops->memory(gpu, &memory);
        printf("\nmodel: %d layers, %.3f bits/param (%s), rank %d fp32 factors; %.2f GB of "
               "weights on the GPU; built and uploaded in %.1f s\n",
               layers, bits, mixed ? "k, v, up NF2 + rest NF3" : "all NF3", RANK,
               memory.weights / 1e9, now() - t0);
        const int batches[] = {1, 8, 32, 64};
        for (int b = 0; b < 4; b++)
            if (decode(runtime, m, batches[b], bandwidth, NULL, NULL, &err)) {
                fprintf(stderr, "bench_cuda: decode: %s\n", err.message);
                return 1;
            }
        if (prefill(runtime, m, &err)) {
            fprintf(stderr, "bench_cuda: prefill: %s\n", err.message);
            return 1;
        }
        lq_runtime_free(runtime);
        if (train && mixed && training(gpu, m, &err)) {
            fprintf(stderr, "bench_cuda: training: %s\n", err.message);
            return 1;
        }
        lq_model_free(m);
    }
    if (!skip_decompose && decomposition(gpu, table_sample, variants, &err)) {
        fprintf(stderr, "bench_cuda: decomposition: %s\n", err.message);
        return 1;
    }
    gpu->ops->destroy(gpu);
    return 0;
}
