/* LoRA finetuning of a LLaMA model on a backend (issue #5): the trainer runs the forward pass
 * over a batch of token rows keeping what the backward pass needs, back-propagates the masked
 * token cross-entropy to every linear layer's low-rank pair (everything else frozen, the
 * quantized Q kept packed), accumulates over micro-batches, clips the global gradient norm and
 * takes an AdamW step at a scheduled learning rate. Checkpoints (factors, AdamW moments, step,
 * RNG) are safetensors files written atomically.
 *
 * Two starting points (enum lq_lora_init):
 *  - LQ_LORA_INIT_LQ trains the model's own L1, L2 (LQ-LoRA, paper §3: W ≈ Q + L1·L2 with Q
 *    frozen); every linear must be an LQ matrix of rank > 0;
 *  - LQ_LORA_INIT_ZERO adds a fresh rank-r pair on top of whatever the model has (QLoRA: Q, or
 *    Q + its own frozen L1·L2, or a dense weight): L1 = 0 and L2 ~ U(−1/√cols, 1/√cols), PEFT's
 *    kaiming_uniform(a = √5) of lora_A, so training starts from the model's own function.
 * The pair enters as W + L1·L2 with no alpha/r scale (PEFT's default alpha = r). */
#ifndef LQ_TRAIN_H
#define LQ_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/model.h"
#include "core/rng.h"
#include "kernels/backend.h"

enum lq_lora_init {
    LQ_LORA_INIT_LQ,   /* train the LQ decomposition's own L1, L2 */
    LQ_LORA_INIT_ZERO, /* a new pair: L1 = 0, L2 kaiming-uniform (QLoRA-style) */
};
const char *lq_lora_init_name(enum lq_lora_init init); /* "lq", "zero" */
int lq_lora_init_parse(const char *text, enum lq_lora_init *out, struct lq_error *err);

/* After the warmup, the learning rate decays from its peak to min_lr_ratio · peak at
 * total_steps along: */
enum lq_lr_schedule {
    LQ_LR_COSINE,   /* half a cosine */
    LQ_LR_LINEAR,   /* a straight line */
    LQ_LR_CONSTANT, /* nothing: the peak throughout */
};
const char *lq_lr_schedule_name(enum lq_lr_schedule schedule); /* "cosine", "linear", "constant" */
int lq_lr_schedule_parse(const char *text, enum lq_lr_schedule *out, struct lq_error *err);

struct lq_train_options {
    enum lq_lora_init init;
    int rank;             /* LQ_LORA_INIT_ZERO: rank of the new pair (>= 1) */
    uint64_t seed;        /* the new pair's L2, and the trainer's RNG (lq_trainer_rng) */
    int seq_len;          /* the longest row of a batch, in tokens (<= the model's max_seq_len) */
    int micro_batch;      /* rows per forward/backward pass: activations are kept for this many */
    int recompute;        /* 1: keep only each layer's input; recompute the rest during backward */
    double learning_rate; /* the peak */
    double beta1, beta2, eps, weight_decay; /* AdamW (decoupled weight decay) */
    double max_grad_norm; /* clip the global L2 norm of the gradient to this; 0: never */
    enum lq_lr_schedule schedule;
    int warmup_steps;    /* linear warmup: step s (from 0) runs at peak·(s + 1)/warmup_steps */
    int total_steps;     /* where the decay ends (0, or <= warmup_steps: no decay) */
    double min_lr_ratio; /* the rate at and after total_steps, as a fraction of the peak */
};

/* LQ_LORA_INIT_LQ, rank 8, seed 0, rows of 256 tokens, micro-batches of 4 rows, no
 * recomputation, learning rate 2e-4, β 0.9/0.999, eps 1e-8, no weight decay, clipping at
 * 1.0, cosine decay to 0 (as HuggingFace's get_cosine_schedule_with_warmup), no warmup, no
 * total (so constant until total_steps is set). */
void lq_train_options_default(struct lq_train_options *options);
int lq_train_options_validate(const struct lq_train_options *options, struct lq_error *err);

/* The learning rate of the update made after `step` updates (step 0: the first). */
double lq_train_learning_rate(const struct lq_train_options *options, long step);

