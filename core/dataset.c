#include "core/dataset.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/file_util.h"
#include "core/rng.h"

static const char *const format_names[] = {"auto", "plain", "text", "prompt-completion", "chat"};

const char *lq_dataset_format_name(enum lq_dataset_format format) {
    return (unsigned)format < sizeof format_names / sizeof format_names[0] ? format_names[format]
                                                                           : "?";
}

int lq_dataset_format_parse(const char *name, enum lq_dataset_format *out) {
    for (size_t i = 0; name && i < sizeof format_names / sizeof format_names[0]; i++)
        if (strcmp(name, format_names[i]) == 0) {
            *out = (enum lq_dataset_format)i;
            return LQ_OK;
        }
    return LQ_EINVAL;
}

void lq_dataset_options_default(struct lq_dataset_options *options) {
    memset(options, 0, sizeof *options);
    options->format = LQ_DATASET_AUTO;
    options->chat_style = NULL;
    options->add_bos = 1;
    options->add_eos = 1;
}

/* "label:line: message" in err. */
static int line_error(struct lq_error *err, const char *label, unsigned long line,
                      const char *format, ...) __attribute__((format(printf, 4, 5)));
static int line_error(struct lq_error *err, const char *label, unsigned long line,
                      const char *format, ...) {
    char message[LQ_ERROR_MESSAGE_SIZE];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    return lq_error_set(err, LQ_EFORMAT, "%s:%lu: %s", label, line, message);
}

/* ---------- lines ---------- */

/* Reads a file line by line through a fixed block, holding one line at a time (at most
 * LQ_DATASET_MAX_LINE bytes); NUL bytes are kept, so they can be reported. */
struct line_reader {
    FILE *file;
    const char *label;
    char block[1 << 16];
    size_t block_used, block_at;
    int at_end;
    char *line; /* NUL-terminated, without "\n" or "\r\n" */
    size_t length, capacity;
    unsigned long number;
};

/* 1 with the next line in r->line, 0 at the end of the file, or a negative LQ_E* code. */
static int next_line(struct line_reader *r, struct lq_error *err) {
    int any = 0;
    r->length = 0;
    for (;;) {
        if (r->block_at == r->block_used) {
            if (r->at_end) break;
            r->block_used = fread(r->block, 1, sizeof r->block, r->file);
            r->block_at = 0;
            if (r->block_used == 0) {
                if (ferror(r->file))
                    return lq_error_set(err, LQ_EIO, "%s: cannot read: %s", r->label,
                                        strerror(errno));
                r->at_end = 1;
                break;
            }
        }
        any = 1;
        const char *start = r->block + r->block_at;
        size_t available = r->block_used - r->block_at;
        const char *newline = memchr(start, '\n', available);
        size_t take = newline ? (size_t)(newline - start) : available;
        if (r->length + take > LQ_DATASET_MAX_LINE)
            return line_error(err, r->label, r->number + 1, "the line is longer than %zu bytes",
                              LQ_DATASET_MAX_LINE);
        if (r->length + take + 1 > r->capacity) {
            size_t capacity = r->capacity ? r->capacity : 4096;
            while (capacity < r->length + take + 1) capacity *= 2;
            char *grown = realloc(r->line, capacity);
            if (!grown) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", r->label);
            r->line = grown, r->capacity = capacity;
        }
        memcpy(r->line + r->length, start, take);
        r->length += take;
        r->block_at += take + (newline != NULL);
        if (newline) break;
    }
    if (!any) return 0;
    r->number++;
    if (r->length && r->line[r->length - 1] == '\r') r->length--;
    r->line[r->length] = '\0';
    /* A UTF-8 byte-order mark, as some editors write, is not text. */
    if (r->number == 1 && r->length >= 3 && memcmp(r->line, "\xef\xbb\xbf", 3) == 0) {
        memmove(r->line, r->line + 3, r->length - 2);
        r->length -= 3;
    }
    return 1;
}

/* Only spaces, tabs, CR, FF or VT (check_bytes has refused NUL bytes already). */
static int is_blank(const char *text, size_t length) {
    for (size_t i = 0; i < length; i++)
        if (text[i] == '\0' || !strchr(" \t\r\f\v", text[i])) return 0;
    return 1;
}

