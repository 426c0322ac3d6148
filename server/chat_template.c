#include "server/chat_template.h"

#include <stdlib.h>
#include <string.h>

enum lq_chat_format lq_chat_format_detect(const char *chat_template) {
    if (!chat_template) return LQ_CHAT_PLAIN;
    if (strstr(chat_template, "<|im_start|>")) return LQ_CHAT_CHATML;
    if (strstr(chat_template, "[INST]")) return LQ_CHAT_LLAMA2;
    return LQ_CHAT_PLAIN;
}

const char *lq_chat_format_name(enum lq_chat_format format) {
    return format == LQ_CHAT_CHATML ? "chatml" : format == LQ_CHAT_LLAMA2 ? "llama2" : "plain";
}

static int push(struct lq_chat_prompt *p, enum lq_chat_segment_kind kind, const char *a,
                const char *b, const char *c) {
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
    p->segments[p->n_segments++] = (struct lq_chat_segment){kind, text};
    return LQ_OK;
}

static const char *role_name(enum lq_chat_role role) {
    return role == LQ_ROLE_SYSTEM ? "system" : role == LQ_ROLE_USER ? "user" : "assistant";
}

static int render_chatml(const struct lq_chat_message *m, size_t n, struct lq_chat_prompt *p) {
    int rc = push(p, LQ_SEGMENT_BOS, NULL, NULL, NULL);
    for (size_t i = 0; i < n && !rc; i++) {
        int open = i + 1 == n && m[i].role == LQ_ROLE_ASSISTANT;
        rc = push(p, LQ_SEGMENT_SPECIAL, "<|im_start|>", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, role_name(m[i].role), "\n", m[i].content);
        if (!rc && !open)
            rc = push(p, LQ_SEGMENT_SPECIAL, "<|im_end|>", NULL, NULL) ||
                 push(p, LQ_SEGMENT_TEXT, "\n", NULL, NULL);
    }
    if (!rc && m[n - 1].role != LQ_ROLE_ASSISTANT)
        rc = push(p, LQ_SEGMENT_SPECIAL, "<|im_start|>", NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, "assistant\n", NULL, NULL);
    p->stop = "<|im_end|>";
    return rc ? LQ_ENOMEM : LQ_OK;
}

/* As Meta's reference and the HF template: system text folded into the first user turn; each
 * user turn opens with BOS, each answer closes with EOS. */
static int render_llama2(const struct lq_chat_message *m, size_t n, struct lq_chat_prompt *p) {
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
            rc = push(p, LQ_SEGMENT_BOS, NULL, NULL, NULL) ||
                 (system_pending ? push(p, LQ_SEGMENT_TEXT, "[INST] <<SYS>>\n", system,
                                        "\n<</SYS>>\n\n [/INST]")
                                 : push(p, LQ_SEGMENT_TEXT, "[INST]  [/INST]", NULL, NULL));
        if (m[i].role == LQ_ROLE_ASSISTANT && !opened) system_pending = 0;
        opened = 1;
        if (rc) break;
        if (m[i].role == LQ_ROLE_USER) {
            rc = push(p, LQ_SEGMENT_BOS, NULL, NULL, NULL);
            if (!rc && system_pending)
                rc = push(p, LQ_SEGMENT_TEXT, "[INST] <<SYS>>\n", system, "\n<</SYS>>\n\n") ||
                     push(p, LQ_SEGMENT_TEXT, m[i].content, " [/INST]", NULL);
            else if (!rc)
                rc = push(p, LQ_SEGMENT_TEXT, "[INST] ", m[i].content, " [/INST]");
            system_pending = 0;
        } else {
            int open = i + 1 == n;
            rc = push(p, LQ_SEGMENT_TEXT, " ", m[i].content, open ? NULL : " ");
            if (!rc && !open) rc = push(p, LQ_SEGMENT_EOS, NULL, NULL, NULL);
        }
    }
    if (!rc && !opened) /* only system messages: they become the instruction */
        rc = push(p, LQ_SEGMENT_BOS, NULL, NULL, NULL) ||
             push(p, LQ_SEGMENT_TEXT, "[INST] <<SYS>>\n", system, "\n<</SYS>>\n\n [/INST]");
    free(system);
    return rc ? LQ_ENOMEM : LQ_OK;
}