/* A batch: rows of seq_len positions (row-major [rows, seq_len] arrays, host memory). Position
 * i of a row sees inputs[0..i] of that row and is trained to predict targets[i]; mask[i]
 * nonzero puts that prediction in the loss (NULL: every one). The loss of a batch is the mean
 * cross-entropy over its masked-in predictions. Each row starts at position 0. */
struct lq_train_batch {
    int rows, seq_len;
    const int *inputs;
    const int *targets;
    const unsigned char *mask;
};

struct lq_train_stats {
    long step;            /* updates made, this one included */
    double loss;          /* mean cross-entropy over the batch's masked-in targets */
    long tokens;          /* masked-in targets (the loss's denominator) */
    double grad_norm;     /* global L2 norm of the gradient, before clipping */
    double clip_scale;    /* what the gradient was multiplied by (1: not clipped) */
    double learning_rate; /* of this update */
};

/* A trainer is used from one thread at a time (a job's worker); it runs its ops on the backend
 * and lqd's thread pool like inference does. */
struct lq_trainer;

/* A trainer for model on backend (both borrowed: they must outlive it; the model is only
 * read). The frozen part of every linear is prepared on the backend again for the trainer's
 * views (nothing is copied on the CPU). LQ_EUNSUPPORTED when the backend has no training ops;
 * LQ_EINVAL for bad options, or LQ_LORA_INIT_LQ on a matrix with no low-rank part (named).
 * Free with lq_trainer_free. */
int lq_trainer_create(struct lq_backend *backend, struct lq_model *model,
                      const struct lq_train_options *options, struct lq_trainer **out,
                      struct lq_error *err);
void lq_trainer_free(struct lq_trainer *trainer);
const struct lq_train_options *lq_trainer_options(const struct lq_trainer *trainer);

/* One optimizer step on batch: forward and backward over micro-batches of
 * options.micro_batch rows with the gradients accumulated (the same gradient as one pass over
 * all rows, up to rounding), clipping, then AdamW at lq_train_learning_rate(options, step).
 * LQ_EINVAL for a batch with no masked-in target, a row longer than options.seq_len or a token
 * outside the vocabulary; LQ_ENUMERIC (and no update) when the loss or gradient is not finite.
 * stats may be NULL. */
int lq_trainer_step(struct lq_trainer *trainer, const struct lq_train_batch *batch,
                    struct lq_train_stats *stats, struct lq_error *err);

/* The gradient of batch's mean masked cross-entropy, left in the trainer's gradient array
 * (lq_trainer_get_gradients) in place of what it held; no update. *loss (mean) and *tokens
 * may be NULL. lq_trainer_step is this, then the update. */
int lq_trainer_gradient(struct lq_trainer *trainer, const struct lq_train_batch *batch,
                        double *loss, long *tokens, struct lq_error *err);

/* Forward only: *loss_sum += the summed cross-entropy of batch's masked-in targets, *tokens +=
 * their count (so a caller can total a validation set). */
int lq_trainer_evaluate(struct lq_trainer *trainer, const struct lq_train_batch *batch,
                        double *loss_sum, long *tokens, struct lq_error *err);

/* ---- the trained values ----
 * All pairs live in one flat array: per layer, per matrix in enum lq_linear_kind order, L1
 * [rows, rank] then L2 [rank, cols], row-major. */
struct lq_trainer_matrix {
    int rows, cols, rank;
    size_t L1_offset, L2_offset; /* in floats, into the flat array */
};
size_t lq_trainer_parameter_count(const struct lq_trainer *trainer);
int lq_trainer_matrix_info(const struct lq_trainer *trainer, int layer, enum lq_linear_kind kind,
                           struct lq_trainer_matrix *out);
/* Copies one matrix's L1 [rows, rank] and L2 [rank, cols] to host arrays (either may be NULL). */
int lq_trainer_get_lora(const struct lq_trainer *trainer, int layer, enum lq_linear_kind kind,
                        float *L1, float *L2, struct lq_error *err);