/* The offset of the first byte that is not part of valid UTF-8 (RFC 3629: no overlong forms,
 * no surrogates, nothing above U+10FFFF), or length. */
static size_t utf8_invalid_at(const unsigned char *s, size_t length) {
    size_t i = 0;
    while (i < length) {
        unsigned char c = s[i];
        size_t n;
        unsigned lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            if (c == 0xe0) lo = 0xa0;
            if (c == 0xed) hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            if (c == 0xf0) lo = 0x90;
            if (c == 0xf4) hi = 0x8f;
        } else {
            return i;
        }
        if (i + n >= length) return i; /* cut short */
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= n; k++)
            if ((s[i + k] & 0xc0) != 0x80) return i;
        i += n + 1;
    }
    return length;
}

/* Refuses a line holding a NUL byte or bytes that are not UTF-8. */
static int check_bytes(const struct line_reader *r, struct lq_error *err) {
    const char *nul = memchr(r->line, '\0', r->length);
    if (nul)
        return line_error(err, r->label, r->number,
                          "a NUL byte at column %zu (is this a binary file?)",
                          (size_t)(nul - r->line) + 1);
    size_t bad = utf8_invalid_at((const unsigned char *)r->line, r->length);
    if (bad < r->length)
        return line_error(err, r->label, r->number,
                          "not valid UTF-8 (byte 0x%02X at column %zu); save the file as UTF-8",
                          (unsigned char)r->line[bad], bad + 1);
    return LQ_OK;
}

/* ---------- records ---------- */

/* One document as read, before tokenization. Pointers are valid during the callback only. */
struct record {
    unsigned long line;
    const char *text; /* plain (NULL when the text is not kept), text */
    const char *prompt, *completion;
    struct lq_chat_message *messages;
    unsigned char *trained;
    size_t n_messages;
};

typedef int (*record_callback)(void *context, const struct record *record, struct lq_error *err);

struct reading {
    const char *label;
    enum lq_dataset_format format; /* LQ_DATASET_AUTO until known */
    int jsonl;                     /* JSON lines of a kind not known yet */
    int keep_text;                 /* plain: gather each document's text (else only count) */
    int stop_when_known;           /* lq_dataset_detect: stop once the format is known */
    record_callback on_record;     /* may be NULL */
    void *context;
    size_t n_documents;
    unsigned long n_lines;
};

static const char *expected_object(enum lq_dataset_format format) {
    switch (format) {
    case LQ_DATASET_TEXT:
        return "expected a JSON object with \"text\"";
    case LQ_DATASET_PROMPT_COMPLETION:
        return "expected a JSON object with \"prompt\" and \"completion\"";
    case LQ_DATASET_CHAT:
        return "expected a JSON object with \"messages\"";
    default:
        return "expected a JSON object with \"text\", \"prompt\" and \"completion\", or "
               "\"messages\"";
    }
}

static const cJSON *get(const cJSON *object, const char *key) {
    return cJSON_GetObjectItemCaseSensitive(object, key);
}

/* A message's content: a string or a list of {"type": "text", "text"} parts, joined. */
static char *message_content(const cJSON *content) {
    if (cJSON_IsString(content)) return strdup(content->valuestring);
    if (!cJSON_IsArray(content)) return NULL;
    size_t total = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, content) {
        const cJSON *type = get(part, "type"), *text = get(part, "text");
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0 ||
            !cJSON_IsString(text))
            return NULL;
        total += strlen(text->valuestring);
    }
    char *joined = malloc(total + 1);
    size_t at = 0;
    cJSON_ArrayForEach(part, content) {
        const char *text = get(part, "text")->valuestring;
        size_t length = strlen(text);
        if (joined) memcpy(joined + at, text, length);
        at += length;
    }
    if (joined) joined[at] = '\0';
    return joined;
}

static void free_messages(struct record *record) {
    for (size_t i = 0; record->messages && i < record->n_messages; i++)
        free(record->messages[i].content);
    free(record->messages);
    free(record->trained);
    record->messages = NULL, record->trained = NULL, record->n_messages = 0;
}

