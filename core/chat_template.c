#include "core/chat_template.h"

#include <stdlib.h>
#include <string.h>

/* lq_tokenizer_find: special pieces are looked up by their text, in the piece index. */
#include "core/tokenizer_internal.h"

enum lq_chat_format lq_chat_format_detect(const char *chat_template) {
    if (!chat_template) return LQ_CHAT_PLAIN;
    if (strstr(chat_template, "<|im_start|>")) return LQ_CHAT_CHATML;
    if (strstr(chat_template, "<|start_header_id|>")) return LQ_CHAT_LLAMA3;
    if (strstr(chat_template, "[INST]")) return LQ_CHAT_LLAMA2;
    return LQ_CHAT_PLAIN;
}

const char *lq_chat_format_name(enum lq_chat_format format) {
    return format == LQ_CHAT_CHATML   ? "chatml"
           : format == LQ_CHAT_LLAMA2 ? "llama2"
           : format == LQ_CHAT_LLAMA3 ? "llama3"
                                      : "plain";
}

/* ---------- a template's default system message ---------- */

static int contains(const char *s, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(s + i, needle, k) == 0) return 1;
    return 0;
}

/* Whether an {% if %} condition tests messages[0]'s role against 'system' with op ("!=" or
 * "=="). "!=" may be one of several conditions joined by "and" (all must hold, so the branch
 * still implies it); "==" must stand alone, since its else branch is what is inserted. */
static int tests_first_role(const char *condition, size_t n, const char *op) {
    if (!contains(condition, n, "messages[0]") || !contains(condition, n, "role") ||
        !contains(condition, n, "system") || !contains(condition, n, op) ||
        contains(condition, n, " or ") || contains(condition, n, "not "))
        return 0;
    return strcmp(op, "!=") == 0 ||
           (!contains(condition, n, "!=") && !contains(condition, n, " and "));
}

/* Whether position at of the template lies in a branch taken only when messages[0] is not a
 * system message: the innermost {% if %} around it tests messages[0]['role'] != 'system', or
 * tests == 'system' and at is in its {% else %}. Statement tags are read without a Jinja parser
 * ("{%", an optional '-' or '+', the keyword, the condition, "%}"); nesting deeper than 32 ifs
 * is not recognised. */
static int inserted_without_system(const char *template, const char *at) {
    struct {
        const char *condition;
        size_t length;
        int branch; /* 0: if, 1: elif, 2: else */
    } stack[32];
    int depth = 0;
    for (const char *tag = strstr(template, "{%"); tag && tag < at; tag = strstr(tag + 2, "{%")) {
        const char *end = strstr(tag + 2, "%}");
        if (!end || end > at) return 0;
        const char *word = tag + 2;
        if (*word == '-' || *word == '+') word++;
        while (*word == ' ' || *word == '\t' || *word == '\n' || *word == '\r') word++;
        size_t length = strspn(word, "abcdefghijklmnopqrstuvwxyz");
        if (length == 2 && memcmp(word, "if", 2) == 0) {
            if (depth == 32) return 0;
            stack[depth].condition = word + 2;
            stack[depth].length = (size_t)(end - (word + 2));
            stack[depth++].branch = 0;
        } else if (depth && length == 4 && memcmp(word, "elif", 4) == 0) {
            stack[depth - 1].branch = 1;
        } else if (depth && length == 4 && memcmp(word, "else", 4) == 0) {
            stack[depth - 1].branch = 2;
        } else if (depth && length == 5 && memcmp(word, "endif", 5) == 0) {
            depth--;
        }
    }
    if (depth == 0) return 0;
    const char *condition = stack[depth - 1].condition;
    size_t length = stack[depth - 1].length;
    if (stack[depth - 1].branch == 0) return tests_first_role(condition, length, "!=");
    if (stack[depth - 1].branch == 2) return tests_first_role(condition, length, "==");
    return 0;
}

