/* Chat templates (core/chat_template.h): the default system message a ChatML template inserts
 * when a conversation does not open with one, found in SmolLM2's and Qwen2.5's real templates
 * and refused in look-alikes, and rendered for serving and training exactly as a given system
 * message. tests/peer/test_chat_template_peer.py checks the same renders against jinja2. */
#include "core/chat_template.h"

#include "lq_test.h"

/* SmolLM2-135M-Instruct's tokenizer.chat_template (its GGUF file's): real newlines in the
 * inserted literal. */
static const char smollm2_template[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\\n' }}{% endif %}";
static const char smollm2_default[] =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/* Qwen2.5-Instruct's chat_template (tokenizer_config.json, JSON-decoded): Jinja's \n escapes in
 * its literals; the default sits in the {% else %} of a messages[0] == 'system' test, after a
 * tools branch whose system literals are concatenations. */
static const char qwen25_template[] =
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}"
    "\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the use"
    "r query.\\n\\nYou are provided with function signatures within <tools></tools> XML tag"
    "s:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function "
    "name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name"
    "\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>"
    "\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a he"
    "lpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.firs"
    "t) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '"
    "\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n";
static const char qwen25_default[] =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

/* The prompt's text: BOS as "<s>", EOS as "</s>", special pieces as their text. */
static void flatten(const struct lq_chat_prompt *p, char *out, size_t size) {
    size_t at = 0;
    out[0] = '\0';
    for (size_t i = 0; i < p->n_segments; i++) {
        const char *s = p->segments[i].kind == LQ_SEGMENT_BOS   ? "<s>"
                        : p->segments[i].kind == LQ_SEGMENT_EOS ? "</s>"
                                                                : p->segments[i].text;
        at += (size_t)snprintf(out + at, size - at, "%s", s);
        if (at >= size) at = size - 1;
    }
}

/* The text of the trainable segments, in order. */
static void flatten_trainable(const struct lq_chat_prompt *p, char *out, size_t size) {
    size_t at = 0;
    out[0] = '\0';
    for (size_t i = 0; i < p->n_segments; i++) {
        if (!p->segments[i].trainable || !p->segments[i].text) continue;
        at += (size_t)snprintf(out + at, size - at, "%s|", p->segments[i].text);
        if (at >= size) at = size - 1;
    }
}

static void check_detects(const char *template, const char *expected) {
    struct lq_chat_style style;
    CHECK_OK(lq_chat_style_detect(template, &style));
    CHECK(style.format == LQ_CHAT_CHATML);
    CHECK(lq_chat_format_detect(template) == LQ_CHAT_CHATML);
    CHECK_MSG(style.default_system && strcmp(style.default_system, expected) == 0,
              "default system '%s', expected '%s'",
              style.default_system ? style.default_system : "(none)", expected);
    lq_chat_style_free(&style);
    CHECK(style.default_system == NULL);
}

static void check_no_default(const char *template, enum lq_chat_format format) {
    struct lq_chat_style style;
    CHECK_OK(lq_chat_style_detect(template, &style));
    CHECK(style.format == format);
    CHECK_MSG(style.default_system == NULL, "'%s' found in '%s'", style.default_system,
              template ? template : "(null)");
    lq_chat_style_free(&style);
}

static void test_detect_default_system(void) {
    check_detects(smollm2_template, smollm2_default);
    check_detects(qwen25_template, qwen25_default);
    /* Raw template text (no expression) in an if on the role: found too. */
    check_detects("{% if messages[0].role != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
                  "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}...{% endfor %}",
                  "Be brief.");
}