/* The whole flat array of parameters or gradients, to or from the host. */
int lq_trainer_get_parameters(const struct lq_trainer *trainer, float *host, struct lq_error *err);
int lq_trainer_set_parameters(struct lq_trainer *trainer, const float *host, struct lq_error *err);
int lq_trainer_get_gradients(const struct lq_trainer *trainer, float *host, struct lq_error *err);

/* Updates made so far. */
long lq_trainer_step_count(const struct lq_trainer *trainer);
/* The trainer's generator, seeded from options.seed, for the caller's data order (shuffling);
 * checkpoints save and restore it. */
struct lq_rng *lq_trainer_rng(struct lq_trainer *trainer);

/* Writes the trained values into target, a model of the same shapes that no runtime has
 * prepared yet (not the trainer's own model: load another copy). LQ_LORA_INIT_LQ: target's
 * lora_B, lora_A become L1, L2 (its Q is assumed to be the trainer model's). LQ_LORA_INIT_ZERO:
 * a dense matrix becomes W + L1·L2; an LQ matrix gets the pairs side by side, lora_B = [its
 * L1 | L1], lora_A = [its L2 ; L2] (rank + r, exactly its function). */
int lq_trainer_apply_to_model(const struct lq_trainer *trainer, struct lq_model *target,
                              struct lq_error *err);

/* ---- checkpoints (core/train_checkpoint.c) ----
 * A safetensors file, written atomically: per matrix P ("model.layers.3.mlp.up_proj")
 * P.lora_A = L2, P.lora_B = L1 (PEFT orientation) and their AdamW moments P.lora_A.exp_avg,
 * P.lora_A.exp_avg_sq, ...; metadata lqd.format, lqd.step, lqd.rng, lqd.init, lqd.rank and the
 * optimizer settings (informational). */
int lq_trainer_save(const struct lq_trainer *trainer, const char *path, struct lq_error *err);
/* Restores a checkpoint saved by a trainer of the same model shapes and init: the pairs, the
 * moments, the step count and the RNG. Training goes on exactly as if never interrupted
 * (given the same options and batches). Mismatches are LQ_EFORMAT naming the tensor. */
int lq_trainer_load(struct lq_trainer *trainer, const char *path, struct lq_error *err);

/* ---- sequence packing (core/train_pack.c) ----
 * Documents are concatenated into one stream, each as [BOS] tokens [EOS] (either separator
 * left out when its id is < 0), and the stream is cut into rows of seq_len predictions:
 * row r's inputs are stream[r·seq_len + i] and its targets stream[r·seq_len + i + 1], so no
 * token is lost at a cut and no position is padding except at the end of the last row (pad
 * inputs/targets with mask 0). A document may run on into the next row, whose first
 * positions then see only its tail.
 *
 * Attention within a row is causal over the whole row: a position sees the end of the
 * previous document through the separator, as GPT-style pretraining and most finetuning
 * packers allow (the separators tell the model where a document starts); positions count
 * from 0 at each row start. Masks: a document token's own mask says whether predicting it
 * counts; the EOS after a document takes its last token's mask (so a response learns to
 * end); a BOS is never a target in the loss. */
struct lq_train_document {
    const int *tokens;         /* without BOS/EOS */
    const unsigned char *mask; /* per token: 1 = predicting this token is in the loss; NULL: all */
    size_t length;
};

struct lq_train_pack_options {
    int seq_len;
    int bos_id, eos_id; /* separators (< 0: none) */
    int pad_id;         /* fills the end of the last row (mask 0) */
};

struct lq_train_packed {
    int rows, seq_len;
    int *inputs, *targets; /* [rows, seq_len] */
    unsigned char *mask;   /* [rows, seq_len] */
    size_t tokens_in_loss; /* nonzero mask entries */
};

/* Packs documents into out (free with lq_train_packed_free). Empty documents are skipped.
 * LQ_EINVAL for seq_len < 1 or a negative token id. */
int lq_train_pack(const struct lq_train_document *documents, size_t count,
                  const struct lq_train_pack_options *options, struct lq_train_packed *out,
                  struct lq_error *err);
void lq_train_packed_free(struct lq_train_packed *packed);
/* A batch view of rows [first, first + rows) of packed (borrowed). */
struct lq_train_batch lq_train_packed_batch(const struct lq_train_packed *packed, int first,
                                            int rows);

#endif
