/* Perplexity of a model on text, with the protocol of ../shared/README.md's reference figure:
 * documents are the text's non-empty lines (LQ_SPLIT_LINES; blank lines separate paragraphs
 * and are skipped) or its paragraphs (LQ_SPLIT_PARAGRAPHS: split on blank lines), trimmed,
 * each tokenized with BOS and evaluated from position 0 (no context carried between
 * documents), at most `context` positions per document; every position after BOS predicts
 * the next token, and the count stops at max_tokens predicted tokens. LQ_SPLIT_STREAM (the
 * protocol of HF's perplexity guide, without stride): the whole text tokenized as one
 * sequence (BOS first when the tokenizer adds one), cut into consecutive windows of
 * `context` tokens, each evaluated from position 0 with its first token not predicted.
 * LQ_SPLIT_LLAMA_PERPLEXITY: llama.cpp's llama-perplexity (tools/perplexity, perplexity()
 * without --ppl-stride): the text, less one trailing newline, tokenized once (BOS first when
 * the tokenizer adds one; at least 2 * context tokens), cut into tokens / context chunks of
 * `context` tokens (at most max_chunks), each evaluated from an empty cache with its first
 * token replaced by BOS when the tokenizer adds one; positions context/2 .. context-2 predict
 * the next token, so each chunk scores context - context/2 - 1 tokens. */
#ifndef LQ_EVAL_H
#define LQ_EVAL_H

#include <stddef.h>

#include "core/forward.h"
#include "core/tokenizer.h"

enum lq_eval_split {
    LQ_SPLIT_LINES,
    LQ_SPLIT_PARAGRAPHS,
    LQ_SPLIT_STREAM,
    LQ_SPLIT_LLAMA_PERPLEXITY
};

struct lq_eval_options {
    enum lq_eval_split split;
    size_t max_tokens; /* predicted tokens at most (0 = the whole text) */
    int context;       /* positions per document (0 = the model's max_position_embeddings) */
    size_t max_chunks; /* LQ_SPLIT_LLAMA_PERPLEXITY: chunks at most (0 = all; --chunks) */
    /* a LoRA adapter prepared for the runtime (lq_adapter_weights_create), or NULL: the bare
     * model; borrowed for the call */
    const struct lq_adapter_weights *adapter;
};

struct lq_eval_result {
    double nll;         /* summed negative log-likelihood (nats) */
    double nll_squared; /* summed squares of the per-token NLL */
    size_t tokens;      /* predicted tokens */
    size_t documents;   /* documents (chunks, windows) that contributed */
    int context;        /* positions per document used */
    double ppl;         /* exp(nll / tokens) */
    /* llama-perplexity's "+/-": ppl * the standard error of the mean per-token NLL */
    double ppl_error;
    double seconds;
};

int lq_eval_perplexity(struct lq_runtime *runtime, const struct lq_tokenizer *tokenizer,
                       const char *text, size_t length, const struct lq_eval_options *options,
                       struct lq_eval_result *result, struct lq_error *err);

/* -log softmax(logits[0..vocab))[target] in double: the float max, then the double sum of
 * exp(logit - max) in vocabulary order. The scoring of every protocol above, and the CPU
 * backend's token_nll op (kernels/cpu/nll_cpu.c), so both report the same bits. */
double lq_token_nll(const float *logits, int vocab, int target);

#endif