static int render_plain(const struct lq_chat_message *m, size_t n, struct lq_chat_prompt *p) {
    int rc = push(p, LQ_SEGMENT_BOS, NULL, NULL, NULL);
    for (size_t i = 0; i < n && !rc; i++) {
        int open = i + 1 == n && m[i].role == LQ_ROLE_ASSISTANT;
        if (m[i].role == LQ_ROLE_SYSTEM)
            rc = push(p, LQ_SEGMENT_TEXT, m[i].content, "\n\n", NULL);
        else if (m[i].role == LQ_ROLE_USER)
            rc = push(p, LQ_SEGMENT_TEXT, "User: ", m[i].content, "\n");
        else
            rc = push(p, LQ_SEGMENT_TEXT, "Assistant: ", m[i].content, open ? NULL : "\n");
    }
    if (!rc && m[n - 1].role != LQ_ROLE_ASSISTANT)
        rc = push(p, LQ_SEGMENT_TEXT, "Assistant:", NULL, NULL);
    p->stop = "\nUser:";
    return rc ? LQ_ENOMEM : LQ_OK;
}

int lq_chat_render(enum lq_chat_format format, const struct lq_chat_message *messages, size_t n,
                   struct lq_chat_prompt *out) {
    memset(out, 0, sizeof *out);
    if (n == 0) return LQ_EINVAL;
    int rc = format == LQ_CHAT_CHATML   ? render_chatml(messages, n, out)
             : format == LQ_CHAT_LLAMA2 ? render_llama2(messages, n, out)
                                        : render_plain(messages, n, out);
    if (rc) lq_chat_prompt_free(out);
    return rc;
}

void lq_chat_prompt_free(struct lq_chat_prompt *prompt) {
    for (size_t i = 0; i < prompt->n_segments; i++) free(prompt->segments[i].text);
    free(prompt->segments);
    memset(prompt, 0, sizeof *prompt);
}

/* The id of a piece written exactly so, or -1. */
static int find_piece(const struct lq_tokenizer *tokenizer, const char *piece) {
    int vocab = lq_tokenizer_vocab_size(tokenizer);
    for (int id = 0; id < vocab; id++) {
        const char *text = lq_tokenizer_piece(tokenizer, id);
        if (text && strcmp(text, piece) == 0) return id;
    }
    return -1;
}

struct id_list {
    int *ids;
    size_t count, capacity;
};

static int append_ids(struct id_list *list, const int *ids, size_t count) {
    if (list->count + count > list->capacity) {
        size_t capacity = (list->count + count) * 2 + 16;
        int *grown = realloc(list->ids, capacity * sizeof *grown);
        if (!grown) return LQ_ENOMEM;
        list->ids = grown, list->capacity = capacity;
    }
    memcpy(list->ids + list->count, ids, count * sizeof *ids);
    list->count += count;
    return LQ_OK;
}

/* Encodes pending text (if any) and empties it. */
static int flush_text(const struct lq_tokenizer *tokenizer, char **text, size_t *length,
                      struct id_list *list, struct lq_error *err) {
    if (*length == 0) return LQ_OK;
    int *ids = NULL;
    size_t count = 0;
    int rc = lq_tokenizer_encode(tokenizer, *text, *length, 0, &ids, &count, err);
    if (!rc) rc = append_ids(list, ids, count);
    free(ids);
    *length = 0;
    return rc;
}

int lq_chat_tokenize(const struct lq_tokenizer *tokenizer, const struct lq_chat_prompt *prompt,
                     int **ids, size_t *count, struct lq_error *err) {
    struct id_list list = {0};
    char *text = NULL;
    size_t length = 0, capacity = 0;
    int rc = LQ_OK;
    for (size_t i = 0; i < prompt->n_segments && !rc; i++) {
        const struct lq_chat_segment *s = &prompt->segments[i];
        int id = -1;
        if (s->kind == LQ_SEGMENT_BOS) id = lq_tokenizer_bos_id(tokenizer);
        if (s->kind == LQ_SEGMENT_EOS) id = lq_tokenizer_eos_id(tokenizer);
        if (s->kind == LQ_SEGMENT_SPECIAL) id = find_piece(tokenizer, s->text);
        if (id >= 0) {
            if (!(rc = flush_text(tokenizer, &text, &length, &list, err)))
                rc = append_ids(&list, &id, 1);
            continue;
        }
        if (s->kind == LQ_SEGMENT_BOS || s->kind == LQ_SEGMENT_EOS) continue;
        size_t add = strlen(s->text); /* text, or a special piece the vocabulary lacks */
        if (length + add + 1 > capacity) {
            capacity = (length + add + 1) * 2;
            char *grown = realloc(text, capacity);
            if (!grown) {
                rc = LQ_ENOMEM;
                break;
            }
            text = grown;
        }
        memcpy(text + length, s->text, add);
        length += add;
    }
    if (!rc) rc = flush_text(tokenizer, &text, &length, &list, err);
    free(text);
    if (rc) {
        free(list.ids);
        if (rc == LQ_ENOMEM) lq_error_set(err, rc, "out of memory");
        return rc;
    }
    *ids = list.ids;
    *count = list.count;
    return LQ_OK;
}
