/* A LLaMA-family model in memory: its hyperparameters and weights, loaded from a HuggingFace
 * checkpoint directory, a llama2.c .bin, or an LQ model directory written by lqd compress.
 * Weights are held in the HuggingFace layout (RoPE rotate-half convention, W[out, in]). */
#ifndef LQ_MODEL_H
#define LQ_MODEL_H

#include <stddef.h>

#include "core/error.h"
#include "core/nf.h"

struct lq_model_config {
    int dim;        /* hidden_size */
    int n_layers;   /* num_hidden_layers */
    int n_heads;    /* num_attention_heads */
    int n_kv_heads; /* num_key_value_heads */
    int head_dim;   /* head_dim, else dim / n_heads */
    int hidden_dim; /* intermediate_size */
    int vocab_size;
    int max_seq_len;  /* max_position_embeddings */
    float rope_theta; /* rope_theta (or rope_parameters.rope_theta) */
    float norm_eps;   /* rms_norm_eps */
    int tie_embeddings;
    int bos_id, eos_id; /* -1 when not given */
};

/* Parses a HuggingFace LLaMA config.json text (LlamaForCausalLM / model_type "llama" or a
 * compatible architecture); label names the file in messages. Unsupported architectures and
 * missing or inconsistent fields are errors. */
int lq_model_config_parse(const char *json, size_t length, const char *label,
                          struct lq_model_config *out, struct lq_error *err);
/* Reads and parses DIR/config.json. */
int lq_model_config_load(const char *dir, struct lq_model_config *out, struct lq_error *err);
/* Writes a HuggingFace-compatible config.json for config to path (atomically). */
int lq_model_config_write(const struct lq_model_config *config, const char *path,
                          struct lq_error *err);

/* The seven linear matrices of a layer, in this order everywhere (error tables, files). */
enum lq_linear_kind {
    LQ_Q_PROJ,
    LQ_K_PROJ,
    LQ_V_PROJ,
    LQ_O_PROJ,
    LQ_GATE_PROJ,
    LQ_UP_PROJ,
    LQ_DOWN_PROJ,
    LQ_LINEARS_PER_LAYER
};
/* "self_attn.q_proj", ..., "mlp.down_proj". */
const char *lq_linear_kind_name(enum lq_linear_kind kind);
/* Short name for tables and plots: "q", "k", "v", "o", "gate", "up", "down". */
const char *lq_linear_kind_short(enum lq_linear_kind kind);

/* y = W x with W[rows = out, cols = in]: dense, or LQ (W ≈ Q + L1·L2 with L1 = lora_B
 * [rows, rank], L2 = lora_A [rank, cols]). */
struct lq_linear {
    int rows, cols;
    float *dense; /* rows x cols, row-major, when not LQ (owned) */
    int is_lq;
    struct lq_nf_matrix q; /* when LQ (owned) */
    int rank;              /* 0: no low-rank part */
    float *lora_A;         /* rank x cols (owned) */
    float *lora_B;         /* rows x rank (owned) */
    void *backend_data;    /* what a backend prepared for this matrix (owned by the backend) */
};

struct lq_layer {
    float *attn_norm; /* input_layernorm [dim] */
    float *ffn_norm;  /* post_attention_layernorm [dim] */
    struct lq_linear linear[LQ_LINEARS_PER_LAYER];
};

struct lq_model {
    struct lq_model_config config;
    float *embed;      /* vocab x dim */
    float *final_norm; /* dim */
    float *lm_head;    /* vocab x dim; equals embed when tied (not separately owned then) */
    struct lq_layer *layers;
    char *path; /* where it was loaded from */
    int is_lq;  /* 1 when loaded from an LQ model directory */
};

/* Loads a model: a directory with config.json + model.safetensors (or shards listed in
 * model.safetensors.index.json; F32/F16/BF16 tensors), an LQ model directory (lqd compress),
 * a llama.cpp GGUF file (architecture llama, recognised by its magic; tensors dequantized to
 * float) or a llama2.c .bin checkpoint (both converted to the HF RoPE layout). Shapes are
 * checked against the config; errors name the file and tensor. Free with lq_model_free. */
int lq_model_load(const char *path, struct lq_model **out, struct lq_error *err);
void lq_model_free(struct lq_model *model);

/* Reads a source model's linear matrices one at a time, for a process that needs only some of
 * them (an lqd compress rank): a HuggingFace directory's tensors are read on demand from its
 * safetensors files (memory-mapped); llama2.c and GGUF files are loaded whole on open. */
struct lq_model_reader;
int lq_model_reader_open(const char *path, struct lq_model_reader **out, struct lq_error *err);
const struct lq_model_config *lq_model_reader_config(const struct lq_model_reader *reader);
/* The dense floats of linear `kind` of `layer`, exactly as lq_model_load gives them
 * (malloc'ed rows x cols, the caller frees *out). LQ_EINVAL for an LQ-compressed matrix. */
int lq_model_reader_linear(struct lq_model_reader *reader, int layer, enum lq_linear_kind kind,
                           float **out, int *rows, int *cols, struct lq_error *err);
void lq_model_reader_close(struct lq_model_reader *reader);
/* Frees a linear layer's weights (not backend_data). */
void lq_linear_free(struct lq_linear *linear);

/* The HF tensor name of a layer's linear matrix: "model.layers.3.mlp.up_proj.weight". */
void lq_model_linear_name(int layer, enum lq_linear_kind kind, char *buffer, size_t size);

/* Total parameters of the linear layers (what the bit budget averages over). */
size_t lq_model_linear_params(const struct lq_model_config *config);

#endif