/* The default system message's text in template (start and length), or NULL. */
static const char *find_default_system(const char *template, size_t *length) {
    static const char opening[] = "<|im_start|>system";
    for (const char *at = strstr(template, opening); at; at = strstr(at + 1, opening)) {
        const char *text = at + strlen(opening);
        if (*text == '\n')
            text++;
        else if (text[0] == '\\' && text[1] == 'n')
            text += 2;
        else
            continue;
        const char *end = strstr(text, "<|im_end|>");
        if (!end || end == text) continue;
        /* Jinja ({ }), quotes, concatenation (+ ~) or an escape: not one literal. */
        if (strcspn(text, "{}'\"+~\\") < (size_t)(end - text)) continue;
        if (!inserted_without_system(template, at)) continue;
        *length = (size_t)(end - text);
        return text;
    }
    return NULL;
}

int lq_chat_style_detect(const char *chat_template, struct lq_chat_style *out) {
    out->format = lq_chat_format_detect(chat_template);
    out->default_system = NULL;
    size_t length = 0;
    const char *text =
        out->format == LQ_CHAT_CHATML ? find_default_system(chat_template, &length) : NULL;
    if (!text) return LQ_OK;
    if (!(out->default_system = malloc(length + 1))) return LQ_ENOMEM;
    memcpy(out->default_system, text, length);
    out->default_system[length] = '\0';
    return LQ_OK;
}

void lq_chat_style_free(struct lq_chat_style *style) {
    free(style->default_system);
    style->default_system = NULL;
}

static int push(struct lq_chat_prompt *p, enum lq_chat_segment_kind kind, int trainable,
                const char *a, const char *b, const char *c) {
    if (p->n_segments == p->capacity) {
        size_t capacity = p->capacity ? 2 * p->capacity : 16;
        struct lq_chat_segment *grown = realloc(p->segments, capacity * sizeof *grown);
        if (!grown) return LQ_ENOMEM;
        p->segments = grown, p->capacity = capacity;
    }
    char *text = NULL;
    if (a) {
        size_t la = strlen(a), lb = b ? strlen(b) : 0, lc = c ? strlen(c) : 0;
        if (!(text = malloc(la + lb + lc + 1))) return LQ_ENOMEM;
        memcpy(text, a, la);
        if (b) memcpy(text + la, b, lb);
        if (c) memcpy(text + la + lb, c, lc);
        text[la + lb + lc] = '\0';
    }
    p->segments[p->n_segments++] = (struct lq_chat_segment){kind, text, trainable != 0};
    return LQ_OK;
}

int lq_chat_prompt_append(struct lq_chat_prompt *prompt, enum lq_chat_segment_kind kind,
                          const char *text, int trainable) {
    return push(prompt, kind, trainable, text, NULL, NULL);
}

static const char *role_name(enum lq_chat_role role) {
    return role == LQ_ROLE_SYSTEM ? "system" : role == LQ_ROLE_USER ? "user" : "assistant";
}

/* How a render treats the conversation: for generation (the last assistant message, if any,
 * is left open and a generation prompt follows a last user message), or for training (every
 * message closed, trained assistant contents and their end markers flagged). */
struct render_mode {
    int training;
    const unsigned char *trained; /* per message; NULL: every assistant message */
};

/* 1 when message i's content (and end marker) are loss targets. */
static int trains(const struct render_mode *mode, const struct lq_chat_message *m, size_t i) {
    return mode->training && m[i].role == LQ_ROLE_ASSISTANT && (!mode->trained || mode->trained[i]);
}

/* An assistant message is left open (continued) only when generating and it is the last. */
static int left_open(const struct render_mode *mode, const struct lq_chat_message *m, size_t i,
                     size_t n) {
    return !mode->training && i + 1 == n && m[i].role == LQ_ROLE_ASSISTANT;
}

