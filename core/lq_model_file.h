/* LQ model directories: what lqd compress writes and lq_model_load reads back.
 *   DIR/config.json        HuggingFace LLaMA config (lq_model_config_write)
 *   DIR/model.safetensors  embeddings, norms, head (when untied) as F32 under their HF names;
 *                          each linear matrix as the core/lq_store.h tensors under
 *                          "model.layers.N.<self_attn|mlp>.<kind>" (its HF name less ".weight"),
 *                          or as "<name>.weight" F32 when it is dense; file metadata "lqd.*"
 *   DIR/tokenizer.*        the source's tokenizer files, copied
 * The directory is built beside DIR and renamed into place, so DIR is never half-written. */
#ifndef LQ_MODEL_FILE_H
#define LQ_MODEL_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/model.h"

#define LQ_MODEL_FILE_FORMAT "lq-v1" /* metadata "lqd.format" */
#define LQ_TOKENIZER_MAX_FILES 6

/* Tokenizer files to copy: where each is read from and the name it gets in DIR; or a GGUF
 * file whose tokenizer metadata is written into DIR as tokenizer.json and
 * tokenizer_config.json (as lqd import writes them). */
struct lq_tokenizer_files {
    size_t count;
    char source[LQ_TOKENIZER_MAX_FILES][4096];
    char name[LQ_TOKENIZER_MAX_FILES][64];
    char gguf[4096]; /* "" when none */
};

/* The file lq_tokenizer_load should read: the GGUF, else tokenizer.json, tokenizer.model,
 * then tokenizer.bin; NULL when there is none. Points into files. */
const char *lq_tokenizer_files_primary(const struct lq_tokenizer_files *files);

/* Finds tokenizer files. path a file: that file (named tokenizer.json, tokenizer.model or
 * tokenizer.bin by its extension unless it already has a standard name). path a directory:
 * the standard files in it (tokenizer.json, tokenizer.model, tokenizer.bin,
 * tokenizer_config.json, special_tokens_map.json); a GGUF file with tokenizer metadata: that
 * file (out->gguf). With beside_model set, path is a model (directory, llama2.c .bin file, or
 * GGUF file, whose own tokenizer comes first) and the files are looked for in it or beside
 * it; finding none is then not an error (out->count = 0, out->gguf ""). An explicit path without
 * tokenizer files is LQ_ENOTFOUND. */
int lq_model_file_find_tokenizer(const char *path, int beside_model, struct lq_tokenizer_files *out,
                                 struct lq_error *err);

struct lq_model_file_options {
    const char *source;    /* "lqd.source", or NULL */
    double budget;         /* "lqd.bits" (requested average bits/param); <= 0: omitted */
    double achieved_bits;  /* "lqd.bits_per_param"; <= 0: omitted */
    int rank;              /* "lqd.rank"; < 0: omitted */
    size_t grid_size;      /* "lqd.grid": configurations searched; 0: omitted */
    int iters;             /* "lqd.iters"; 0: omitted */
    uint64_t seed;         /* "lqd.seed" (written with iters) */
    const char *weighting; /* "lqd.weighting", or NULL */
    const struct lq_tokenizer_files *tokenizer; /* copied into DIR; NULL: none */
    int force; /* replace an existing DIR, if it is an LQ model directory or empty */
};

/* Sets every field to "omitted" (rank -1, the rest 0/NULL). */
void lq_model_file_options_default(struct lq_model_file_options *options);

/* Refuses early what lq_model_file_write would refuse at the end: DIR existing without
 * force, or existing and not replaceable (not an LQ model directory, not empty), or its
 * parent directory missing. LQ_EINVAL with a message naming DIR. */
int lq_model_file_check_destination(const char *dir, int force, struct lq_error *err);

/* Writes model (LQ or dense linears; borrowed) as an LQ model directory at dir: built in
 * "dir.tmp-XXXXXX" beside it and renamed into place; with force an existing dir is renamed
 * aside first and deleted after. On any failure nothing is left behind and an existing dir
 * is untouched. */
int lq_model_file_write(const struct lq_model *model, const char *dir,
                        const struct lq_model_file_options *options, struct lq_error *err);

/* What a model costs, matrix by matrix, as lqd inspect shows it. */
struct lq_matrix_summary {
    char name[128]; /* "model.layers.3.mlp.up_proj.weight" */
    int layer;
    enum lq_linear_kind kind;
    int rows, cols, is_lq, rank;
    struct lq_nf_config config; /* when is_lq */
    double bits_per_param;      /* quantized part by Eq. 3; 32 for a dense fp32 matrix */
    double effective_bits;      /* with L1 L2 at their stored fp32 */
    double effective_bits_16;   /* with L1 L2 at 16 bits */
    size_t bytes;               /* packed Q (or dense fp32) + factors, in memory */
};

struct lq_model_summary {
    size_t n_matrices;                  /* n_layers x 7, layer-major */
    struct lq_matrix_summary *matrices; /* owned */
    size_t linear_params, other_params;
    double bits_per_param;    /* quantized part, averaged over linear parameters */
    double effective_bits;    /* L1 L2 included at fp32 */
    double effective_bits_16; /* L1 L2 included at 16 bits */
    size_t linear_bytes;      /* packed Q + factors of every linear */
    size_t other_bytes;       /* embeddings, norms, head (fp32) */
    size_t total_bytes;       /* what the weights need in memory */
};

/* Fills out from a loaded model; free with lq_model_summary_free. */
int lq_model_summary_compute(const struct lq_model *model, struct lq_model_summary *out,
                             struct lq_error *err);
void lq_model_summary_free(struct lq_model_summary *summary);

#endif
