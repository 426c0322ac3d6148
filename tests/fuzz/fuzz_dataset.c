/* libFuzzer target for the finetuning dataset reader (core/dataset.h), which reads files that
 * clients upload (POST /v1/files): the input is written to a temporary file and read with the
 * format detected and as each format in turn, by lq_dataset_validate (structure only) and by
 * lq_dataset_load with a small built-in tokenizer in each chat format. Each read either fails
 * with LQ_EFORMAT and a message naming the file, or succeeds; validation and loading agree on
 * which, and on the format and the number of documents; every document has tokens in range,
 * at least one target, none at position 0, and counts that add up. Broken invariants trap.
 *
 * Seeds (corpus/dataset/): valid_* are one file of each format (plain text with CRLF and a
 * BOM, {"text"}, {"prompt", "completion"}, chat with text parts and weights); bad_* one
 * refusal each (a line that is not an object, an unknown role, invalid UTF-8). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/dataset.h"

#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct lq_tokenizer *builtin_tokenizer(void) {
    static const char *const normal[] = {" ",          "e",      "t",    " the",
                                         "User",       ":",      "\n",   "<|im_start|>",
                                         "<|im_end|>", "[INST]", "text", "Lily"};
    return fuzz_builtin_tokenizer(normal, (int)(sizeof normal / sizeof normal[0]), 12);
}

static char input_path[64];

static void remove_input_file(void) {
    unlink(input_path);
}

/* The input as a file: one per process, rewritten for each input, removed at exit. */
static const char *input_file(const uint8_t *data, size_t size) {
    static FILE *file;
    if (!file) {
        snprintf(input_path, sizeof input_path, "/tmp/lq-fuzz-dataset-%ld", (long)getpid());
        FUZZ_ASSERT((file = fopen(input_path, "wb")) != NULL);
        atexit(remove_input_file);
    }
    FUZZ_ASSERT(fseek(file, 0, SEEK_SET) == 0 && ftruncate(fileno(file), 0) == 0);
    FUZZ_ASSERT(fwrite(data, 1, size, file) == size && fflush(file) == 0);
    return input_path;
}

static void check_dataset(const struct lq_dataset *d, const struct lq_tokenizer *tokenizer) {
    size_t tokens = 0, targets = 0, longest = 0;
    int vocab = lq_tokenizer_vocab_size(tokenizer);
    FUZZ_ASSERT(d->n_documents >= 1);
    for (size_t i = 0; i < d->n_documents; i++) {
        const struct lq_dataset_document *doc = &d->documents[i];
        size_t counted = 0;
        FUZZ_ASSERT(doc->n_tokens >= 1 && doc->mask[0] == 0 && doc->line >= 1);
        for (size_t k = 0; k < doc->n_tokens; k++) {
            FUZZ_ASSERT(doc->tokens[k] >= 0 && doc->tokens[k] < vocab);
            FUZZ_ASSERT(doc->mask[k] <= 1);
            counted += doc->mask[k];
        }
        FUZZ_ASSERT(counted == doc->n_targets && counted >= 1);
        FUZZ_ASSERT(i == 0 || doc->line > d->documents[i - 1].line);
        tokens += doc->n_tokens, targets += doc->n_targets;
        if (doc->n_tokens > longest) longest = doc->n_tokens;
    }
    FUZZ_ASSERT(tokens == d->n_tokens && targets == d->n_targets && longest == d->max_tokens);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static struct lq_tokenizer *tokenizer;
    if (!tokenizer) tokenizer = builtin_tokenizer();
    const char *path = input_file(data, size);
    static const char label[] = "fuzz";
    for (int f = LQ_DATASET_AUTO; f <= LQ_DATASET_CHAT; f++) {
        struct lq_dataset_summary summary = {0};
        struct lq_error err = {0};
        int valid = lq_dataset_validate(path, label, (enum lq_dataset_format)f, &summary, &err);
        FUZZ_ASSERT(valid == 0 || (valid == LQ_EFORMAT && strncmp(err.message, label, 4) == 0));
        for (int chat = LQ_CHAT_PLAIN; chat <= LQ_CHAT_LLAMA3; chat++) {
            struct lq_dataset_options options;
            lq_dataset_options_default(&options);
            options.format = (enum lq_dataset_format)f;
            options.label = label;
            const struct lq_chat_style style = {(enum lq_chat_format)chat, NULL};
            options.chat_style = &style;
            options.add_bos = chat != LQ_CHAT_CHATML; /* both ways */
            struct lq_dataset *train = NULL;
            struct lq_error load_err = {0};
            int loaded = lq_dataset_load(path, tokenizer, &options, &train, NULL, &load_err);
            /* Tokenization adds one refusal only: a document with no target (never, since
             * every format keeps a target: text, the completion, an answer or its marker). */
            FUZZ_ASSERT((loaded == 0) == (valid == 0));
            if (loaded == 0) {
                FUZZ_ASSERT(train->format == summary.format);
                FUZZ_ASSERT(train->n_documents == summary.n_documents);
                check_dataset(train, tokenizer);
            } else {
                FUZZ_ASSERT(train == NULL && strcmp(load_err.message, err.message) == 0);
            }
            lq_dataset_free(train);
            if (f != LQ_DATASET_CHAT && f != LQ_DATASET_AUTO) break; /* chat format unused */
        }
    }
    return 0;
}