static void test_detect_refusals(void) {
    check_no_default(NULL, LQ_CHAT_PLAIN);
    check_no_default("{{ m['content'] }}", LQ_CHAT_PLAIN);
    /* A plain ChatML template: no system literal at all. */
    check_no_default("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] "
                     "+ '<|im_end|>\\n'}}{% endfor %}",
                     LQ_CHAT_CHATML);
    /* Not conditional: always inserted, whatever the first message (not a default). */
    check_no_default("{{ '<|im_start|>system\\nAlways.<|im_end|>\\n' }}{% for m in messages %}"
                     "{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
                     "{% endfor %}",
                     LQ_CHAT_CHATML);
    /* Conditional on something else. */
    check_no_default("{% if add_generation_prompt %}{{ '<|im_start|>system\\nNo.<|im_end|>' }}"
                     "{% endif %}",
                     LQ_CHAT_CHATML);
    /* The if branch of == 'system' is where a given system message goes, not a default. */
    check_no_default("{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\nNo."
                     "<|im_end|>' }}{% endif %}",
                     LQ_CHAT_CHATML);
    /* An or: the branch may be taken with a system message first. */
    check_no_default("{% if messages[0]['role'] != 'system' or x %}{{ '<|im_start|>system\\nNo."
                     "<|im_end|>' }}{% endif %}",
                     LQ_CHAT_CHATML);
    /* The system text built from Jinja, concatenated or quoted: not one literal. */
    check_no_default("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n' + "
                     "default + '<|im_end|>' }}{% endif %}",
                     LQ_CHAT_CHATML);
    check_no_default("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nIt{{ x }}"
                     "<|im_end|>' }}{% endif %}",
                     LQ_CHAT_CHATML);
    check_no_default("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nIt\\'s."
                     "<|im_end|>' }}{% endif %}",
                     LQ_CHAT_CHATML);
    /* An empty default and a literal inside a {% set %}: none. */
    check_no_default("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
                     "<|im_end|>' }}{% endif %}",
                     LQ_CHAT_CHATML);
    check_no_default("{% if messages[0]['role'] != 'system' %}{% set s = '<|im_start|>system\\nX"
                     "<|im_end|>' %}{% endif %}",
                     LQ_CHAT_CHATML);
    /* Closed before the literal: the if no longer governs it. */
    check_no_default("{% if messages[0]['role'] != 'system' %}{% endif %}{{ '<|im_start|>system"
                     "\\nNo.<|im_end|>' }}",
                     LQ_CHAT_CHATML);
    /* Other formats never get one. */
    check_no_default("{% if messages[0]['role'] != 'system' %}<|start_header_id|>system"
                     "<|end_header_id|>{% endif %}",
                     LQ_CHAT_LLAMA3);
}

