/* Training datasets for finetuning: a file read into documents, each an array of token ids
 * with a loss mask (mask[i] = 1: the loss of predicting tokens[i] from tokens[0..i) counts;
 * mask[0] is always 0).
 *
 * Formats (lq_dataset_detect picks one when none is given):
 *   plain              plain text; documents are separated by blank lines (lines of only
 *                      spaces, tabs or CR); the lines of a document are joined with "\n" (CRLF
 *                      read as LF); every token is a target
 *   text               JSON lines {"text": "..."}: every token is a target
 *   prompt-completion  JSON lines {"prompt": "...", "completion": "..."}: the text is prompt
 *                      then completion, joined as they are (OpenAI's legacy format: put the
 *                      separator you want in them); only the completion's tokens are targets
 *   chat               JSON lines {"messages": [{"role", "content"}, ...]} (OpenAI's chat
 *                      finetuning format): roles system, developer (as system), user, assistant;
 *                      content a string or a list of {"type": "text", "text"} parts; an
 *                      assistant message may carry "weight": 0 (not trained on) or 1. Rendered
 *                      with the model's chat template (lq_chat_render_training: the bytes before
 *                      each answer are those the server renders for it); the targets are the
 *                      trained answers and their end markers
 * In JSON lines, lines of only whitespace are skipped; every other line must hold one JSON
 * object (keys besides these are ignored). Text must be UTF-8.
 *
 * BOS and EOS: a plain, text or prompt-completion document is BOS + text + EOS (add_bos,
 * add_eos; left out when the tokenizer has none); BOS is never a target (nothing predicts the
 * first token), EOS is (the model learns to end). A chat document begins and ends as its
 * template renders it for training: BOS first; ChatML answers end with <|im_end|>, Llama-2
 * answers with " </s>", plain answers with "\n" and the last one with EOS, each a target.
 *
 * Within merged text, a target span covers the tokens from the first one that the text before
 * it, tokenized alone, does not produce (lq_chat_tokenize_masked): exactly what a server that
 * tokenizes the prompt alone needs the model to generate.
 *
 * Errors name the file and the line ("train.jsonl:17: expected a JSON object with \"text\"");
 * no line is skipped silently, and a file without documents is an error. */
#ifndef LQ_DATASET_H
#define LQ_DATASET_H

#include <stddef.h>

#include "core/chat_template.h"
#include "core/error.h"
#include "core/tokenizer.h"

enum lq_dataset_format {
    LQ_DATASET_AUTO,
    LQ_DATASET_PLAIN,
    LQ_DATASET_TEXT,
    LQ_DATASET_PROMPT_COMPLETION,
    LQ_DATASET_CHAT,
};

/* "auto", "plain", "text", "prompt-completion", "chat". */
const char *lq_dataset_format_name(enum lq_dataset_format format);
/* The format named so (as lq_dataset_format_name writes it); LQ_EINVAL for another name. */
int lq_dataset_format_parse(const char *name, enum lq_dataset_format *out);

/* Lines longer than this are refused (a JSON line is one document). */
#define LQ_DATASET_MAX_LINE ((size_t)64 << 20)

struct lq_dataset_document {
    int *tokens;
    unsigned char *mask; /* mask[i] = 1: tokens[i] is a loss target */
    size_t n_tokens;
    size_t n_targets;   /* tokens with mask 1 (>= 1) */
    unsigned long line; /* where the document starts in its file (1-based) */
};

struct lq_dataset {
    enum lq_dataset_format format;
    struct lq_dataset_document *documents; /* in file order */
    size_t n_documents;
    size_t n_tokens, n_targets; /* over every document */
    size_t max_tokens;          /* of the longest document */
};

struct lq_dataset_options {
    enum lq_dataset_format format; /* LQ_DATASET_AUTO: lq_dataset_detect */
    const char *label;             /* the file's name in messages and for detection; NULL: path */
    /* The model's (lq_chat_style_detect of its chat_template); borrowed; NULL: plain. */
    const struct lq_chat_style *chat_style;
    int add_bos, add_eos; /* plain, text and prompt-completion documents */
    /* Held-out documents: a fraction in [0, 1) of the file's, chosen by seed (the same seed
     * holds out the same documents; both parts keep file order), or a second file (same
     * format, then validation_fraction must be 0). */
    double validation_fraction;
    unsigned long long seed;
    const char *validation_path;
    const char *validation_label; /* NULL: validation_path */
};

/* format auto, chat style plain, add_bos and add_eos 1, no validation. */
void lq_dataset_options_default(struct lq_dataset_options *options);

/* Reads and tokenizes path. *train receives the training documents; *validation the held-out
 * ones (NULL when options ask for none; validation may be NULL then). Either part empty is an
 * error (LQ_EFORMAT) naming the file. The caller frees both with lq_dataset_free. */
int lq_dataset_load(const char *path, const struct lq_tokenizer *tokenizer,
                    const struct lq_dataset_options *options, struct lq_dataset **train,
                    struct lq_dataset **validation, struct lq_error *err);
void lq_dataset_free(struct lq_dataset *dataset);

/* The format of a file: by the extension of label (NULL: path) — .jsonl, .json and .ndjson
 * are JSON lines, .txt, .text and .md plain text — else by its first non-blank line (a JSON
 * object: JSON lines); the kind of JSON lines by the first record's keys ("messages": chat,
 * "prompt" or "completion": prompt-completion, "text": text). LQ_EFORMAT with the line when
 * the first record is none of these. */
int lq_dataset_detect(const char *path, const char *label, enum lq_dataset_format *format,
                      struct lq_error *err);

struct lq_dataset_summary {
    enum lq_dataset_format format; /* as given, or detected */
    size_t n_documents;
    unsigned long n_lines;
};

/* Checks path's structure as lq_dataset_load reads it, without a tokenizer, reading it line by
 * line (never whole). 0 with *summary filled (may be NULL), or LQ_EFORMAT naming the first bad
 * line, LQ_EIO when it cannot be read. */
int lq_dataset_validate(const char *path, const char *label, enum lq_dataset_format format,
                        struct lq_dataset_summary *summary, struct lq_error *err);

#endif