static int parse_messages(const cJSON *root, const char *label, struct record *record,
                          struct lq_error *err) {
    const cJSON *messages = get(root, "messages");
    unsigned long line = record->line;
    if (!messages) return line_error(err, label, line, "%s", expected_object(LQ_DATASET_CHAT));
    if (!cJSON_IsArray(messages))
        return line_error(err, label, line, "\"messages\" must be a list of messages");
    int count = cJSON_GetArraySize(messages);
    if (count == 0) return line_error(err, label, line, "\"messages\" is empty");
    record->messages = calloc((size_t)count, sizeof *record->messages);
    record->trained = calloc((size_t)count, 1);
    if (!record->messages || !record->trained)
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    record->n_messages = (size_t)count;
    int i = 0, any_trained = 0, any_assistant = 0;
    const cJSON *message;
    cJSON_ArrayForEach(message, messages) {
        const cJSON *role = get(message, "role"), *weight = get(message, "weight");
        struct lq_chat_message *m = &record->messages[i];
        if (!cJSON_IsObject(message))
            return line_error(err, label, line,
                              "messages[%d] must be an object with \"role\" and \"content\"", i);
        if (!cJSON_IsString(role))
            return line_error(err, label, line, "messages[%d].role must be a string", i);
        if (strcmp(role->valuestring, "system") == 0 || strcmp(role->valuestring, "developer") == 0)
            m->role = LQ_ROLE_SYSTEM;
        else if (strcmp(role->valuestring, "user") == 0)
            m->role = LQ_ROLE_USER;
        else if (strcmp(role->valuestring, "assistant") == 0)
            m->role = LQ_ROLE_ASSISTANT;
        else
            return line_error(err, label, line,
                              "messages[%d].role: unknown role \"%.32s\" (system, developer, "
                              "user or assistant)",
                              i, role->valuestring);
        if (!(m->content = message_content(get(message, "content"))))
            return line_error(err, label, line,
                              "messages[%d].content must be a string or a list of "
                              "{\"type\": \"text\", \"text\"} parts",
                              i);
        int trained = m->role == LQ_ROLE_ASSISTANT;
        if (weight) {
            if (m->role != LQ_ROLE_ASSISTANT)
                return line_error(err, label, line,
                                  "messages[%d].weight: only assistant messages have a weight", i);
            if (!cJSON_IsNumber(weight) || (weight->valuedouble != 0 && weight->valuedouble != 1))
                return line_error(err, label, line, "messages[%d].weight must be 0 or 1", i);
            trained = weight->valuedouble == 1;
        }
        record->trained[i] = (unsigned char)trained;
        any_trained |= trained;
        any_assistant |= m->role == LQ_ROLE_ASSISTANT;
        i++;
    }
    if (!any_trained)
        return line_error(err, label, line,
                          any_assistant ? "every assistant message has weight 0: nothing to "
                                          "train on"
                                        : "no assistant message: nothing to train on");
    return LQ_OK;
}

/* The kind of JSON lines a first record shows, or LQ_DATASET_AUTO. */
static enum lq_dataset_format kind_of(const cJSON *root) {
    if (get(root, "messages")) return LQ_DATASET_CHAT;
    if (get(root, "prompt") || get(root, "completion")) return LQ_DATASET_PROMPT_COMPLETION;
    if (get(root, "text")) return LQ_DATASET_TEXT;
    return LQ_DATASET_AUTO;
}

/* Fills record from one JSON object of the reading's kind. */
static int parse_object(struct reading *reading, const cJSON *root, struct record *record,
                        struct lq_error *err) {
    const char *label = reading->label;
    unsigned long line = record->line;
    if (reading->format == LQ_DATASET_TEXT) {
        const cJSON *text = get(root, "text");
        if (!text) return line_error(err, label, line, "%s", expected_object(reading->format));
        if (!cJSON_IsString(text)) return line_error(err, label, line, "\"text\" must be a string");
        if (!text->valuestring[0]) return line_error(err, label, line, "\"text\" is empty");
        record->text = text->valuestring;
    } else if (reading->format == LQ_DATASET_PROMPT_COMPLETION) {
        const cJSON *prompt = get(root, "prompt"), *completion = get(root, "completion");
        if (!prompt || !completion)
            return line_error(err, label, line, "%s", expected_object(reading->format));
        if (!cJSON_IsString(prompt))
            return line_error(err, label, line, "\"prompt\" must be a string");
        if (!cJSON_IsString(completion))
            return line_error(err, label, line, "\"completion\" must be a string");
        if (!completion->valuestring[0])
            return line_error(err, label, line, "\"completion\" is empty: nothing to train on");
        record->prompt = prompt->valuestring;
        record->completion = completion->valuestring;
    } else {
        return parse_messages(root, label, record, err);
    }
    return LQ_OK;
}

