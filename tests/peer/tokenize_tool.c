/* A test helper for tests/peer/test_tokenizer_peer.py until lqd has a tokenize command: loads
 * a tokenizer and encodes (or decodes) stdin line by line.
 *
 *   tokenize_tool [--bos] [--hex] [--decode] [--time] TOKENIZER < lines
 *   tokenize_tool --info TOKENIZER
 *   tokenize_tool --chat FILE.json TOKENIZER
 *
 * Encoding prints each line's ids separated by spaces. --hex reads each line as the hex of
 * its bytes (for text with newlines or bad UTF-8); with --decode, lines are ids and the text
 * is printed (as hex with --hex). Decoding also checks that the streaming pieces
 * (lq_tokenizer_decode_piece) concatenate to the whole, and exits 1 if not. --time prints the
 * seconds spent in lq_tokenizer_encode/decode to stderr. --info prints vocab size, BOS, EOS,
 * <unk>. --chat reads {"messages": [{"role", "content"}...], "chat_template"?} and prints the ids
 * of the conversation as the daemon renders it for generation (lq_chat_render), in the style of
 * the file's "chat_template", else the tokenizer's GGUF tokenizer.chat_template, else its
 * directory's tokenizer_config.json; then the style's format and default system message. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "core/chat_template.h"
#include "core/file_util.h"
#include "core/finetune.h"
#include "core/gguf.h"
#include "core/tokenizer.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes hex in place; returns the byte count or -1. */
static long unhex(char *line, size_t length) {
    if (length % 2) return -1;
    for (size_t i = 0; i < length; i += 2) {
        int high = hex_digit(line[i]), low = hex_digit(line[i + 1]);
        if (high < 0 || low < 0) return -1;
        line[i / 2] = (char)(high * 16 + low);
    }
    return (long)(length / 2);
}

static void print_text(const char *text, size_t length, bool hex) {
    if (hex) {
        for (size_t i = 0; i < length; i++) printf("%02x", (unsigned char)text[i]);
    } else {
        fwrite(text, 1, length, stdout);
    }
    putchar('\n');
}

/* Parses space-separated ids; returns the count or -1. */
static long parse_ids(const char *line, int **ids) {
    size_t count = 0, capacity = 16;
    int *list = malloc(capacity * sizeof *list);
    const char *p = line;
    while (list) {
        while (*p == ' ') p++;
        if (!*p) break;
        char *end;
        long value = strtol(p, &end, 10);
        if (end == p) {
            free(list);
            return -1;
        }
        if (count == capacity) {
            int *bigger = realloc(list, (capacity *= 2) * sizeof *list);
            if (!bigger) free(list);
            list = bigger;
            if (!list) break;
        }
        list[count++] = (int)value;
        p = end;
    }
    *ids = list;
    return list ? (long)count : -1;
}

static int decode_line(const struct lq_tokenizer *tokenizer, const char *line, bool hex,
                       double *seconds) {
    int *ids = NULL;
    long count = parse_ids(line, &ids);
    if (count < 0) {
        fprintf(stderr, "tokenize_tool: bad ids: %s\n", line);
        return 1;
    }
    struct lq_error err = {0};
    char *text = NULL;
    size_t length = 0;
    double start = now();
    int rc = lq_tokenizer_decode_bytes(tokenizer, ids, (size_t)count, &text, &length, &err);
    *seconds += now() - start;
    if (rc != 0) {
        fprintf(stderr, "tokenize_tool: %s\n", err.message);
        free(ids);
        return 1;
    }
    /* The streaming pieces must add up to the whole. */
    size_t size = lq_tokenizer_max_piece_size(tokenizer), at = 0;
    char *piece = malloc(size);
    bool same = piece != NULL;
    for (long i = 0; same && i < count; i++) {
        int n = lq_tokenizer_decode_piece(tokenizer, i ? ids[i - 1] : -1, ids[i], piece, size);
        same = n >= 0 && at + (size_t)n <= length && memcmp(text + at, piece, (size_t)n) == 0;
        at += n > 0 ? (size_t)n : 0;
    }
    free(piece);
    free(ids);
    if (!same || at != length) {
        fprintf(stderr, "tokenize_tool: decode_piece pieces differ from decode for: %s\n", line);
        free(text);
        return 1;
    }
    print_text(text, length, hex);
    free(text);
    return 0;
}

/* The chat style of a conversation file's "chat_template", else of the tokenizer's model. */
static int chat_style(const cJSON *json, const char *path, struct lq_chat_style *style,
                      struct lq_error *err) {
    const cJSON *template = cJSON_GetObjectItemCaseSensitive(json, "chat_template");
    if (cJSON_IsString(template))
        return lq_chat_style_detect(template->valuestring, style)
                   ? lq_error_set(err, LQ_ENOMEM, "out of memory")
                   : LQ_OK;
    struct lq_gguf *gguf = NULL;
    size_t length = strlen(path);
    if (length > 5 && strcmp(path + length - 5, ".gguf") == 0) {
        int rc = lq_gguf_open(path, &gguf, err);
        if (rc) return rc;
        const char *text = NULL;
        struct lq_error ignored = {0};
        if (lq_gguf_get_string(gguf, "tokenizer.chat_template", &text, NULL, &ignored)) text = NULL;
        rc = lq_chat_style_detect(text, style);
        lq_gguf_close(gguf);
        return rc ? lq_error_set(err, LQ_ENOMEM, "out of memory") : LQ_OK;
    }
    char directory[4096];
    snprintf(directory, sizeof directory, "%s", path);
    char *slash = strrchr(directory, '/');
    if (slash)
        *slash = '\0';
    else
        snprintf(directory, sizeof directory, ".");
    return lq_finetune_chat_style(directory, style, err);
}