static int render_chatml(const struct lq_chat_message *m, size_t n, const struct render_mode *mode,
                         struct lq_chat_prompt *p) {
    int rc = push(p, LQ_SEGMENT_BOS, 0, NULL, NULL, NULL);
    for (size_t i = 0; i < n && !rc; i++) {
        int train = trains(mode, m, i);
        rc = push(p, LQ_SEGMENT_SPECIAL, 0, "<|im_start|>", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, 0, role_name(m[i].role), "\n", NULL) ||
             push(p, LQ_SEGMENT_TEXT, train, m[i].content, NULL, NULL);
        if (!rc && !left_open(mode, m, i, n))
            rc = push(p, LQ_SEGMENT_SPECIAL, train, "<|im_end|>", NULL, NULL) ||
                 push(p, LQ_SEGMENT_TEXT, 0, "\n", NULL, NULL);
    }
    if (!rc && !mode->training && m[n - 1].role != LQ_ROLE_ASSISTANT)
        rc = push(p, LQ_SEGMENT_SPECIAL, 0, "<|im_start|>", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, 0, "assistant\n", NULL, NULL);
    p->stop = "<|im_end|>";
    return rc ? LQ_ENOMEM : LQ_OK;
}

/* As the Llama 3 instruct template: BOS (<|begin_of_text|>) once, then per message
 * <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>. */
static int render_llama3(const struct lq_chat_message *m, size_t n, const struct render_mode *mode,
                         struct lq_chat_prompt *p) {
    int rc = push(p, LQ_SEGMENT_BOS, 0, NULL, NULL, NULL);
    for (size_t i = 0; i < n && !rc; i++) {
        int train = trains(mode, m, i);
        rc = push(p, LQ_SEGMENT_SPECIAL, 0, "<|start_header_id|>", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, 0, role_name(m[i].role), NULL, NULL) ||
             push(p, LQ_SEGMENT_SPECIAL, 0, "<|end_header_id|>", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, 0, "\n\n", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, train, m[i].content, NULL, NULL);
        if (!rc && !left_open(mode, m, i, n))
            rc = push(p, LQ_SEGMENT_SPECIAL, train, "<|eot_id|>", NULL, NULL);
    }
    if (!rc && !mode->training && m[n - 1].role != LQ_ROLE_ASSISTANT)
        rc = push(p, LQ_SEGMENT_SPECIAL, 0, "<|start_header_id|>", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, 0, "assistant", NULL, NULL) ||
             push(p, LQ_SEGMENT_SPECIAL, 0, "<|end_header_id|>", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, 0, "\n\n", NULL, NULL);
    p->stop = "<|eot_id|>";
    return rc ? LQ_ENOMEM : LQ_OK;
}

/* As Meta's reference and the HF template: system text folded into the first user turn; each
 * user turn opens with BOS, each answer closes with EOS. */
static int render_llama2(const struct lq_chat_message *m, size_t n, const struct render_mode *mode,
                         struct lq_chat_prompt *p) {
    char *system = NULL;
    size_t system_length = 0;
    int rc = 0;
    for (size_t i = 0; i < n && m[i].role == LQ_ROLE_SYSTEM; i++) {
        size_t length = strlen(m[i].content);
        char *grown = realloc(system, system_length + length + 2);
        if (!grown) {
            free(system);
            return LQ_ENOMEM;
        }
        system = grown;
        if (system_length) system[system_length++] = '\n';
        memcpy(system + system_length, m[i].content, length + 1);
        system_length += length;
    }
    int system_pending = system != NULL, opened = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        if (m[i].role == LQ_ROLE_SYSTEM) continue; /* leading ones are folded in; later ones too */
        if (m[i].role == LQ_ROLE_ASSISTANT && !opened) /* an answer with no question before it */
            rc = push(p, LQ_SEGMENT_BOS, 0, NULL, NULL, NULL) ||
                 (system_pending ? push(p, LQ_SEGMENT_TEXT, 0, "[INST] <<SYS>>\n", system,
                                        "\n<</SYS>>\n\n [/INST]")
                                 : push(p, LQ_SEGMENT_TEXT, 0, "[INST]  [/INST]", NULL, NULL));
        if (m[i].role == LQ_ROLE_ASSISTANT && !opened) system_pending = 0;
        opened = 1;
        if (rc) break;
        if (m[i].role == LQ_ROLE_USER) {
            rc = push(p, LQ_SEGMENT_BOS, 0, NULL, NULL, NULL);
            if (!rc && system_pending)
                rc = push(p, LQ_SEGMENT_TEXT, 0, "[INST] <<SYS>>\n", system, "\n<</SYS>>\n\n") ||
                     push(p, LQ_SEGMENT_TEXT, 0, m[i].content, " [/INST]", NULL);
            else if (!rc)
                rc = push(p, LQ_SEGMENT_TEXT, 0, "[INST] ", m[i].content, " [/INST]");
            system_pending = 0;
        } else {
            int train = trains(mode, m, i);
            rc = push(p, LQ_SEGMENT_TEXT, 0, " ", NULL, NULL) ||
                 push(p, LQ_SEGMENT_TEXT, train, m[i].content, NULL, NULL);
            if (!rc && !left_open(mode, m, i, n))
                rc = push(p, LQ_SEGMENT_TEXT, train, " ", NULL, NULL) ||
                     push(p, LQ_SEGMENT_EOS, train, NULL, NULL, NULL);
        }
    }
    if (!rc && !opened) /* only system messages: they become the instruction */
        rc = push(p, LQ_SEGMENT_BOS, 0, NULL, NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, 0, "[INST] <<SYS>>\n", system, "\n<</SYS>>\n\n [/INST]");
    free(system);
    return rc ? LQ_ENOMEM : LQ_OK;
}

