/* Prompt processing and decode speed of one sequence on the CPU, measured the way llama.cpp's
 * llama-bench measures pp<N> and tg<N>, through lqd's core API (core/forward.h), so that
 * tests/bench/bench_llamacpp.py can put the two side by side:
 *
 *   pp: one lq_session_forward of --prompt-tokens tokens (BOS, then pseudo-random ids) from an
 *       empty KV cache, last token's logits only (llama-bench: one llama_decode of n_prompt
 *       tokens with n_ubatch >= n_prompt);
 *   tg: --gen-tokens forwards of one token each (batch 1) after a --decode-prompt-token
 *       prompt that is not timed (default 1: BOS alone, so positions 1 .. N, as llama-bench's
 *       tg<N> decodes N single tokens from an empty cache), last token's logits each time.
 *
 * Token ids are pseudo-random (fixed seed) as in llama-bench; no sampling, no tokenizer.
 * Tokens/s per repetition is tokens / wall time of the timed forwards alone (model loading
 * and the untimed prompt excluded); the figure is the mean over --repetitions with the sample
 * standard deviation, after one untimed warm-up of each phase (llama-bench's avg_ts and
 * stddev_ts). Threads: lqd's CPU backend runs lq_parallel_for with LQ_THREADS threads
 * (core/parallel.c) and OpenBLAS single-threaded inside each; --threads N sets LQ_THREADS.
 *
 * Usage: bench_prefill_decode MODEL [--prompt-tokens 512] [--gen-tokens 128]
 *            [--decode-prompt-tokens 1] [--repetitions 5] [--threads N]
 * MODEL: anything lq_model_load reads (a GGUF file, an HF directory, an LQ directory).
 * Prints one JSON object on stdout (the fields below), a readable summary on stderr; exits 1
 * on a load or forward error, 2 on a usage error. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/forward.h"
#include "core/lq_model_file.h"
#include "core/parallel.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* n pseudo-random ids in [0, vocab), first = bos (when the model has one). */
static void fill_tokens(int *tokens, int n, int vocab, int bos, unsigned *state) {
    for (int i = 0; i < n; i++) {
        *state = *state * 1664525u + 1013904223u;
        tokens[i] = (int)((*state >> 8) % (unsigned)vocab);
    }
    if (n > 0 && bos >= 0) tokens[0] = bos;
}

/* Tokens/s of one prefill of n tokens from position 0. */
static double prefill_once(struct lq_session *s, const int *tokens, int n, float *logits,
                           struct lq_error *err) {
    lq_session_reset(s);
    double start = now();
    if (lq_session_forward(s, tokens, n, 0, logits, err)) return -1;
    return n / (now() - start);
}

/* Tokens/s of gen single-token forwards after an untimed prompt of prompt_n tokens. */
static double decode_once(struct lq_session *s, const int *prompt, int prompt_n, const int *gen,
                          int gen_n, float *logits, struct lq_error *err) {
    lq_session_reset(s);
    if (prompt_n > 0 && lq_session_forward(s, prompt, prompt_n, 0, logits, err)) return -1;
    double start = now();
    for (int i = 0; i < gen_n; i++)
        if (lq_session_forward(s, &gen[i], 1, 0, logits, err)) return -1;
    return gen_n / (now() - start);
}

static void stats(const double *v, int n, double *mean, double *stddev) {
    double sum = 0, sq = 0;
    for (int i = 0; i < n; i++) sum += v[i];
    *mean = sum / n;
    for (int i = 0; i < n; i++) sq += (v[i] - *mean) * (v[i] - *mean);
    *stddev = n > 1 ? sqrt(sq / (n - 1)) : 0;
}

static void print_phase(const char *name, int tokens, const double *v, int n, int last) {
    double mean, sd;
    stats(v, n, &mean, &sd);
    printf("  \"%s\": {\"tokens\": %d, \"avg_ts\": %.3f, \"stddev_ts\": %.3f, \"samples_ts\": [",
           name, tokens, mean, sd);
    for (int i = 0; i < n; i++) printf("%s%.3f", i ? ", " : "", v[i]);
    printf("]}%s\n", last ? "" : ",");
    fprintf(stderr, "%s%d: %.2f ± %.2f tokens/s\n", name, tokens, mean, sd);
}

