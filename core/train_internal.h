/* The network the trainer (core/train.c) and the Fisher estimate (core/fisher.c) share
 * (core/train_net.c): a model's forward pass over a micro-batch of token rows that keeps what
 * the backward pass needs, and the backward pass from the masked cross-entropy down to every
 * linear layer's trainable pair (and, for the Fisher, to dense weights). Nothing outside
 * core/train*.c and core/fisher.c includes this.
 *
 * Activation memory, per token of a micro-batch: the residual stream at each layer's input
 * (n_layers + 1 rows of dim) and, per layer, q, k, v (after rope), the attention output, the
 * residual after attention, gate and up (before the activation): 2·dim + 2·q_dim + 2·kv_dim +
 * 2·hidden floats. With recompute, only the residual inputs persist and one layer's set is
 * recomputed during backward (one more forward pass). Normalized inputs, the SwiGLU output and
 * the attention probabilities are always recomputed; logits exist for one chunk of tokens at a
 * time. */
#ifndef LQ_TRAIN_INTERNAL_H
#define LQ_TRAIN_INTERNAL_H

#include "core/error.h"
#include "core/model.h"
#include "core/train.h"
#include "kernels/backend.h"

struct train_matrix {
    struct lq_linear frozen; /* a view of the model's layer: what stays fixed (prepared) */
    int prepared;
    int rank;         /* of the trainable pair; 0: none */
    float *L1, *L2;   /* [rows, rank], [rank, cols] device buffers (owned by the caller) */
    float *dL1, *dL2; /* their gradients, accumulated (+=) */
    float *dW;        /* the gradient of a dense frozen weight, accumulated, or NULL */
};

struct train_layer_saved {
    float *q, *k, *v, *attn, *x_mid, *gate, *up;
};

struct train_net {
    struct lq_backend *backend;
    const struct lq_model *model;
    const float *embed, *final_norm, *lm_head;
    const float **attn_norm, **ffn_norm;
    int uploaded;                  /* 1 once every weight above is uploaded */
    struct train_matrix *matrices; /* [n_layers · LQ_LINEARS_PER_LAYER], layer-major */
    int max_tokens, recompute;
    float **x;                       /* [n_layers + 1] residual stream at each layer's input */
    struct train_layer_saved *saved; /* n_layers of them, or 1 with recompute */
    float *h, *act, *dres, *dh, *dq, *dk, *dv, *dattn, *dgate, *dup, *logits;
    int logit_rows;    /* tokens per chunk of the output head */
    int *positions;    /* host, [max_tokens] */
    int rows, seq_len; /* the micro-batch of the last forward */
};

/* Allocates the network for micro-batches of at most max_tokens tokens. Each matrix's frozen
 * view starts as the model's layer itself, with no trainable pair: set views, pairs and dW,
 * then call train_net_prepare. */
int train_net_create(struct lq_backend *backend, const struct lq_model *model, int max_tokens,
                     int recompute, struct train_net **out, struct lq_error *err);
int train_net_prepare(struct train_net *net, struct lq_error *err);
void train_net_free(struct train_net *net);
struct train_matrix *train_net_matrix(struct train_net *net, int layer, enum lq_linear_kind kind);

/* The forward pass over rows × seq_len tokens (host ids, checked by the caller). */
int train_net_forward(struct train_net *net, const int *inputs, int rows, int seq_len,
                      struct lq_error *err);
/* After a forward: *loss_sum += the summed cross-entropy of the masked-in targets; with
 * backward, grad_scale · its gradient is added into every dL1, dL2 and dW. */
int train_net_loss(struct train_net *net, const int *targets, const unsigned char *mask,
                   float grad_scale, int backward, double *loss_sum, struct lq_error *err);

/* The trainer (core/train.c; checkpoints and export in core/train_checkpoint.c). */
struct lq_trainer {
    struct lq_backend *backend;
    struct lq_model *model;
    struct lq_train_options options;
    struct train_net *net;
    struct lq_trainer_matrix *matrices; /* [n_layers · LQ_LINEARS_PER_LAYER] */
    size_t count;                       /* floats in each flat array */
    float *params, *grads, *m, *v;      /* device */
    long step;
    struct lq_rng rng;
};

/* The backend has every op the network needs; else LQ_EUNSUPPORTED naming the first missing. */
int train_backend_check(const struct lq_backend *backend, struct lq_error *err);

#endif
