/* The diagonal empirical Fisher (core/fisher.h): per sequence, one forward and backward pass
 * with every dense weight's gradient on, then F += g²/N on the backend. */
#include "core/fisher.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_table.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "core/train_internal.h"

void lq_fisher_options_default(struct lq_fisher_options *options) {
    memset(options, 0, sizeof *options);
}

void lq_fisher_free(struct lq_fisher *f) {
    if (!f) return;
    for (int i = 0; f->matrices && i < f->n_layers * LQ_LINEARS_PER_LAYER; i++)
        free(f->matrices[i]);
    free(f->matrices);
    memset(f, 0, sizeof *f);
}

const float *lq_fisher_matrix(const struct lq_fisher *f, int layer, enum lq_linear_kind kind) {
    if (layer < 0 || layer >= f->n_layers || (int)kind < 0 || kind >= LQ_LINEARS_PER_LAYER)
        return NULL;
    return f->matrices[layer * LQ_LINEARS_PER_LAYER + kind];
}

/* Device buffers of the computation: a gradient and an accumulator per matrix. */
struct fisher_buffers {
    struct lq_backend *backend;
    int count;
    float **gradient, **sum;
};

static void buffers_free(struct fisher_buffers *b) {
    for (int i = 0; i < b->count; i++) {
        if (b->gradient && b->gradient[i]) b->backend->ops->buffer_free(b->backend, b->gradient[i]);
        if (b->sum && b->sum[i]) b->backend->ops->buffer_free(b->backend, b->sum[i]);
    }
    free(b->gradient), free(b->sum);
}

static int check_inputs(const struct lq_model *model, const int *const *sequences,
                        const int *lengths, int n, struct lq_error *err) {
    const struct lq_model_config *c = &model->config;
    if (n < 1) return lq_error_set(err, LQ_EINVAL, "the Fisher estimate needs >= 1 sequence");
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++)
            if (model->layers[l].linear[k].is_lq || !model->layers[l].linear[k].dense) {
                char name[128];
                lq_model_linear_name(l, (enum lq_linear_kind)k, name, sizeof name);
                return lq_error_set(err, LQ_EINVAL,
                                    "%s is not a dense matrix: the Fisher "
                                    "estimate needs the full-precision model",
                                    name);
            }
    for (int i = 0; i < n; i++) {
        if (lengths[i] < 2)
            return lq_error_set(err, LQ_EINVAL, "sequence %d has %d tokens: >= 2 needed", i,
                                lengths[i]);
        for (int t = 0; t < lengths[i]; t++)
            if (sequences[i][t] < 0 || sequences[i][t] >= c->vocab_size)
                return lq_error_set(err, LQ_EINVAL,
                                    "sequence %d: token %d is %d, outside the "
                                    "vocabulary (%d)",
                                    i, t, sequences[i][t], c->vocab_size);
    }
    return LQ_OK;
}