static int parse_int(const char *text, int min, int *out) {
    char *end;
    long value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || value < min || value > (1 << 24)) return -1;
    *out = (int)value;
    return 0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL;
    int prompt_tokens = 512, gen_tokens = 128, decode_prompt = 1, repetitions = 5;
    for (int i = 1; i < argc; i++) {
        int *target = NULL, min = 1;
        if (strcmp(argv[i], "--prompt-tokens") == 0)
            target = &prompt_tokens;
        else if (strcmp(argv[i], "--gen-tokens") == 0)
            target = &gen_tokens;
        else if (strcmp(argv[i], "--decode-prompt-tokens") == 0)
            target = &decode_prompt, min = 0;
        else if (strcmp(argv[i], "--repetitions") == 0)
            target = &repetitions;
        else if (strcmp(argv[i], "--threads") == 0) {
            int threads;
            if (i + 1 == argc || parse_int(argv[i + 1], 1, &threads)) goto usage;
            setenv("LQ_THREADS", argv[++i], 1);
            continue;
        } else if (argv[i][0] != '-' && !model_path) {
            model_path = argv[i];
            continue;
        } else
            goto usage;
        if (i + 1 == argc || parse_int(argv[++i], min, target)) goto usage;
    }
    if (!model_path) goto usage;

    struct lq_error err = {0};
    struct lq_model *model = NULL;
    struct lq_backend *backend = NULL;
    struct lq_runtime *runtime = NULL;
    struct lq_session *session = NULL;
    struct lq_model_summary summary = {0};
    int *tokens = NULL, status = 1;
    float *logits = NULL;
    double *pp = NULL, *tg = NULL;
    double t0 = now();
    if (lq_model_load(model_path, &model, &err) || lq_backend_cpu_create(&backend, &err) ||
        lq_runtime_create(backend, model, &runtime, &err) ||
        lq_model_summary_compute(model, &summary, &err))
        goto done;
    double load_seconds = now() - t0;
    const struct lq_model_config *c = &model->config;
    int context =
        prompt_tokens > decode_prompt + gen_tokens ? prompt_tokens : decode_prompt + gen_tokens;
    if (context > c->max_seq_len) {
        lq_error_set(&err, LQ_EINVAL, "%d positions asked for, the model allows %d", context,
                     c->max_seq_len);
        goto done;
    }
    int max_batch = prompt_tokens > decode_prompt ? prompt_tokens : decode_prompt;
    if (lq_session_create(runtime, context, max_batch, &session, &err)) goto done;
    tokens = malloc((size_t)(prompt_tokens + decode_prompt + gen_tokens) * sizeof *tokens);
    logits = malloc((size_t)c->vocab_size * sizeof *logits);
    pp = malloc((size_t)repetitions * sizeof *pp);
    tg = malloc((size_t)repetitions * sizeof *tg);
    if (!tokens || !logits || !pp || !tg) {
        lq_error_set(&err, LQ_ENOMEM, "out of memory");
        goto done;
    }
    unsigned state = 12345;
    int *prefill = tokens, *dprompt = tokens + prompt_tokens, *gen = dprompt + decode_prompt;
    fill_tokens(prefill, prompt_tokens, c->vocab_size, c->bos_id, &state);
    fill_tokens(dprompt, decode_prompt, c->vocab_size, c->bos_id, &state);
    fill_tokens(gen, gen_tokens, c->vocab_size, -1, &state);

    /* untimed warm-ups: page the weights in, start the thread pool, size OpenBLAS buffers */
    if (prefill_once(session, prefill, prompt_tokens, logits, &err) < 0 ||
        decode_once(session, dprompt, decode_prompt, gen, gen_tokens < 8 ? gen_tokens : 8, logits,
                    &err) < 0)
        goto done;
    for (int r = 0; r < repetitions; r++)
        if ((pp[r] = prefill_once(session, prefill, prompt_tokens, logits, &err)) < 0) goto done;
    for (int r = 0; r < repetitions; r++)
        if ((tg[r] = decode_once(session, dprompt, decode_prompt, gen, gen_tokens, logits, &err)) <
            0)
            goto done;

    size_t params = summary.linear_params + summary.other_params;
    printf("{\n  \"model\": \"%s\",\n  \"backend\": \"%s\",\n  \"threads\": %d,\n", model_path,
           backend->ops->name, lq_parallel_threads());
    printf("  \"is_lq\": %d,\n  \"linear_params\": %zu,\n  \"params\": %zu,\n", model->is_lq,
           summary.linear_params, params);
    printf("  \"linear_bits_per_param\": %.4f,\n  \"linear_effective_bits\": %.4f,\n",
           summary.bits_per_param, summary.effective_bits);
    printf("  \"weight_bytes\": %zu,\n  \"bits_per_param\": %.4f,\n", summary.total_bytes,
           params ? 8.0 * (double)summary.total_bytes / (double)params : 0.0);
    printf("  \"load_seconds\": %.3f,\n  \"repetitions\": %d,\n  \"decode_prompt_tokens\": %d,\n",
           load_seconds, repetitions, decode_prompt);
    fprintf(stderr, "%s on %s, %d threads, %zu params, weights %.1f MiB in memory\n", model_path,
            backend->ops->name, lq_parallel_threads(), params,
            (double)summary.total_bytes / 1048576.0);
    print_phase("pp", prompt_tokens, pp, repetitions, 0);
    print_phase("tg", gen_tokens, tg, repetitions, 1);
    printf("}\n");
    status = 0;
done:
    if (status) fprintf(stderr, "bench_prefill_decode: %s\n", err.message);
    free(pp);
    free(tg);
    free(tokens);
    free(logits);
    lq_model_summary_free(&summary);
    lq_session_free(session);
    lq_runtime_free(runtime);
    if (backend) backend->ops->destroy(backend);
    lq_model_free(model);
    return status;
usage:
    fprintf(stderr, "usage: bench_prefill_decode MODEL [--prompt-tokens N] [--gen-tokens N]\n"
                    "           [--decode-prompt-tokens N] [--repetitions R] [--threads T]\n");
    return 2;
}
