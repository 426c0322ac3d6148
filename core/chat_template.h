/* Chat templates: a conversation turned into prompt tokens. lqd does not run Jinja; it
 * recognises the template a model's tokenizer_config.json (or, without one, a GGUF file's
 * tokenizer.chat_template) carries and renders the matching format itself:
 *   ChatML   (the template mentions <|im_start|>):
 *            <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
 *   Llama-2  (the template mentions [INST]):
 *            <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] ...
 *   Llama-3  (the template mentions <|start_header_id|>):
 *            <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
 *            ... <|start_header_id|>assistant<|end_header_id|>\n\n
 *   plain    (no template, or one not recognised; the documented default):
 *            <s>{system}\n\nUser: {user}\nAssistant: {assistant}\n ... Assistant:
 * Special pieces (<|im_start|>, <|eot_id|>, <s>, </s>) become their token ids when the
 * vocabulary has them, never text a user could type. A conversation that ends with an assistant
 * message is continued rather than answered.
 *
 * Some ChatML templates (SmolLM2's, Qwen2.5's) insert a default system message when the
 * conversation does not open with one; lq_chat_style_detect finds its text, and both renders
 * then put it first, exactly as a given system message is rendered.
 *
 * Serving (lq_chat_render) and training (lq_chat_render_training, used by core/dataset.h)
 * render the same bytes before every assistant message, so a model finetuned on conversations
 * sees at serving time exactly the prompt it was trained on. */
#ifndef LQ_CHAT_TEMPLATE_H
#define LQ_CHAT_TEMPLATE_H

#include <stddef.h>

#include "core/error.h"
#include "core/tokenizer.h"

enum lq_chat_role { LQ_ROLE_SYSTEM, LQ_ROLE_USER, LQ_ROLE_ASSISTANT };

struct lq_chat_message {
    enum lq_chat_role role;
    char *content; /* text parts joined; "" for null content */
};

enum lq_chat_format { LQ_CHAT_PLAIN, LQ_CHAT_CHATML, LQ_CHAT_LLAMA2, LQ_CHAT_LLAMA3 };

/* The format a tokenizer_config.json chat_template asks for (NULL: plain). */
enum lq_chat_format lq_chat_format_detect(const char *chat_template);
const char *
lq_chat_format_name(enum lq_chat_format format); /* "plain", "chatml", "llama2", "llama3" */

/* How a model's template renders conversations: its format, and the system message it inserts
 * when the first message is not a system message (or NULL). */
struct lq_chat_style {
    enum lq_chat_format format;
    char *default_system; /* owned */
};

/* The style of chat_template (NULL: plain, no default). A default system message is the TEXT
 * of a literal "<|im_start|>system\n" TEXT "<|im_end|>" (the newline real or Jinja's \n escape)
 * with no Jinja, quote, concatenation or escape in TEXT, inside an {% if %} branch taken only
 * when messages[0] is not a system message. Free with lq_chat_style_free. 0 or LQ_ENOMEM. */
int lq_chat_style_detect(const char *chat_template, struct lq_chat_style *out);
void lq_chat_style_free(struct lq_chat_style *style);

enum lq_chat_segment_kind { LQ_SEGMENT_TEXT, LQ_SEGMENT_BOS, LQ_SEGMENT_EOS, LQ_SEGMENT_SPECIAL };

struct lq_chat_segment {
    enum lq_chat_segment_kind kind;
    char *text;    /* TEXT: the text; SPECIAL: the piece ("<|im_start|>"); else NULL */
    int trainable; /* training renders: its tokens are loss targets (lq_chat_tokenize_masked) */
};

/* A rendered conversation, before tokenization. */
struct lq_chat_prompt {
    struct lq_chat_segment *segments;
    size_t n_segments, capacity;
    const char *stop; /* a stop string the format implies ("<|im_end|>", "\nUser:"), or NULL */
};

/* Renders messages[0..n) in style (borrowed; NULL: plain), for generation: ends with the
 * assistant's opening (or continues a last assistant message); the style's default system
 * message first when messages[0] is not a system message. 0 or LQ_ENOMEM (LQ_EINVAL for
 * n = 0). */
int lq_chat_render(const struct lq_chat_style *style, const struct lq_chat_message *messages,
                   size_t n, struct lq_chat_prompt *out);
/* Renders messages[0..n) for training (default system message as lq_chat_render): every message
 * closed as history is (no generation prompt; a last assistant message gets its end marker too),
 * and the content and end marker of each trained assistant message trainable. End markers: ChatML
 * <|im_end|>, Llama-2 " </s>", Llama-3 <|eot_id|>, plain "\n" (and EOS after a last assistant
 * message, since plain has no end token). trained[i] (NULL: every assistant message) says whether
 * message i is trained on; ignored for other roles. The bytes before each assistant content equal
 * lq_chat_render of the messages before it. 0 or LQ_ENOMEM (LQ_EINVAL for n = 0). */
int lq_chat_render_training(const struct lq_chat_style *style,
                            const struct lq_chat_message *messages, size_t n,
                            const unsigned char *trained, struct lq_chat_prompt *out);
/* Appends one segment (text copied; NULL for BOS and EOS). 0 or LQ_ENOMEM. */
int lq_chat_prompt_append(struct lq_chat_prompt *prompt, enum lq_chat_segment_kind kind,
                          const char *text, int trainable);
void lq_chat_prompt_free(struct lq_chat_prompt *prompt);

/* Token ids of a rendered prompt: text encoded as the tokenizer does (adjacent text merged),
 * BOS/EOS as the tokenizer's ids (left out when it has none; BOS also when the tokenizer adds
 * none to a text, as SmolLM2's, whose BOS is <|im_start|>), special pieces as their id, or
 * as text when the vocabulary lacks them. *ids malloc'ed. */
int lq_chat_tokenize(const struct lq_tokenizer *tokenizer, const struct lq_chat_prompt *prompt,
                     int **ids, size_t *count, struct lq_error *err);
/* The same ids, and mask[i] = 1 when token i is a loss target (*mask malloc'ed). A BOS, EOS
 * or special token takes its segment's flag. Within merged text, a trainable span [a, b) covers
 * the tokens from the first one that the text before a, tokenized alone, does not produce, up
 * to the last one that the text before b alone does produce: what a server that tokenizes the
 * prompt alone needs the model to generate. */
int lq_chat_tokenize_masked(const struct lq_tokenizer *tokenizer,
                            const struct lq_chat_prompt *prompt, int **ids, unsigned char **mask,
                            size_t *count, struct lq_error *err);

#endif
