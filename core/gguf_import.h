/* lqd import: a llama.cpp GGUF model as a HuggingFace LLaMA source directory.
 *   DIR/model.safetensors       every tensor in F32 under its HF name, holding exactly the
 *                               floats lqd computes from the GGUF (dequantized, Q/K rows back
 *                               in HF's rotate-half order); metadata format "pt" and
 *                               lqd.imported_from
 *   DIR/config.json             LlamaForCausalLM config (torch_dtype float32)
 *   DIR/tokenizer.json          the GGUF's tokenizer (core/tokenizer_export.h), when it has one
 *   DIR/tokenizer_config.json
 * The directory is built beside DIR and renamed into place, so DIR is never half-written. */
#ifndef LQ_GGUF_IMPORT_H
#define LQ_GGUF_IMPORT_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

struct lq_gguf_import_report {
    size_t tensors;        /* written to model.safetensors */
    uint64_t parameters;   /* their total element count */
    int tied;              /* 1: no lm_head.weight (tie_word_embeddings) */
    int has_tokenizer;     /* 0 when the GGUF holds none: no tokenizer files written */
    const char *tokenizer; /* "gpt2" or "llama" (static), when has_tokenizer */
    int vocab_size;        /* the tokenizer's pieces */
    size_t merges, added;  /* its merges and added tokens */
    int chat_template;     /* 1 when tokenizer_config.json got a chat_template */
};

/* Refuses early what lq_gguf_import would refuse at the end: DIR existing without force,
 * existing and not replaceable (only an empty directory or an earlier import is), or its
 * parent missing. LQ_EINVAL naming DIR. */
int lq_gguf_import_check_destination(const char *dir, int force, struct lq_error *err);

/* Writes the GGUF model at gguf_path as an HF directory at dir (see above); with force an
 * existing import at dir is replaced. LQ_EFORMAT when gguf_path is not a GGUF file; the
 * loader's and the tokenizer exporter's errors otherwise. On failure nothing is left behind
 * and an existing dir is untouched. report (optional) says what was written. */
int lq_gguf_import(const char *gguf_path, const char *dir, int force,
                   struct lq_gguf_import_report *report, struct lq_error *err);

#endif
