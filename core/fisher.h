/* The diagonal empirical Fisher information of every linear matrix of a dense model (LQ-LoRA
 * paper §3.3): F = mean over N calibration sequences of (∂loss/∂W)², the loss being each
 * sequence's mean next-token cross-entropy (batch size 1, as the authors' reference). It feeds
 * lq_decompose's `fisher` option (core/lq.h). The backward pass is the trainer's
 * (core/train_internal.h) with the dense weights' gradients switched on. */
#ifndef LQ_FISHER_H
#define LQ_FISHER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/model.h"
#include "core/tokenizer.h"
#include "kernels/backend.h"

/* Called after each sequence on the calling thread; return 0 to go on, or a negative LQ_E*
 * code to stop (lq_fisher_compute then returns it). */
typedef int (*lq_fisher_progress_fn)(void *context, int done, int total);

struct lq_fisher_options {
    int max_seq_len; /* longer sequences are cut to this many positions (0: the model's) */
    lq_fisher_progress_fn progress;
    void *context;
};

void lq_fisher_options_default(struct lq_fisher_options *options);

#define LQ_FISHER_SOURCE_SIZE 256

struct lq_fisher {
    int n_layers;
    int samples;      /* sequences averaged */
    float **matrices; /* [n_layers · LQ_LINEARS_PER_LAYER]: rows × cols each, row-major, in
                         the model's matrix order (layer-major, enum lq_linear_kind order) */
    /* How the sequences were drawn (free text the caller sets; lq_fisher_compute leaves it
     * empty): saved as metadata lqd.fisher_source, and part of a weighted table's cache key. */
    char source[LQ_FISHER_SOURCE_SIZE];
};

/* F for every linear matrix of model (dense: LQ_EINVAL naming the first LQ matrix) on
 * backend, from n sequences of token ids (sequences[i] of lengths[i] >= 2 tokens; a sequence
 * predicts tokens 1..length−1 from what precedes them, so give it its BOS). Memory on the
 * backend: one gradient and one accumulator per linear weight (twice the linear weights),
 * plus the activations of one sequence. On success free out with lq_fisher_free. */
int lq_fisher_compute(struct lq_backend *backend, const struct lq_model *model,
                      const int *const *sequences, const int *lengths, int n,
                      const struct lq_fisher_options *options, struct lq_fisher *out,
                      struct lq_error *err);
void lq_fisher_free(struct lq_fisher *fisher);

/* F of one matrix (borrowed), or NULL out of range. */
const float *lq_fisher_matrix(const struct lq_fisher *fisher, int layer, enum lq_linear_kind kind);

/* Writes fisher to a safetensors file (atomically), each matrix under its weight's HF name
 * ("model.layers.0.self_attn.q_proj.weight", F32 [rows, cols]), metadata lqd.fisher_samples
 * and lqd.fisher_source: `lqd decompose --fisher FILE:NAME` reads it as is. model gives the
 * shapes. */
int lq_fisher_save(const struct lq_fisher *fisher, const struct lq_model *model, const char *path,
                   struct lq_error *err);

/* Reads a file lq_fisher_save wrote (or any safetensors file with those tensors, F32/F16/
 * BF16) for model: every linear matrix must be there with the model's shape and values
 * finite and >= 0. LQ_ENOTFOUND / LQ_EFORMAT name the file and the tensor. On success free
 * out with lq_fisher_free. */
int lq_fisher_load(const char *path, const struct lq_model *model, struct lq_fisher *out,
                   struct lq_error *err);

/* Calibration sequences for lq_fisher_compute, drawn from text with `lqd eval`'s protocol:
 * each non-empty line (trimmed) is a document, tokenized with BOS and cut to its first
 * max_tokens tokens; documents are taken in an order shuffled by seed (without replacement)
 * until `count` sequences of >= 2 tokens are drawn. The same text, count, max_tokens and seed
 * draw the same sequences. LQ_EINVAL, saying how many the text holds, when it has fewer. */
struct lq_fisher_calibration {
    int count;
    int **sequences; /* owned */
    int *lengths;
    size_t tokens;    /* over every sequence */
    size_t documents; /* non-empty lines of the text */
    /* What the draw depends on ("lines of text <hash>, N sequences of at most L tokens, seed
     * S"): copy it into lq_fisher.source, so that the same draw gives the same cache key. */
    char source[LQ_FISHER_SOURCE_SIZE];
};
int lq_fisher_calibration_draw(const struct lq_tokenizer *tokenizer, const char *text,
                               size_t length, int count, int max_tokens, uint64_t seed,
                               struct lq_fisher_calibration *out, struct lq_error *err);
void lq_fisher_calibration_free(struct lq_fisher_calibration *calibration);

/* The draw, backend and hooks of lq_fisher_estimate_text. */
struct lq_fisher_text_options {
    int samples;            /* sequences drawn (lq_fisher_calibration_draw's count) */
    int max_seq_len;        /* tokens per sequence at most, BOS included */
    uint64_t seed;          /* of the draw */
    const char *draw_label; /* prefixed to an error of the draw ("--fisher FILE") */
    /* The backend F is estimated on: `backend` (borrowed, e.g. the GPU that also
     * decomposes) when set, else one made by create_backend (lq_backend_cpu_create) and
     * destroyed after. */
    struct lq_backend *backend;
    int (*create_backend)(struct lq_backend **out, struct lq_error *err);
    /* Called with the draw once the backend is made, before the estimate (NULL: not called);
     * a nonzero return stops with that code and "stopped before the Fisher estimate". */
    int (*drawn)(void *context, const struct lq_fisher_calibration *calibration);
    void *drawn_context;
    lq_fisher_progress_fn progress; /* during the estimate, as lq_fisher_options' */
    void *progress_context;
};

/* F of model estimated from calibration text (length bytes), as `lqd compress --fisher` and
 * compress jobs make it: options->samples sequences drawn with tokenizer into *calibration
 * (the caller frees it with lq_fisher_calibration_free, on error too), F computed with them
 * on a backend of options->create_backend, and the draw recorded in out->source (the same
 * text and draw give the same error-table cache key). On error the caller frees out with
 * lq_fisher_free. */
int lq_fisher_estimate_text(const struct lq_model *model, const struct lq_tokenizer *tokenizer,
                            const char *text, size_t length,
                            const struct lq_fisher_text_options *options,
                            struct lq_fisher_calibration *calibration, struct lq_fisher *out,
                            struct lq_error *err);

#endif