static void test_render_with_default(void) {
    struct lq_chat_style style;
    CHECK_OK(lq_chat_style_detect(smollm2_template, &style));
    static char text[4096], given[4096];
    struct lq_chat_prompt p;
    const struct lq_chat_message user[] = {{LQ_ROLE_USER, "Hi"}};
    CHECK_OK(lq_chat_render(&style, user, 1, &p));
    flatten(&p, text, sizeof text);
    CHECK_MSG(strcmp(text, "<s><|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                           "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\n") == 0,
              "serving render: '%s'", text);
    CHECK(p.stop && strcmp(p.stop, "<|im_end|>") == 0);
    lq_chat_prompt_free(&p);

    /* Inserted exactly as the same system message given by the caller renders. */
    const struct lq_chat_message with_system[] = {{LQ_ROLE_SYSTEM, (char *)smollm2_default},
                                                  {LQ_ROLE_USER, "Hi"}};
    const struct lq_chat_style chatml = {LQ_CHAT_CHATML, NULL};
    CHECK_OK(lq_chat_render(&chatml, with_system, 2, &p));
    flatten(&p, given, sizeof given);
    CHECK_MSG(strcmp(text, given) == 0, "'%s' != '%s'", text, given);
    lq_chat_prompt_free(&p);

    /* A leading system message of the caller's replaces the default. */
    const struct lq_chat_message own[] = {{LQ_ROLE_SYSTEM, "Be brief."}, {LQ_ROLE_USER, "Hi"}};
    CHECK_OK(lq_chat_render(&style, own, 2, &p));
    flatten(&p, text, sizeof text);
    CHECK_MSG(strcmp(text, "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                           "<|im_end|>\n<|im_start|>assistant\n") == 0,
              "own system: '%s'", text);
    lq_chat_prompt_free(&p);

    /* A later system message does not count: the default still goes first. */
    const struct lq_chat_message later[] = {{LQ_ROLE_USER, "Hi"}, {LQ_ROLE_SYSTEM, "Late."}};
    CHECK_OK(lq_chat_render(&style, later, 2, &p));
    flatten(&p, text, sizeof text);
    static const char opening[] = "<s><|im_start|>system\nYou are a helpful";
    CHECK(strncmp(text, opening, strlen(opening)) == 0);
    CHECK(strstr(text, "<|im_start|>system\nLate.<|im_end|>\n") != NULL);
    lq_chat_prompt_free(&p);

    /* A last assistant message is continued after the default too. */
    const struct lq_chat_message continued[] = {{LQ_ROLE_USER, "Hi"}, {LQ_ROLE_ASSISTANT, "Hello"}};
    CHECK_OK(lq_chat_render(&style, continued, 2, &p));
    flatten(&p, text, sizeof text);
    CHECK_MSG(strcmp(text, "<s><|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                           "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\nHello") == 0,
              "continued: '%s'", text);
    lq_chat_prompt_free(&p);
    lq_chat_style_free(&style);
}

/* Training inserts the same bytes, never trains on them, and keeps each message's trained flag
 * on that message. */
static void test_training_with_default(void) {
    struct lq_chat_style style;
    CHECK_OK(lq_chat_style_detect(qwen25_template, &style));
    const struct lq_chat_message m[] = {{LQ_ROLE_USER, "Q1"},
                                        {LQ_ROLE_ASSISTANT, "A1"},
                                        {LQ_ROLE_USER, "Q2"},
                                        {LQ_ROLE_ASSISTANT, "A2"}};
    static char text[4096], serving[4096], trainable[256];
    struct lq_chat_prompt p, s;
    const unsigned char trained[] = {0, 0, 0, 1};
    CHECK_OK(lq_chat_render_training(&style, m, 4, trained, &p));
    flatten(&p, text, sizeof text);
    CHECK_MSG(strcmp(text, "<s><|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are "
                           "a helpful assistant.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                           "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                           "<|im_start|>assistant\nA2<|im_end|>\n") == 0,
              "training render: '%s'", text);
    flatten_trainable(&p, trainable, sizeof trainable);
    CHECK_MSG(strcmp(trainable, "A2|<|im_end|>|") == 0, "trainable: '%s'", trainable);
    lq_chat_prompt_free(&p);
    /* Every assistant message trained (trained NULL). */
    CHECK_OK(lq_chat_render_training(&style, m, 4, NULL, &p));
    flatten_trainable(&p, trainable, sizeof trainable);
    CHECK_MSG(strcmp(trainable, "A1|<|im_end|>|A2|<|im_end|>|") == 0, "trainable: '%s'", trainable);
    /* The serving render of the messages before each answer is a prefix of the training one. */
    flatten(&p, text, sizeof text);
    for (size_t answer = 1; answer < 4; answer += 2) {
        CHECK_OK(lq_chat_render(&style, m, answer, &s));
        flatten(&s, serving, sizeof serving);
        CHECK_MSG(strncmp(text, serving, strlen(serving)) == 0, "turn %zu: '%s'", answer, serving);
        lq_chat_prompt_free(&s);
    }
    lq_chat_prompt_free(&p);
    lq_chat_style_free(&style);
}

/* No style (NULL) renders plain; n = 0 is refused with a default too. */
static void test_edges(void) {
    struct lq_chat_prompt p;
    const struct lq_chat_message user[] = {{LQ_ROLE_USER, "Hi"}};
    static char text[256];
    CHECK_OK(lq_chat_render(NULL, user, 1, &p));
    flatten(&p, text, sizeof text);
    CHECK_MSG(strcmp(text, "<s>User: Hi\nAssistant:") == 0, "plain: '%s'", text);
    lq_chat_prompt_free(&p);
    char system[] = "S";
    const struct lq_chat_style style = {LQ_CHAT_CHATML, system};
    CHECK(lq_chat_render(&style, user, 0, &p) == LQ_EINVAL);
    CHECK(lq_chat_render_training(&style, user, 0, NULL, &p) == LQ_EINVAL);
}

LQ_TEST_MAIN(LQ_TEST(test_detect_default_system), LQ_TEST(test_detect_refusals),
             LQ_TEST(test_render_with_default), LQ_TEST(test_training_with_default),
             LQ_TEST(test_edges))