static int json_line(struct reading *reading, const struct line_reader *r, struct lq_error *err) {
    const char *end = NULL;
    cJSON *root = lq_json_parse_end(r->line, r->length, &end);
    if (!root) {
        size_t column = end && end >= r->line ? (size_t)(end - r->line) + 1 : 1;
        return line_error(err, reading->label, r->number, "not valid JSON (near column %zu)",
                          column > r->length ? r->length + 1 : column);
    }
    while (end && end < r->line + r->length && strchr(" \t\r\f\v", *end)) end++;
    int rc = LQ_OK;
    if (end && end < r->line + r->length)
        rc = line_error(err, reading->label, r->number,
                        "more than one JSON value (the second at column %zu): one object a line",
                        (size_t)(end - r->line) + 1);
    else if (!cJSON_IsObject(root))
        rc = line_error(err, reading->label, r->number, "%s", expected_object(reading->format));
    if (!rc && reading->format == LQ_DATASET_AUTO) {
        reading->format = kind_of(root);
        if (reading->format == LQ_DATASET_AUTO)
            rc = line_error(err, reading->label, r->number, "%s", expected_object(LQ_DATASET_AUTO));
    }
    if (rc || reading->stop_when_known) {
        cJSON_Delete(root);
        return rc;
    }
    struct record record = {.line = r->number};
    rc = parse_object(reading, root, &record, err);
    if (!rc) reading->n_documents++;
    if (!rc && reading->on_record) rc = reading->on_record(reading->context, &record, err);
    free_messages(&record);
    cJSON_Delete(root);
    return rc;
}

/* ---------- files ---------- */

enum extension_kind { EXTENSION_OTHER, EXTENSION_JSONL, EXTENSION_PLAIN };

static enum extension_kind extension_of(const char *name) {
    const char *slash = strrchr(name, '/'), *dot = strrchr(name, '.');
    if (!dot || (slash && dot < slash)) return EXTENSION_OTHER;
    static const char *const jsonl[] = {".jsonl", ".json", ".ndjson"};
    static const char *const plain[] = {".txt", ".text", ".md"};
    for (size_t i = 0; i < 3; i++) {
        if (strcasecmp(dot, jsonl[i]) == 0) return EXTENSION_JSONL;
        if (strcasecmp(dot, plain[i]) == 0) return EXTENSION_PLAIN;
    }
    return EXTENSION_OTHER;
}

/* Gathers a plain-text document's lines. */
struct paragraph {
    char *text;
    size_t length, capacity;
    unsigned long first_line; /* 0: no document open */
};

static int paragraph_add(struct paragraph *p, const char *line, size_t length, int keep) {
    if (!keep) return LQ_OK;
    size_t need = p->length + (p->length ? 1 : 0) + length + 1;
    if (need > p->capacity) {
        size_t capacity = p->capacity ? p->capacity : 4096;
        while (capacity < need) capacity *= 2;
        char *grown = realloc(p->text, capacity);
        if (!grown) return LQ_ENOMEM;
        p->text = grown, p->capacity = capacity;
    }
    if (p->length) p->text[p->length++] = '\n';
    memcpy(p->text + p->length, line, length);
    p->length += length;
    p->text[p->length] = '\0';
    return LQ_OK;
}

static int paragraph_end(struct reading *reading, struct paragraph *p, struct lq_error *err) {
    if (!p->first_line) return LQ_OK;
    struct record record = {.line = p->first_line, .text = reading->keep_text ? p->text : NULL};
    reading->n_documents++;
    p->first_line = 0;
    p->length = 0;
    return reading->on_record ? reading->on_record(reading->context, &record, err) : LQ_OK;
}