int lq_fisher_compute(struct lq_backend *backend, const struct lq_model *model,
                      const int *const *sequences, const int *lengths, int n,
                      const struct lq_fisher_options *options, struct lq_fisher *out,
                      struct lq_error *err) {
    memset(out, 0, sizeof *out);
    const struct lq_model_config *c = &model->config;
    struct lq_fisher_options defaults;
    lq_fisher_options_default(&defaults);
    if (!options) options = &defaults;
    int rc = check_inputs(model, sequences, lengths, n, err);
    if (rc) return rc;
    int positions = options->max_seq_len > 0 ? options->max_seq_len : c->max_seq_len;
    if (positions > c->max_seq_len) positions = c->max_seq_len;
    int longest = 1;
    for (int i = 0; i < n; i++)
        if (lengths[i] - 1 > longest) longest = lengths[i] - 1;
    if (longest > positions) longest = positions;
    const int matrices = c->n_layers * LQ_LINEARS_PER_LAYER;
    const struct lq_backend_ops *ops = backend->ops;
    struct train_net *net = NULL;
    struct fisher_buffers b = {backend, matrices, calloc((size_t)matrices, sizeof(float *)),
                               calloc((size_t)matrices, sizeof(float *))};
    if (!b.gradient || !b.sum) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    if (!rc) rc = train_net_create(backend, model, longest, 0, &net, err);
    for (int i = 0; i < matrices && !rc; i++) {
        struct train_matrix *m = &net->matrices[i];
        size_t numel = (size_t)m->frozen.rows * m->frozen.cols;
        rc = ops->buffer_alloc(backend, numel * sizeof(float), (void **)&b.gradient[i], err);
        if (!rc) rc = ops->buffer_alloc(backend, numel * sizeof(float), (void **)&b.sum[i], err);
        if (!rc) rc = ops->zero(backend, b.sum[i], numel);
        m->dW = b.gradient[i];
    }
    if (!rc) rc = train_net_prepare(net, err);
    for (int s = 0; s < n && !rc; s++) {
        int T = lengths[s] - 1 < longest ? lengths[s] - 1 : longest;
        for (int i = 0; i < matrices && !rc; i++)
            rc = ops->zero(backend, b.gradient[i],
                           (size_t)net->matrices[i].frozen.rows * net->matrices[i].frozen.cols);
        double loss = 0.0;
        /* the gradient of the sequence's mean token loss, as the reference backpropagates */
        if (!rc) rc = train_net_forward(net, sequences[s], 1, T, err);
        if (!rc) rc = train_net_loss(net, sequences[s] + 1, NULL, 1.0f / T, 1, &loss, err);
        for (int i = 0; i < matrices && !rc; i++)
            rc = ops->accumulate_squares(
                backend, b.sum[i], b.gradient[i],
                (size_t)net->matrices[i].frozen.rows * net->matrices[i].frozen.cols, 1.0f / n);
        if (!rc && options->progress) rc = options->progress(options->context, s + 1, n);
    }
    if (!rc) {
        out->n_layers = c->n_layers, out->samples = n;
        out->matrices = calloc((size_t)matrices, sizeof *out->matrices);
        if (!out->matrices) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    for (int i = 0; i < matrices && !rc; i++) {
        size_t bytes =
            (size_t)net->matrices[i].frozen.rows * net->matrices[i].frozen.cols * sizeof(float);
        if (!(out->matrices[i] = malloc(bytes ? bytes : 1)))
            rc = lq_error_set(err, LQ_ENOMEM, "out of memory for the Fisher information");
        else if (ops->copy_to_host(backend, out->matrices[i], b.sum[i], bytes))
            rc = lq_error_set(err, LQ_EIO,
                              "copying the Fisher information from the device "
                              "failed");
    }
    if (rc) lq_fisher_free(out);
    train_net_free(net);
    buffers_free(&b);
    return rc;
}

int lq_fisher_save(const struct lq_fisher *f, const struct lq_model *model, const char *path,
                   struct lq_error *err) {
    if (f->n_layers != model->config.n_layers)
        return lq_error_set(err, LQ_EINVAL, "the Fisher information has %d layers, the model %d",
                            f->n_layers, model->config.n_layers);
    struct lq_safetensors_writer *w = NULL;
    int rc = lq_safetensors_writer_create(&w, err);
    for (int l = 0; l < f->n_layers && !rc; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++) {
            const struct lq_linear *linear = &model->layers[l].linear[k];
            char name[128];
            lq_model_linear_name(l, (enum lq_linear_kind)k, name, sizeof name);
            int64_t shape[2] = {linear->rows, linear->cols};
            rc = lq_safetensors_writer_add(w, name, LQ_DTYPE_F32, 2, shape,
                                           f->matrices[l * LQ_LINEARS_PER_LAYER + k], err);
        }
    char samples[32];
    snprintf(samples, sizeof samples, "%d", f->samples);
    if (!rc) rc = lq_safetensors_writer_set_metadata(w, "lqd.fisher_samples", samples, err);
    if (!rc && f->source[0])
        rc = lq_safetensors_writer_set_metadata(w, "lqd.fisher_source", f->source, err);
    if (!rc) rc = lq_safetensors_writer_write(w, path, err);
    lq_safetensors_writer_free(w);
    return rc;
}

int lq_fisher_load(const char *path, const struct lq_model *model, struct lq_fisher *out,
                   struct lq_error *err) {
    memset(out, 0, sizeof *out);
    const struct lq_model_config *c = &model->config;
    const int matrices = c->n_layers * LQ_LINEARS_PER_LAYER;
    struct lq_safetensors *file = NULL;
    int rc = lq_safetensors_open(path, &file, err);
    if (rc) return rc;
    out->n_layers = c->n_layers;
    if (!(out->matrices = calloc((size_t)matrices, sizeof *out->matrices)))
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    for (int i = 0; i < matrices && !rc; i++) {
        const struct lq_linear *linear =
            &model->layers[i / LQ_LINEARS_PER_LAYER].linear[i % LQ_LINEARS_PER_LAYER];
        char name[128];
        lq_model_linear_name(i / LQ_LINEARS_PER_LAYER,
                             (enum lq_linear_kind)(i % LQ_LINEARS_PER_LAYER), name, sizeof name);
        const struct lq_safetensors_tensor *t = NULL;
        rc = lq_safetensors_read_f32(file, name, &out->matrices[i], &t, err);
        if (rc == LQ_ENOTFOUND) {
            rc = lq_error_set(err, LQ_ENOTFOUND,
                              "no tensor '%s' (not the Fisher information of this model?)", name);
            break;
        }
        if (rc) break;
        if (t->ndim != 2 || t->shape[0] != linear->rows || t->shape[1] != linear->cols) {
            rc = lq_error_set(err, LQ_EFORMAT, "tensor '%s' is not %d x %d like the model's", name,
                              linear->rows, linear->cols);
            break;
        }
        for (size_t j = 0; j < t->numel; j++)
            if (!(out->matrices[i][j] >= 0.0f) || isinf(out->matrices[i][j])) {
                rc = lq_error_set(err, LQ_EFORMAT,
                                  "tensor '%s': value %zu is %g, not finite and >= 0", name, j,
                                  (double)out->matrices[i][j]);
                break;
            }
    }
    const char *samples = rc ? NULL : lq_safetensors_metadata(file, "lqd.fisher_samples");
    const char *source = rc ? NULL : lq_safetensors_metadata(file, "lqd.fisher_source");
    if (samples) out->samples = atoi(samples);
    if (source) snprintf(out->source, sizeof out->source, "%s", source);
    lq_safetensors_close(file);
    if (rc) {
        lq_error_prefix(err, "%s", path);
        lq_fisher_free(out);
    }
    return rc;
}

/* ---------- calibration sequences ---------- */

void lq_fisher_calibration_free(struct lq_fisher_calibration *cal) {
    for (int i = 0; cal->sequences && i < cal->count; i++) free(cal->sequences[i]);
    free(cal->sequences), free(cal->lengths);
    memset(cal, 0, sizeof *cal);
}

static int is_blank(char ch) {
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\f' || ch == '\v';
}

int lq_fisher_calibration_draw(const struct lq_tokenizer *tokenizer, const char *text,
                               size_t length, int count, int max_tokens, uint64_t seed,
                               struct lq_fisher_calibration *out, struct lq_error *err) {
    memset(out, 0, sizeof *out);
    if (count < 1 || max_tokens < 2)
        return lq_error_set(err, LQ_EINVAL, "%d sequences of %d tokens: need >= 1 of >= 2", count,
                            max_tokens);
    /* the documents: each non-empty line, trimmed (lq_eval_perplexity's LQ_SPLIT_LINES) */
    size_t capacity = 0, n = 0, *spans = NULL; /* begin, end pairs */
    for (size_t at = 0; at < length;) {
        size_t end = at;
        while (end < length && text[end] != '\n') end++;
        size_t begin = at, stop = end;
        while (begin < stop && is_blank(text[begin])) begin++;
        while (stop > begin && is_blank(text[stop - 1])) stop--;
        if (stop > begin) {
            if (n == capacity) {
                capacity = capacity ? capacity * 2 : 1024;
                size_t *grown = realloc(spans, capacity * 2 * sizeof *spans);
                if (!grown) {
                    free(spans);
                    return lq_error_set(err, LQ_ENOMEM, "out of memory");
                }
                spans = grown;
            }
            spans[2 * n] = begin, spans[2 * n + 1] = stop, n++;
        }
        at = end + 1;
    }
    out->documents = n;
    size_t *order = malloc((n ? n : 1) * sizeof *order);
    out->sequences = calloc((size_t)count, sizeof *out->sequences);
    out->lengths = calloc((size_t)count, sizeof *out->lengths);
    int rc = order && out->sequences && out->lengths
                 ? LQ_OK
                 : lq_error_set(err, LQ_ENOMEM, "out of memory");
    /* Fisher–Yates with lqd's seeded generator: the draw repeats on every machine */
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    for (size_t i = 0; i < n && !rc; i++) order[i] = i;
    for (size_t i = 0; i < n && out->count < count && !rc; i++) {
        size_t j = i + (size_t)(lq_rng_next(&rng) % (uint64_t)(n - i));
        size_t d = order[j];
        order[j] = order[i], order[i] = d;
        int *ids = NULL;
        size_t tokens = 0;
        rc = lq_tokenizer_encode(tokenizer, text + spans[2 * d], spans[2 * d + 1] - spans[2 * d], 1,
                                 &ids, &tokens, err);
        if (rc) break;
        if (tokens < 2) {
            free(ids);
            continue;
        }
        if (tokens > (size_t)max_tokens) tokens = (size_t)max_tokens;
        out->sequences[out->count] = ids;
        out->lengths[out->count++] = (int)tokens;
        out->tokens += tokens;
    }
    snprintf(out->source, sizeof out->source,
             "lines of text %016llx, %d sequences of at most %d tokens, seed %llu",
             (unsigned long long)lq_hash_bytes(text, length, 0), count, max_tokens,
             (unsigned long long)seed);
    if (!rc && out->count < count)
        rc = lq_error_set(err, LQ_EINVAL,
                          "%zu documents (non-empty lines), %d with a token to predict after BOS: "
                          "too few to draw %d sequences",
                          n, out->count, count);
    free(order), free(spans);
    if (rc) {
        size_t documents = out->documents;
        lq_fisher_calibration_free(out);
        out->documents = documents;
    }
    return rc;
}

int lq_fisher_estimate_text(const struct lq_model *model, const struct lq_tokenizer *tokenizer,
                            const char *text, size_t length,
                            const struct lq_fisher_text_options *options,
                            struct lq_fisher_calibration *calibration, struct lq_fisher *out,
                            struct lq_error *err) {
    struct lq_backend *backend = NULL;
    int rc = lq_fisher_calibration_draw(tokenizer, text, length, options->samples,
                                        options->max_seq_len, options->seed, calibration, err);
    if (rc) {
        lq_error_prefix(err, "%s", options->draw_label);
        return rc;
    }
    if (options->backend)
        backend = options->backend;
    else if ((rc = options->create_backend(&backend, err)))
        return rc;
    if (options->drawn && (rc = options->drawn(options->drawn_context, calibration))) {
        lq_error_set(err, rc, "stopped before the Fisher estimate");
    } else {
        struct lq_fisher_options compute;
        lq_fisher_options_default(&compute);
        compute.max_seq_len = options->max_seq_len;
        compute.progress = options->progress, compute.context = options->progress_context;
        rc = lq_fisher_compute(backend, model, (const int *const *)calibration->sequences,
                               calibration->lengths, calibration->count, &compute, out, err);
        if (!rc) memcpy(out->source, calibration->source, sizeof out->source);
    }
    if (backend != options->backend) backend->ops->destroy(backend);
    return rc;
}