static int render_plain(const struct lq_chat_message *m, size_t n, const struct render_mode *mode,
                        struct lq_chat_prompt *p) {
    int rc = push(p, LQ_SEGMENT_BOS, 0, NULL, NULL, NULL);
    for (size_t i = 0; i < n && !rc; i++) {
        if (m[i].role == LQ_ROLE_SYSTEM) {
            rc = push(p, LQ_SEGMENT_TEXT, 0, m[i].content, "\n\n", NULL);
        } else if (m[i].role == LQ_ROLE_USER) {
            rc = push(p, LQ_SEGMENT_TEXT, 0, "User: ", m[i].content, "\n");
        } else {
            int train = trains(mode, m, i);
            rc = push(p, LQ_SEGMENT_TEXT, 0, "Assistant: ", NULL, NULL) ||
                 push(p, LQ_SEGMENT_TEXT, train, m[i].content, NULL, NULL);
            if (!rc && !left_open(mode, m, i, n))
                rc = push(p, LQ_SEGMENT_TEXT, train, "\n", NULL, NULL);
        }
    }
    if (!rc && !mode->training && m[n - 1].role != LQ_ROLE_ASSISTANT)
        rc = push(p, LQ_SEGMENT_TEXT, 0, "Assistant:", NULL, NULL);
    /* Plain has no end token of its own: a trained conversation's last answer ends with EOS,
     * which stops generation as "\nUser:" does between turns. */
    if (!rc && mode->training && m[n - 1].role == LQ_ROLE_ASSISTANT)
        rc = push(p, LQ_SEGMENT_EOS, trains(mode, m, n - 1), NULL, NULL, NULL);
    p->stop = "\nUser:";
    return rc ? LQ_ENOMEM : LQ_OK;
}

static int render_format(enum lq_chat_format format, const struct lq_chat_message *messages,
                         size_t n, const struct render_mode *mode, struct lq_chat_prompt *out) {
    return format == LQ_CHAT_CHATML   ? render_chatml(messages, n, mode, out)
           : format == LQ_CHAT_LLAMA2 ? render_llama2(messages, n, mode, out)
           : format == LQ_CHAT_LLAMA3 ? render_llama3(messages, n, mode, out)
                                      : render_plain(messages, n, mode, out);
}

/* The conversation with the style's default system message put first: rendered as if the
 * caller had given it, so serving and training insert the same bytes. */
static int render_with_default(const struct lq_chat_style *style,
                               const struct lq_chat_message *messages, size_t n,
                               const struct render_mode *mode, struct lq_chat_prompt *out) {
    struct lq_chat_message *all = malloc((n + 1) * sizeof *all);
    unsigned char *trained = mode->trained ? malloc(n + 1) : NULL;
    int rc = LQ_ENOMEM;
    if (all && (trained || !mode->trained)) {
        all[0] = (struct lq_chat_message){LQ_ROLE_SYSTEM, style->default_system};
        memcpy(all + 1, messages, n * sizeof *all);
        if (trained) {
            trained[0] = 0;
            memcpy(trained + 1, mode->trained, n);
        }
        const struct render_mode shifted = {mode->training, trained};
        rc = render_format(style->format, all, n + 1, &shifted, out);
    }
    free(all);
    free(trained);
    return rc;
}