/* Reads path as reading->format (AUTO: detected), calling on_record for each document. */
static int read_file(const char *path, struct reading *reading, struct lq_error *err) {
    if (reading->format == LQ_DATASET_AUTO) {
        enum extension_kind extension = extension_of(reading->label);
        if (extension == EXTENSION_PLAIN) reading->format = LQ_DATASET_PLAIN;
        reading->jsonl = extension == EXTENSION_JSONL;
    }
    if (reading->stop_when_known && reading->format != LQ_DATASET_AUTO) return LQ_OK;
    struct line_reader *r = calloc(1, sizeof *r);
    if (!r) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", reading->label);
    r->label = reading->label;
    if (!(r->file = fopen(path, "rb"))) {
        int saved = errno;
        free(r);
        return lq_error_set(err, saved == ENOENT ? LQ_ENOTFOUND : LQ_EIO, "%s: %s", reading->label,
                            strerror(saved));
    }
    struct paragraph paragraph = {0};
    int rc;
    while ((rc = next_line(r, err)) == 1) {
        if ((rc = check_bytes(r, err))) break;
        int blank = is_blank(r->line, r->length);
        if (reading->format == LQ_DATASET_AUTO && !reading->jsonl && !blank) {
            /* No telling extension: JSON lines when the first text is an object. */
            const char *first = r->line + strspn(r->line, " \t\r\f\v");
            if (*first == '{')
                reading->jsonl = 1;
            else
                reading->format = LQ_DATASET_PLAIN;
        }
        if (reading->format == LQ_DATASET_PLAIN) {
            if (reading->stop_when_known) break;
            if (blank) {
                rc = paragraph_end(reading, &paragraph, err);
            } else {
                if (!paragraph.first_line) paragraph.first_line = r->number;
                if (paragraph_add(&paragraph, r->line, r->length, reading->keep_text))
                    rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory", reading->label);
            }
        } else if (!blank) {
            rc = json_line(reading, r, err);
            if (!rc && reading->stop_when_known) break;
        }
        if (rc) break;
    }
    if (rc == 0 && reading->format == LQ_DATASET_PLAIN && !reading->stop_when_known)
        rc = paragraph_end(reading, &paragraph, err);
    reading->n_lines = r->number;
    if (rc == 0 && ferror(r->file))
        rc = lq_error_set(err, LQ_EIO, "%s: cannot read: %s", reading->label, strerror(errno));
    fclose(r->file);
    free(r->line);
    free(r);
    free(paragraph.text);
    if (rc < 0) return rc;
    if (reading->stop_when_known ? reading->format == LQ_DATASET_AUTO : reading->n_documents == 0)
        return lq_error_set(err, LQ_EFORMAT, "%s: no documents (the file is empty or blank)",
                            reading->label);
    return LQ_OK;
}

int lq_dataset_detect(const char *path, const char *label, enum lq_dataset_format *format,
                      struct lq_error *err) {
    struct reading reading = {.label = label ? label : path, .stop_when_known = 1};
    int rc = read_file(path, &reading, err);
    if (!rc) *format = reading.format;
    return rc;
}

int lq_dataset_validate(const char *path, const char *label, enum lq_dataset_format format,
                        struct lq_dataset_summary *summary, struct lq_error *err) {
    struct reading reading = {.label = label ? label : path, .format = format};
    int rc = read_file(path, &reading, err);
    if (!rc && summary)
        *summary =
            (struct lq_dataset_summary){reading.format, reading.n_documents, reading.n_lines};
    return rc;
}

/* ---------- tokenization ---------- */

struct loading {
    const struct lq_tokenizer *tokenizer;
    const struct lq_dataset_options *options;
    enum lq_dataset_format format;
    const char *label;
    struct lq_dataset *dataset;
    size_t capacity;
};

