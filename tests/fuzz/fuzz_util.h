/* What the fuzz targets share: an assertion that crashes (so libFuzzer and the corpus replay
 * report it), and a tiny in-memory llama2.c tokenizer for targets that need one. */
#ifndef LQ_FUZZ_UTIL_H
#define LQ_FUZZ_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "core/tokenizer.h"

#define FUZZ_ASSERT(condition)                                                                     \
    do {                                                                                           \
        if (!(condition)) __builtin_trap();                                                        \
    } while (0)

/* <unk> <s> </s>, the 256 byte pieces <0xNN>, then `normal` with descending scores (so each
 * later piece is a weaker merge); max_length is the header's longest-piece field. Pieces must
 * be shorter than 16 bytes. */
static inline struct lq_tokenizer *fuzz_builtin_tokenizer(const char *const *normal, int n_normal,
                                                          int32_t max_length) {
    static uint8_t buffer[8192];
    size_t at = 4;
    memcpy(buffer, &max_length, 4);
    for (int i = 0; i < 3 + 256 + n_normal; i++) {
        char text[16];
        const char *piece = text;
        if (i < 3)
            piece = (const char *[]){"<unk>", "\n<s>\n", "\n</s>\n"}[i];
        else if (i < 259)
            snprintf(text, sizeof text, "<0x%02X>", i - 3);
        else
            piece = normal[i - 259];
        float score = i < 259 ? 0.0f : -(float)(i - 259);
        int32_t length = (int32_t)strlen(piece);
        memcpy(buffer + at, &score, 4);
        memcpy(buffer + at + 4, &length, 4);
        memcpy(buffer + at + 8, piece, (size_t)length);
        at += 8 + (size_t)length;
    }
    struct lq_tokenizer *tokenizer = NULL;
    FUZZ_ASSERT(lq_tokenizer_load_buffer(buffer, at, "builtin", &tokenizer, NULL) == LQ_OK);
    return tokenizer;
}

#endif