static int render(const struct lq_chat_style *style, const struct lq_chat_message *messages,
                  size_t n, const struct render_mode *mode, struct lq_chat_prompt *out) {
    memset(out, 0, sizeof *out);
    if (n == 0) return LQ_EINVAL;
    int rc = style && style->default_system && messages[0].role != LQ_ROLE_SYSTEM
                 ? render_with_default(style, messages, n, mode, out)
                 : render_format(style ? style->format : LQ_CHAT_PLAIN, messages, n, mode, out);
    if (rc) lq_chat_prompt_free(out);
    return rc;
}

int lq_chat_render(const struct lq_chat_style *style, const struct lq_chat_message *messages,
                   size_t n, struct lq_chat_prompt *out) {
    const struct render_mode mode = {0, NULL};
    return render(style, messages, n, &mode, out);
}

int lq_chat_render_training(const struct lq_chat_style *style,
                            const struct lq_chat_message *messages, size_t n,
                            const unsigned char *trained, struct lq_chat_prompt *out) {
    const struct render_mode mode = {1, trained};
    return render(style, messages, n, &mode, out);
}

void lq_chat_prompt_free(struct lq_chat_prompt *prompt) {
    for (size_t i = 0; i < prompt->n_segments; i++) free(prompt->segments[i].text);
    free(prompt->segments);
    memset(prompt, 0, sizeof *prompt);
}

struct id_list {
    int *ids;
    unsigned char *mask; /* NULL when no mask is wanted */
    size_t count, capacity;
};

static int append_ids(struct id_list *list, const int *ids, size_t count, int trainable) {
    if (list->count + count > list->capacity) {
        size_t capacity = (list->count + count) * 2 + 16;
        int *grown = realloc(list->ids, capacity * sizeof *grown);
        if (!grown) return LQ_ENOMEM;
        list->ids = grown;
        if (list->mask) {
            unsigned char *mask = realloc(list->mask, capacity);
            if (!mask) return LQ_ENOMEM;
            list->mask = mask;
        }
        list->capacity = capacity;
    }
    memcpy(list->ids + list->count, ids, count * sizeof *ids);
    if (list->mask) memset(list->mask + list->count, trainable != 0, count);
    list->count += count;
    return LQ_OK;
}

/* Text of adjacent segments, merged for tokenization, with the byte spans whose segments are
 * trainable. */
struct text_run {
    char *text;
    size_t length, capacity;
    size_t (*spans)[2];
    size_t n_spans, spans_capacity;
};

static int run_add(struct text_run *run, const char *text, int trainable) {
    size_t add = strlen(text);
    if (run->length + add + 1 > run->capacity) {
        size_t capacity = (run->length + add + 1) * 2;
        char *grown = realloc(run->text, capacity);
        if (!grown) return LQ_ENOMEM;
        run->text = grown, run->capacity = capacity;
    }
    if (trainable && add) {
        if (run->n_spans && run->spans[run->n_spans - 1][1] == run->length) {
            run->spans[run->n_spans - 1][1] += add; /* contiguous with the last span */
        } else {
            if (run->n_spans == run->spans_capacity) {
                size_t capacity = run->spans_capacity ? 2 * run->spans_capacity : 8;
                size_t(*grown)[2] = realloc(run->spans, capacity * sizeof *grown);
                if (!grown) return LQ_ENOMEM;
                run->spans = grown, run->spans_capacity = capacity;
            }
            run->spans[run->n_spans][0] = run->length;
            run->spans[run->n_spans++][1] = run->length + add;
        }
    }
    memcpy(run->text + run->length, text, add);
    run->length += add;
    return LQ_OK;
}