/* The segments of a non-chat document: [BOS] prompt completion [EOS], or [BOS] text [EOS]. */
static int render_document(const struct loading *l, const struct record *record,
                           struct lq_chat_prompt *prompt) {
    memset(prompt, 0, sizeof *prompt);
    if (l->format == LQ_DATASET_CHAT)
        return lq_chat_render_training(l->options->chat_style, record->messages, record->n_messages,
                                       record->trained, prompt);
    int rc = LQ_OK;
    if (l->options->add_bos) rc = lq_chat_prompt_append(prompt, LQ_SEGMENT_BOS, NULL, 0);
    if (!rc && l->format == LQ_DATASET_PROMPT_COMPLETION)
        rc = lq_chat_prompt_append(prompt, LQ_SEGMENT_TEXT, record->prompt, 0) ||
             lq_chat_prompt_append(prompt, LQ_SEGMENT_TEXT, record->completion, 1);
    else if (!rc)
        rc = lq_chat_prompt_append(prompt, LQ_SEGMENT_TEXT, record->text, 1);
    if (!rc && l->options->add_eos) rc = lq_chat_prompt_append(prompt, LQ_SEGMENT_EOS, NULL, 1);
    if (rc) lq_chat_prompt_free(prompt);
    return rc ? LQ_ENOMEM : LQ_OK;
}

static int dataset_append(struct lq_dataset *d, size_t *capacity,
                          const struct lq_dataset_document *document) {
    if (d->n_documents == *capacity) {
        size_t grown_capacity = *capacity ? 2 * *capacity : 64;
        struct lq_dataset_document *grown = realloc(d->documents, grown_capacity * sizeof *grown);
        if (!grown) return LQ_ENOMEM;
        d->documents = grown, *capacity = grown_capacity;
    }
    d->documents[d->n_documents++] = *document;
    d->n_tokens += document->n_tokens;
    d->n_targets += document->n_targets;
    if (document->n_tokens > d->max_tokens) d->max_tokens = document->n_tokens;
    return LQ_OK;
}

static int tokenize_record(void *context, const struct record *record, struct lq_error *err) {
    struct loading *l = context;
    struct lq_chat_prompt prompt;
    if (render_document(l, record, &prompt))
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", l->label);
    struct lq_dataset_document document = {.line = record->line};
    int rc = lq_chat_tokenize_masked(l->tokenizer, &prompt, &document.tokens, &document.mask,
                                     &document.n_tokens, err);
    lq_chat_prompt_free(&prompt);
    if (rc) {
        lq_error_prefix(err, "%s:%lu", l->label, record->line);
        return rc;
    }
    if (document.n_tokens) document.mask[0] = 0; /* nothing predicts the first token */
    for (size_t i = 0; i < document.n_tokens; i++) document.n_targets += document.mask[i];
    if (document.n_targets == 0)
        rc = line_error(err, l->label, record->line, "the document has no token to train on");
    else if (dataset_append(l->dataset, &l->capacity, &document))
        rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory", l->label);
    if (rc) free(document.tokens), free(document.mask);
    return rc;
}

void lq_dataset_free(struct lq_dataset *dataset) {
    if (!dataset) return;
    for (size_t i = 0; i < dataset->n_documents; i++) {
        free(dataset->documents[i].tokens);
        free(dataset->documents[i].mask);
    }
    free(dataset->documents);
    free(dataset);
}

/* Reads and tokenizes one file as format (AUTO: detected). */
static int load_file(const char *path, const char *label, enum lq_dataset_format format,
                     const struct lq_tokenizer *tokenizer, const struct lq_dataset_options *options,
                     struct lq_dataset **out, struct lq_error *err) {
    struct lq_dataset *dataset = calloc(1, sizeof *dataset);
    if (!dataset) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    struct loading loading = {tokenizer, options, format, label, dataset, 0};
    /* The format is known after the first document, before on_record sees it. */
    struct reading reading = {.label = label,
                              .format = format,
                              .keep_text = 1,
                              .on_record = tokenize_record,
                              .context = &loading};
    if (format == LQ_DATASET_AUTO) {
        int rc = lq_dataset_detect(path, label, &loading.format, err);
        if (rc) {
            lq_dataset_free(dataset);
            return rc;
        }
        reading.format = loading.format;
    }
    int rc = read_file(path, &reading, err);
    if (rc) {
        lq_dataset_free(dataset);
        return rc;
    }
    dataset->format = reading.format;
    *out = dataset;
    return LQ_OK;
}

