/* HF tokenizer files (tokenizer.json, tokenizer_config.json) for the tokenizer in a GGUF
 * file's metadata, written so that both HF `tokenizers` and lqd's tokenizer.json reader
 * encode text as lqd encodes it from the GGUF:
 *   "gpt2"  (byte-level BPE): vocab and merges as they are, the pre-tokenizer that
 *           tokenizer.ggml.pre names, a ByteLevel decoder, control and user-defined pieces
 *           as added tokens;
 *   "llama" (SentencePiece BPE): what transformers' LlamaConverter writes (byte fallback,
 *           <unk>, the Prepend/Replace normalizer, merges derived from the piece scores). */
#ifndef LQ_TOKENIZER_EXPORT_H
#define LQ_TOKENIZER_EXPORT_H

#include <stddef.h>

#include "core/error.h"

struct lq_gguf;

struct lq_tokenizer_export {
    char *tokenizer_json;        /* malloc'ed, NUL-terminated */
    char *tokenizer_config_json; /* malloc'ed, NUL-terminated */
    const char *model;           /* "gpt2" or "llama" (static) */
    int vocab_size;
    size_t merges;     /* entries in model.merges */
    size_t added;      /* entries in added_tokens */
    int chat_template; /* 1 when tokenizer.chat_template was carried over */
};

/* Builds both files from gguf's tokenizer.ggml.* and tokenizer.chat_template metadata
 * (gguf borrowed; label names it in messages). model_max_length > 0 is written to
 * tokenizer_config.json. LQ_ENOTFOUND when the file holds no tokenizer
 * (no tokenizer.ggml.model); LQ_EUNSUPPORTED for what tokenizer.json cannot express the
 * same way (SentencePiece's remove_extra_whitespaces, pieces holding NUL bytes); the
 * reader's errors for malformed metadata. Free with lq_tokenizer_export_free. */
int lq_tokenizer_export_gguf(const struct lq_gguf *gguf, const char *label, int model_max_length,
                             struct lq_tokenizer_export *out, struct lq_error *err);
void lq_tokenizer_export_free(struct lq_tokenizer_export *exported);

#endif