/* How many leading tokens the text before `end`, tokenized alone, shares with ids. */
static int shared_prefix(const struct lq_tokenizer *tokenizer, const struct text_run *run,
                         size_t end, const int *ids, size_t count, size_t *shared,
                         struct lq_error *err) {
    if (end == 0 || end == run->length) {
        *shared = end == 0 ? 0 : count;
        return LQ_OK;
    }
    int *prefix = NULL;
    size_t n = 0;
    int rc = lq_tokenizer_encode(tokenizer, run->text, end, 0, &prefix, &n, err);
    if (rc) return rc;
    size_t k = 0;
    while (k < n && k < count && prefix[k] == ids[k]) k++;
    free(prefix);
    *shared = k;
    return LQ_OK;
}

/* Encodes the run (if any), flags the tokens of its trainable spans, and empties it. */
static int flush_text(const struct lq_tokenizer *tokenizer, struct text_run *run,
                      struct id_list *list, struct lq_error *err) {
    if (run->length == 0) return LQ_OK;
    int *ids = NULL;
    size_t count = 0, first = list->count;
    int rc = lq_tokenizer_encode(tokenizer, run->text, run->length, 0, &ids, &count, err);
    if (!rc) rc = append_ids(list, ids, count, 0);
    for (size_t s = 0; !rc && list->mask && s < run->n_spans; s++) {
        size_t begin = 0, end = 0;
        rc = shared_prefix(tokenizer, run, run->spans[s][0], ids, count, &begin, err);
        if (!rc) rc = shared_prefix(tokenizer, run, run->spans[s][1], ids, count, &end, err);
        for (size_t k = begin; !rc && k < end; k++) list->mask[first + k] = 1;
    }
    free(ids);
    run->length = 0;
    run->n_spans = 0;
    return rc;
}

static int tokenize(const struct lq_tokenizer *tokenizer, const struct lq_chat_prompt *prompt,
                    int want_mask, int **ids, unsigned char **mask, size_t *count,
                    struct lq_error *err) {
    struct id_list list = {0};
    struct text_run run = {0};
    int rc = LQ_OK;
    if (want_mask && !(list.mask = malloc(1))) rc = LQ_ENOMEM;
    for (size_t i = 0; i < prompt->n_segments && !rc; i++) {
        const struct lq_chat_segment *s = &prompt->segments[i];
        int id = -1;
        /* A BOS is the one the tokenizer adds to a text: none when it adds none (a GGUF
         * add_bos_token false, as SmolLM2's, whose BOS is <|im_start|>). */
        if (s->kind == LQ_SEGMENT_BOS && !tokenizer->bos_off) id = lq_tokenizer_bos_id(tokenizer);
        if (s->kind == LQ_SEGMENT_EOS) id = lq_tokenizer_eos_id(tokenizer);
        if (s->kind == LQ_SEGMENT_SPECIAL)
            id = lq_tokenizer_find(tokenizer, s->text, strlen(s->text));
        if (id >= 0) {
            if (!(rc = flush_text(tokenizer, &run, &list, err)))
                rc = append_ids(&list, &id, 1, s->trainable);
            continue;
        }
        if (s->kind == LQ_SEGMENT_BOS || s->kind == LQ_SEGMENT_EOS) continue;
        rc = run_add(&run, s->text, s->trainable); /* text, or a special piece not in the vocab */
    }
    if (!rc) rc = flush_text(tokenizer, &run, &list, err);
    free(run.text);
    free(run.spans);
    if (rc) {
        free(list.ids);
        free(list.mask);
        if (rc == LQ_ENOMEM) lq_error_set(err, rc, "out of memory");
        return rc;
    }
    *ids = list.ids;
    if (mask) *mask = list.mask;
    *count = list.count;
    return LQ_OK;
}

int lq_chat_tokenize(const struct lq_tokenizer *tokenizer, const struct lq_chat_prompt *prompt,
                     int **ids, size_t *count, struct lq_error *err) {
    return tokenize(tokenizer, prompt, 0, ids, NULL, count, err);
}

int lq_chat_tokenize_masked(const struct lq_tokenizer *tokenizer,
                            const struct lq_chat_prompt *prompt, int **ids, unsigned char **mask,
                            size_t *count, struct lq_error *err) {
    return tokenize(tokenizer, prompt, 1, ids, mask, count, err);
}