/* Moves the documents chosen by seed (round(fraction * n), at least 1, leaving at least 1)
 * from *all to a new validation set; both keep file order. */
static int split(struct lq_dataset *all, double fraction, unsigned long long seed,
                 const char *label, struct lq_dataset **validation, struct lq_error *err) {
    size_t n = all->n_documents;
    if (n < 2)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: %zu document cannot be split into training and validation", label,
                            n);
    size_t n_validation = (size_t)llround(fraction * (double)n);
    if (n_validation < 1) n_validation = 1;
    if (n_validation > n - 1) n_validation = n - 1;
    size_t *order = malloc(n * sizeof *order);
    unsigned char *held = calloc(n, 1);
    struct lq_dataset *kept = calloc(1, sizeof *kept), *out = calloc(1, sizeof *out);
    if (!order || !held || !kept || !out) {
        free(order), free(held), free(kept), free(out);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    /* The first n_validation steps of a seeded Fisher-Yates shuffle pick the held-out ones. */
    struct lq_rng rng;
    lq_rng_seed(&rng, (uint64_t)seed);
    for (size_t i = 0; i < n; i++) order[i] = i;
    for (size_t i = 0; i < n_validation; i++) {
        size_t j = i + (size_t)(lq_rng_uniform(&rng) * (double)(n - i));
        if (j >= n) j = n - 1;
        size_t swap = order[i];
        order[i] = order[j], order[j] = swap;
        held[order[i]] = 1;
    }
    size_t kept_capacity = 0, out_capacity = 0;
    int rc = LQ_OK;
    kept->format = out->format = all->format;
    for (size_t i = 0; i < n && !rc; i++)
        rc = held[i] ? dataset_append(out, &out_capacity, &all->documents[i])
                     : dataset_append(kept, &kept_capacity, &all->documents[i]);
    free(order);
    free(held);
    if (rc) { /* the documents still belong to all */
        free(kept->documents), free(kept), free(out->documents), free(out);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    free(all->documents);
    *all = *kept;
    free(kept);
    *validation = out;
    return LQ_OK;
}

int lq_dataset_load(const char *path, const struct lq_tokenizer *tokenizer,
                    const struct lq_dataset_options *options, struct lq_dataset **train,
                    struct lq_dataset **validation, struct lq_error *err) {
    struct lq_dataset_options defaults;
    if (!options) {
        lq_dataset_options_default(&defaults);
        options = &defaults;
    }
    *train = NULL;
    if (validation) *validation = NULL;
    double fraction = options->validation_fraction;
    int wants_validation = fraction != 0 || options->validation_path;
    if (!(fraction >= 0 && fraction < 1))
        return lq_error_set(err, LQ_EINVAL, "validation fraction %g is not in [0, 1)", fraction);
    if (fraction > 0 && options->validation_path)
        return lq_error_set(err, LQ_EINVAL,
                            "give a validation file or a validation fraction, not both");
    if (wants_validation && !validation)
        return lq_error_set(err, LQ_EINVAL, "a validation set is asked for but has no place");
    const char *label = options->label ? options->label : path;
    struct lq_dataset *all = NULL, *held = NULL;
    int rc = load_file(path, label, options->format, tokenizer, options, &all, err);
    if (!rc && fraction > 0) rc = split(all, fraction, options->seed, label, &held, err);
    if (!rc && options->validation_path) {
        const char *validation_label =
            options->validation_label ? options->validation_label : options->validation_path;
        enum lq_dataset_format format = options->format;
        if (format == LQ_DATASET_AUTO) /* detected on its own: both must agree */
            rc = lq_dataset_detect(options->validation_path, validation_label, &format, err);
        if (!rc && format != all->format)
            rc = lq_error_set(err, LQ_EFORMAT, "%s is %s but %s is %s: give both in one format",
                              validation_label, lq_dataset_format_name(format), label,
                              lq_dataset_format_name(all->format));
        if (!rc)
            rc = load_file(options->validation_path, validation_label, format, tokenizer, options,
                           &held, err);
    }
    if (rc) {
        lq_dataset_free(all);
        return rc;
    }
    *train = all;
    if (validation) *validation = held;
    return LQ_OK;
}