/* --chat: the rendered conversation's ids, then "format default" on a second line. */
static int chat(const struct lq_tokenizer *tokenizer, const char *file, const char *path) {
    struct lq_error err = {0};
    char *text = NULL;
    size_t length = 0;
    if (lq_file_read_all(file, (size_t)16 << 20, &text, &length, &err)) {
        fprintf(stderr, "tokenize_tool: %s\n", err.message);
        return 1;
    }
    cJSON *json = cJSON_ParseWithLength(text, length);
    free(text);
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(json, "messages");
    size_t n = (size_t)cJSON_GetArraySize(list);
    struct lq_chat_message *messages = calloc(n ? n : 1, sizeof *messages);
    struct lq_chat_style style = {LQ_CHAT_PLAIN, NULL};
    int status = 1;
    if (!json || !cJSON_IsArray(list) || !messages) {
        fprintf(stderr, "tokenize_tool: %s: expected {\"messages\": [...]}\n", file);
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        const cJSON *m = cJSON_GetArrayItem(list, (int)i);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (!cJSON_IsString(role) || !cJSON_IsString(content)) {
            fprintf(stderr, "tokenize_tool: %s: message %zu needs role and content\n", file, i);
            goto done;
        }
        messages[i].role = strcmp(role->valuestring, "system") == 0      ? LQ_ROLE_SYSTEM
                           : strcmp(role->valuestring, "assistant") == 0 ? LQ_ROLE_ASSISTANT
                                                                         : LQ_ROLE_USER;
        messages[i].content = content->valuestring;
    }
    if (chat_style(json, path, &style, &err)) {
        fprintf(stderr, "tokenize_tool: %s\n", err.message);
        goto done;
    }
    struct lq_chat_prompt prompt;
    if (lq_chat_render(&style, messages, n, &prompt)) {
        fprintf(stderr, "tokenize_tool: %s: cannot render (no messages?)\n", file);
        goto done;
    }
    int *ids = NULL;
    size_t count = 0;
    int rc = lq_chat_tokenize(tokenizer, &prompt, &ids, &count, &err);
    lq_chat_prompt_free(&prompt);
    if (rc) {
        fprintf(stderr, "tokenize_tool: %s\n", err.message);
        goto done;
    }
    for (size_t i = 0; i < count; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n%s %s\n", lq_chat_format_name(style.format),
           style.default_system ? style.default_system : "");
    free(ids);
    status = 0;
done:
    lq_chat_style_free(&style);
    free(messages);
    cJSON_Delete(json);
    return status;
}

int main(int argc, char **argv) {
    bool bos = false, hex = false, decode = false, timing = false, info = false;
    const char *path = NULL, *chat_file = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--chat") == 0 && i + 1 < argc)
            chat_file = argv[++i];
        else if (strcmp(argv[i], "--bos") == 0)
            bos = true;
        else if (strcmp(argv[i], "--hex") == 0)
            hex = true;
        else if (strcmp(argv[i], "--decode") == 0)
            decode = true;
        else if (strcmp(argv[i], "--time") == 0)
            timing = true;
        else if (strcmp(argv[i], "--info") == 0)
            info = true;
        else if (argv[i][0] != '-' && !path)
            path = argv[i];
        else
            path = NULL, i = argc;
    }
    if (!path) {
        fprintf(stderr,
                "usage: %s [--bos] [--hex] [--decode] [--time] [--info] [--chat FILE.json] "
                "TOKENIZER\n",
                argv[0]);
        return 2;
    }
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_error err = {0};
    if (lq_tokenizer_load(path, &tokenizer, &err) != 0) {
        fprintf(stderr, "tokenize_tool: %s\n", err.message);
        return 1;
    }
    if (chat_file) {
        int status = chat(tokenizer, chat_file, path);
        lq_tokenizer_free(tokenizer);
        return status;
    }
    if (info) {
        printf("%d %d %d %d\n", lq_tokenizer_vocab_size(tokenizer), lq_tokenizer_bos_id(tokenizer),
               lq_tokenizer_eos_id(tokenizer), lq_tokenizer_unk_id(tokenizer));
        lq_tokenizer_free(tokenizer);
        return 0;
    }
    char *line = NULL;
    size_t capacity = 0;
    ssize_t got;
    double seconds = 0;
    int status = 0;
    while (status == 0 && (got = getline(&line, &capacity, stdin)) >= 0) {
        size_t length = (size_t)got;
        if (length && line[length - 1] == '\n') line[--length] = '\0';
        if (decode) {
            status = decode_line(tokenizer, line, hex, &seconds);
            continue;
        }
        if (hex) {
            long n = unhex(line, length);
            if (n < 0) {
                fprintf(stderr, "tokenize_tool: bad hex line\n");
                status = 1;
                break;
            }
            length = (size_t)n;
        }
        int *ids = NULL;
        size_t count = 0;
        double start = now();
        int rc = lq_tokenizer_encode(tokenizer, line, length, bos, &ids, &count, &err);
        seconds += now() - start;
        if (rc != 0) {
            fprintf(stderr, "tokenize_tool: %s\n", err.message);
            status = 1;
            break;
        }
        for (size_t i = 0; i < count; i++) printf(i ? " %d" : "%d", ids[i]);
        putchar('\n');
        free(ids);
    }
    free(line);
    if (timing) fprintf(stderr, "seconds %.6f\n", seconds);
    lq_tokenizer_free(tokenizer);
    return status;
}
