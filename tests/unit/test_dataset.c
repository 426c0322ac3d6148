/* Training datasets (core/dataset.h) with stories260K's real tokenizer (llama2.c .bin and HF
 * tokenizer.json) on small files in a temporary directory: every document is BOS + the
 * tokenizer's own ids + EOS; the loss mask of a prompt-completion document starts at the first
 * token the prompt alone does not produce; a chat document's untrained tokens before each
 * answer are the very ids the server feeds for that turn (plain, Llama-2 and ChatML, the last
 * with <|im_start|>/<|im_end|> added to the vocabulary as special tokens), its end markers are
 * targets, weight 0 turns are not; the seeded validation split; format detection; and the
 * errors, each naming the file and line. */
#include "core/dataset.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/unit/lq_test.h"

static char temp_dir[] = "/tmp/lq-dataset-test-XXXXXX";
static char created[64][4200];
static int n_created;

static void cleanup(void) {
    DIR *dir = opendir(temp_dir);
    struct dirent *entry;
    char path[4400];
    while (dir && (entry = readdir(dir)))
        if (entry->d_name[0] != '.') {
            snprintf(path, sizeof path, "%s/%s", temp_dir, entry->d_name);
            unlink(path);
        }
    if (dir) closedir(dir);
    rmdir(temp_dir);
}

/* The temporary directory, made on first use and removed at exit. */
static void ensure_temp_dir(void) {
    static int made;
    if (made) return;
    if (!mkdtemp(temp_dir)) {
        perror("mkdtemp");
        exit(1);
    }
    made = 1;
    atexit(cleanup);
}

static const char *repo_root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

/* Writes bytes to temp_dir/name; returns the path (static storage, one per file). */
static const char *write_bytes(const char *name, const char *bytes, size_t length) {
    ensure_temp_dir();
    char *path = created[n_created++ % 64];
    snprintf(path, 4200, "%s/%s", temp_dir, name);
    FILE *file = fopen(path, "wb");
    if (!file) return path;
    fwrite(bytes, 1, length, file);
    fclose(file);
    return path;
}

static const char *write_text(const char *name, const char *text) {
    return write_bytes(name, text, strlen(text));
}

static struct lq_tokenizer *load_tokenizer(const char *relative) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", repo_root(), relative);
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_error err = {0};
    if (lq_tokenizer_load(path, &tokenizer, &err)) {
        fprintf(stderr, "cannot load %s: %s\n", path, err.message);
        lq_test_failures++;
    }
    return tokenizer;
}

static struct lq_tokenizer *stories_tokenizer(void) {
    return load_tokenizer("models/stories260K-hf/tokenizer.bin");
}

/* stories260K's tokenizer.json with <|im_start|> and <|im_end|> added as special tokens (512,
 * 513), as ChatML models have them. */
/* tok512.json with special pieces added at ids 512, 513, ... */
static struct lq_tokenizer *special_tokenizer(const char *name, const char *const *specials,
                                              int n_specials) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/unit/data/tok512.json", repo_root());
    FILE *file = fopen(path, "rb");
    if (!file) {
        CHECK(!"tok512.json is readable");
        return NULL;
    }
    static char text[1 << 16];
    size_t length = fread(text, 1, sizeof text - 1, file);
    fclose(file);
    text[length] = '\0';
    cJSON *root = cJSON_Parse(text);
    cJSON *vocab = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "model"), "vocab");
    cJSON *added = cJSON_GetObjectItem(root, "added_tokens");
    for (int i = 0; i < n_specials; i++) {
        cJSON_AddNumberToObject(vocab, specials[i], 512 + i);
        cJSON *token = cJSON_CreateObject();
        cJSON_AddNumberToObject(token, "id", 512 + i);
        cJSON_AddStringToObject(token, "content", specials[i]);
        cJSON_AddBoolToObject(token, "special", 1);
        cJSON_AddItemToArray(added, token);
    }
    char *printed = cJSON_PrintUnformatted(root);
    const char *written = write_text(name, printed);
    cJSON_free(printed);
    cJSON_Delete(root);
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_error err = {0};
    if (lq_tokenizer_load(written, &tokenizer, &err)) {
        fprintf(stderr, "%s: %s\n", name, err.message);
        lq_test_failures++;
    }
    return tokenizer;
}

static struct lq_tokenizer *chatml_tokenizer(void) {
    const char *const specials[] = {"<|im_start|>", "<|im_end|>"};
    return special_tokenizer("chatml-tokenizer.json", specials, 2);
}

static struct lq_tokenizer *llama3_tokenizer(void) {
    const char *const specials[] = {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"};
    return special_tokenizer("llama3-tokenizer.json", specials, 3);
}

static int *encode(const struct lq_tokenizer *t, const char *text, int bos, size_t *count) {
    int *ids = NULL;
    CHECK_OK(lq_tokenizer_encode(t, text, strlen(text), bos, &ids, count, NULL));
    return ids;
}

/* Loads path with options (NULL: defaults), expecting success. */
static struct lq_dataset *load(const char *path, const struct lq_tokenizer *t,
                               const struct lq_dataset_options *options) {
    struct lq_dataset *train = NULL;
    struct lq_error err = {0};
    int rc = lq_dataset_load(path, t, options, &train, NULL, &err);
    CHECK_MSG(rc == 0 && train, "%s: %s", path, err.message);
    return train;
}

/* Expects loading (and, when validate, validating) to fail with exactly message. */
static void expect_error(const char *path, const char *label, enum lq_dataset_format format,
                         const char *message, int validate) {
    struct lq_tokenizer *t = stories_tokenizer();
    struct lq_dataset_options options;
    lq_dataset_options_default(&options);
    options.format = format, options.label = label;
    struct lq_dataset *train = NULL;
    struct lq_error err = {0};
    int rc = lq_dataset_load(path, t, &options, &train, NULL, &err);
    CHECK_MSG(rc == LQ_EFORMAT && train == NULL, "%s: load returned %d", label, rc);
    CHECK_MSG(strcmp(err.message, message) == 0, "load: got '%s', expected '%s'", err.message,
              message);
    if (validate) {
        struct lq_error verr = {0};
        rc = lq_dataset_validate(path, label, format, NULL, &verr);
        CHECK_MSG(rc == LQ_EFORMAT && strcmp(verr.message, message) == 0,
                  "validate: %d '%s', expected '%s'", rc, verr.message, message);
    }
    lq_tokenizer_free(t);
}

/* ---------- plain text and {"text"} ---------- */

static const char *const paragraphs[] = {
    "Once upon a time, there was a little girl named Lily.\nShe loved to play outside.",
    "One day, she saw a big red ball in the park.",
    "Tom said: \"Let's play!\"\nThey played all day.\nThe end."};

/* Every document is BOS + encode(text) + EOS, BOS untrained and everything else a target. */
static void check_whole_documents(const struct lq_dataset *d, const struct lq_tokenizer *t,
                                  const unsigned long *lines) {
    size_t total = 0, targets = 0, longest = 0;
    for (size_t i = 0; i < d->n_documents && i < 3; i++) {
        const struct lq_dataset_document *doc = &d->documents[i];
        size_t n = 0;
        int *ids = encode(t, paragraphs[i], 1, &n);
        CHECK(doc->n_tokens == n + 1);
        CHECK(doc->n_tokens == n + 1 && memcmp(doc->tokens, ids, n * sizeof *ids) == 0);
        CHECK(doc->tokens[0] == lq_tokenizer_bos_id(t));
        CHECK(doc->tokens[doc->n_tokens - 1] == lq_tokenizer_eos_id(t));
        CHECK(doc->mask[0] == 0);
        for (size_t k = 1; k < doc->n_tokens; k++) CHECK(doc->mask[k] == 1);
        CHECK(doc->n_targets == doc->n_tokens - 1);
        CHECK_MSG(doc->line == lines[i], "document %zu at line %lu", i, doc->line);
        total += doc->n_tokens, targets += doc->n_targets;
        if (doc->n_tokens > longest) longest = doc->n_tokens;
        free(ids);
    }
    CHECK(d->n_documents == 3);
    CHECK(d->n_tokens == total && d->n_targets == targets && d->max_tokens == longest);
}

static void test_plain_text(void) {
    struct lq_tokenizer *t = stories_tokenizer();
    /* Blank lines of spaces, tabs and CR separate documents; CRLF reads as LF; leading and
     * repeated blank lines make no empty document. */
    char text[1024];
    snprintf(text, sizeof text,
             "\n  \n"
             "Once upon a time, there was a little girl named Lily.\r\nShe loved to play "
             "outside.\r\n"
             "\t\r\n\n"
             "One day, she saw a big red ball in the park.\n"
             "\n"
             "Tom said: \"Let's play!\"\nThey played all day.\nThe end.");
    const char *path = write_text("stories.txt", text);
    struct lq_dataset *d = load(path, t, NULL);
    const unsigned long lines[] = {3, 7, 9};
    if (d) {
        CHECK(d->format == LQ_DATASET_PLAIN);
        check_whole_documents(d, t, lines);
    }
    lq_dataset_free(d);
    /* Without BOS and EOS: the tokenizer's ids alone, the first untrained. */
    struct lq_dataset_options options;
    lq_dataset_options_default(&options);
    options.add_bos = options.add_eos = 0;
    d = load(path, t, &options);
    size_t n = 0;
    int *ids = encode(t, paragraphs[1], 0, &n);
    if (d && d->n_documents == 3) {
        CHECK(d->documents[1].n_tokens == n &&
              memcmp(d->documents[1].tokens, ids, n * sizeof *ids) == 0);
        CHECK(d->documents[1].mask[0] == 0 && d->documents[1].n_targets == n - 1);
    }
    free(ids);
    lq_dataset_free(d);
    struct lq_dataset_summary summary;
    CHECK_OK(lq_dataset_validate(path, NULL, LQ_DATASET_AUTO, &summary, NULL));
    CHECK(summary.format == LQ_DATASET_PLAIN && summary.n_documents == 3 && summary.n_lines == 11);
    lq_tokenizer_free(t);
}

static void test_jsonl_text(void) {
    struct lq_tokenizer *t = stories_tokenizer();
    char text[2048] = "";
    for (int i = 0; i < 3; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "text", paragraphs[i]);
        cJSON_AddStringToObject(o, "source", "ignored"); /* other keys are ignored */
        char *line = cJSON_PrintUnformatted(o);
        strcat(text, line);
        strcat(text, i == 0 ? "\n\n" : "\n"); /* a blank line between JSON lines is skipped */
        cJSON_free(line);
        cJSON_Delete(o);
    }
    const unsigned long lines[] = {1, 3, 4};
    /* The same documents from .jsonl, from a file with no extension (sniffed), and through the
     * HF tokenizer.json of the same vocabulary. */
    const char *paths[] = {write_text("stories.jsonl", text), write_text("stories", text)};
    struct lq_tokenizer *json = load_tokenizer("tests/unit/data/tok512.json");
    for (int k = 0; k < 3; k++) {
        struct lq_tokenizer *use = k == 2 ? json : t;
        struct lq_dataset *d = load(paths[k == 1], use, NULL);
        if (d) {
            CHECK(d->format == LQ_DATASET_TEXT);
            check_whole_documents(d, use, lines);
        }
        lq_dataset_free(d);
    }
    lq_tokenizer_free(json);
    lq_tokenizer_free(t);
}

/* ---------- prompt-completion ---------- */

/* The mask starts at the first token that encode(prompt) does not share, and ends with EOS. */
static void check_completion(const struct lq_tokenizer *t, const char *prompt,
                             const char *completion, size_t expected_start) {
    char line[1024], joined[512];
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "prompt", prompt);
    cJSON_AddStringToObject(o, "completion", completion);
    char *printed = cJSON_PrintUnformatted(o);
    snprintf(line, sizeof line, "%s\n", printed);
    cJSON_free(printed);
    cJSON_Delete(o);
    struct lq_dataset *d = load(write_text("completion.jsonl", line), t, NULL);
    snprintf(joined, sizeof joined, "%s%s", prompt, completion);
    size_t n_all = 0, n_prompt = 0;
    int *all = encode(t, joined, 1, &n_all), *alone = encode(t, prompt, 1, &n_prompt);
    if (d && d->n_documents == 1) {
        const struct lq_dataset_document *doc = &d->documents[0];
        CHECK(d->format == LQ_DATASET_PROMPT_COMPLETION);
        /* The ids are those of the whole text, then EOS. */
        CHECK(doc->n_tokens == n_all + 1 && memcmp(doc->tokens, all, n_all * sizeof *all) == 0);
        CHECK(doc->tokens[n_all] == lq_tokenizer_eos_id(t) && doc->mask[n_all] == 1);
        size_t start = 0;
        while (start < doc->n_tokens && !doc->mask[start]) start++;
        CHECK_MSG(start == expected_start, "'%s' + '%s': targets from %zu, expected %zu", prompt,
                  completion, start, expected_start);
        for (size_t k = start; k < doc->n_tokens; k++) CHECK(doc->mask[k] == 1);
        /* Untrained: what the prompt alone tokenizes to; the first target is not. */
        CHECK(start <= n_prompt && memcmp(doc->tokens, alone, start * sizeof *alone) == 0);
        CHECK(start == n_prompt || doc->tokens[start] != alone[start]);
        char *text = NULL;
        CHECK_OK(lq_tokenizer_decode(t, doc->tokens, n_all, &text, NULL));
        CHECK(text && strcmp(text, joined) == 0);
        free(text);
    }
    free(all);
    free(alone);
    lq_dataset_free(d);
}

static void test_prompt_completion(void) {
    struct lq_tokenizer *t = stories_tokenizer();
    size_t n_prompt = 0;
    free(encode(t, "Once upon a time,", 1, &n_prompt));
    /* A clean boundary (" there" starts a piece): the completion's tokens exactly. */
    check_completion(t, "Once upon a time,", " there was a little girl named Lily.", n_prompt);
    /* A boundary inside a word: "▁time" straddles it, so it is a target (the server, given
     * "Once upon a ti", has to produce it), and nothing before it is. */
    size_t n_straddle = 0;
    int *ids = encode(t, "Once upon a time,", 1, &n_straddle);
    size_t n_cut = 0;
    int *cut = encode(t, "Once upon a ti", 1, &n_cut);
    size_t shared = 0;
    while (shared < n_cut && shared < n_straddle && ids[shared] == cut[shared]) shared++;
    CHECK(shared < n_cut); /* the cut really changes the tokenization */
    check_completion(t, "Once upon a ti", "me, there was a little girl named Lily.", shared);
    free(ids);
    free(cut);
    /* An empty prompt: everything after BOS is a target. */
    check_completion(t, "", "Lily loved the park.", 1);
    lq_tokenizer_free(t);
}

/* ---------- chat ---------- */

static const char chat_line[] =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"You tell stories.\"},"
    " {\"role\": \"user\", \"content\": \"Who is Lily?\"},"
    " {\"role\": \"assistant\", \"content\": \"Lily is a little girl.\"},"
    " {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"What does \"},"
    "                                    {\"type\": \"text\", \"text\": \"she like?\"}]},"
    " {\"role\": \"assistant\", \"content\": \"She likes the park.\", \"weight\": %d}]}\n";

static const struct lq_chat_message chat_messages[] = {
    {LQ_ROLE_SYSTEM, "You tell stories."},
    {LQ_ROLE_USER, "Who is Lily?"},
    {LQ_ROLE_ASSISTANT, "Lily is a little girl."},
    {LQ_ROLE_USER, "What does she like?"},
    {LQ_ROLE_ASSISTANT, "She likes the park."}};

/* The text of a rendered prompt with BOS (as bos), EOS and special pieces spelled out. */
static void flatten_as(const struct lq_chat_prompt *p, const char *bos, char *out, size_t size) {
    size_t at = 0;
    out[0] = '\0';
    for (size_t i = 0; i < p->n_segments; i++) {
        const char *s = p->segments[i].kind == LQ_SEGMENT_BOS   ? bos
                        : p->segments[i].kind == LQ_SEGMENT_EOS ? "</s>"
                                                                : p->segments[i].text;
        at += (size_t)snprintf(out + at, size - at, "%s", s);
        if (at >= size) at = size - 1;
    }
}

static void flatten(const struct lq_chat_prompt *p, char *out, size_t size) {
    flatten_as(p, "<s>", out, size);
}

/* For each format: the training render continues each turn's serving render byte for byte;
 * the ids before each trained answer's first target are the serving ids of that turn; the
 * answers' tokens and end markers are targets and nothing else is; weight 0 leaves a turn out. */
static void check_chat(const struct lq_tokenizer *t, enum lq_chat_format format,
                       const int *end_between, size_t n_between, const int *end_last,
                       size_t n_last) {
    const struct lq_chat_style style = {format, NULL};
    for (int weight = 1; weight >= 0; weight--) {
        char line[2048];
        snprintf(line, sizeof line, chat_line, weight);
        struct lq_dataset_options options;
        lq_dataset_options_default(&options);
        options.chat_style = &style;
        struct lq_dataset *d = load(write_text("chat.jsonl", line), t, &options);
        if (!d || d->n_documents != 1) {
            lq_dataset_free(d);
            continue;
        }
        CHECK(d->format == LQ_DATASET_CHAT);
        const struct lq_dataset_document *doc = &d->documents[0];
        struct lq_chat_prompt training;
        const unsigned char trained[] = {0, 0, 1, 0, (unsigned char)weight};
        CHECK_OK(lq_chat_render_training(&style, chat_messages, 5, trained, &training));
        int *ids = NULL;
        size_t count = 0;
        CHECK_OK(lq_chat_tokenize(t, &training, &ids, &count, NULL));
        CHECK(count == doc->n_tokens && memcmp(ids, doc->tokens, count * sizeof *ids) == 0);
        static char whole[4096], turn[4096];
        flatten(&training, whole, sizeof whole);
        size_t position = 0; /* where the next answer's targets begin */
        size_t runs = 0;
        for (size_t k = 0; k < doc->n_tokens; k++)
            runs += doc->mask[k] && (k == 0 || !doc->mask[k - 1]);
        CHECK_MSG(runs == (size_t)(1 + weight), "%s weight %d: %zu runs of targets",
                  lq_chat_format_name(format), weight, runs);
        for (size_t answer = 2; answer <= 4; answer += 2) {
            struct lq_chat_prompt serving;
            CHECK_OK(lq_chat_render(&style, chat_messages, answer, &serving));
            flatten(&serving, turn, sizeof turn);
            CHECK_MSG(strncmp(whole, turn, strlen(turn)) == 0, "%s: turn %zu is not a prefix",
                      lq_chat_format_name(format), answer);
            int *served = NULL;
            size_t n_served = 0;
            CHECK_OK(lq_chat_tokenize(t, &serving, &served, &n_served, NULL));
            lq_chat_prompt_free(&serving);
            if (answer == 4 && !weight) {
                for (size_t k = position; k < doc->n_tokens; k++) CHECK(doc->mask[k] == 0);
                free(served);
                break;
            }
            size_t start = position;
            while (start < doc->n_tokens && !doc->mask[start]) start++;
            CHECK(start <= n_served &&
                  memcmp(doc->tokens, served,
                         (start < n_served ? start : n_served) * sizeof *served) == 0);
            CHECK(start == n_served || doc->tokens[start] != served[start]);
            size_t end = start;
            while (end < doc->n_tokens && doc->mask[end]) end++;
            /* The run ends with the format's end marker. */
            const int *marker = answer == 4 ? end_last : end_between;
            size_t n_end = answer == 4 ? n_last : n_between;
            CHECK_MSG(end - start > n_end &&
                          memcmp(doc->tokens + end - n_end, marker, n_end * sizeof *marker) == 0,
                      "%s turn %zu: the targets end without the end marker",
                      lq_chat_format_name(format), answer);
            /* The answer's text is in its targets. */
            char *text = NULL;
            CHECK_OK(lq_tokenizer_decode(t, doc->tokens + start, end - start, &text, NULL));
            CHECK_MSG(text && strstr(text, chat_messages[answer].content),
                      "%s turn %zu targets decode to '%s'", lq_chat_format_name(format), answer,
                      text ? text : "");
            free(text);
            free(served);
            position = end;
        }
        free(ids);
        lq_chat_prompt_free(&training);
        lq_dataset_free(d);
    }
}

static void test_chat(void) {
    struct lq_tokenizer *t = stories_tokenizer();
    int eos = lq_tokenizer_eos_id(t);
    size_t n = 0;
    int *newline = encode(t, "\n", 0, &n); /* "▁" + "\n": the plain answer ends with "\n" */
    /* Plain: an answer ends with "\n", the last one with "\n" and EOS. */
    int plain_between[] = {newline[n - 1]}, plain_last[] = {newline[n - 1], eos};
    free(newline);
    check_chat(t, LQ_CHAT_PLAIN, plain_between, 1, plain_last, 2);
    /* Llama-2: " </s>" after every answer. */
    int llama_end[] = {eos};
    check_chat(t, LQ_CHAT_LLAMA2, llama_end, 1, llama_end, 1);
    lq_tokenizer_free(t);
    struct lq_tokenizer *chatml = chatml_tokenizer();
    if (chatml) {
        int im_end[] = {513};
        check_chat(chatml, LQ_CHAT_CHATML, im_end, 1, im_end, 1);
        /* The special pieces are their ids, never text. */
        char line[2048];
        snprintf(line, sizeof line, chat_line, 1);
        struct lq_dataset_options options;
        lq_dataset_options_default(&options);
        const struct lq_chat_style style = {LQ_CHAT_CHATML, NULL};
        options.chat_style = &style;
        struct lq_dataset *d = load(write_text("chat.jsonl", line), chatml, &options);
        size_t starts = 0, ends = 0, trained_ends = 0;
        for (size_t k = 0; d && k < d->documents[0].n_tokens; k++) {
            starts += d->documents[0].tokens[k] == 512;
            ends += d->documents[0].tokens[k] == 513;
            trained_ends += d->documents[0].tokens[k] == 513 && d->documents[0].mask[k];
        }
        CHECK(starts == 5 && ends == 5 && trained_ends == 2);
        lq_dataset_free(d);
        lq_tokenizer_free(chatml);
    }
    /* Plain: the conversation ends with EOS, a target. */
    t = stories_tokenizer();
    char line[2048];
    snprintf(line, sizeof line, chat_line, 1);
    struct lq_dataset *d = load(write_text("chat.jsonl", line), t, NULL);
    if (d) {
        const struct lq_dataset_document *doc = &d->documents[0];
        CHECK(doc->tokens[0] == lq_tokenizer_bos_id(t) && doc->mask[0] == 0);
        CHECK(doc->tokens[doc->n_tokens - 1] == eos && doc->mask[doc->n_tokens - 1] == 1);
    }
    lq_dataset_free(d);
    lq_tokenizer_free(t);
}

/* Llama 3: detected from the real template, rendered as it renders, trained like ChatML. */
static void test_llama3(void) {
    /* The chat_template of Meta-Llama-3-8B-Instruct's tokenizer_config.json. */
    static const char llama3_template[] =
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
        "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = "
        "bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
        "%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
    CHECK(lq_chat_format_detect(llama3_template) == LQ_CHAT_LLAMA3);
    const struct lq_chat_style llama3 = {LQ_CHAT_LLAMA3, NULL};
    CHECK(strcmp(lq_chat_format_name(LQ_CHAT_LLAMA3), "llama3") == 0);
    /* The other formats' templates still win their own detection. */
    CHECK(lq_chat_format_detect("{{ '<|im_start|>' + m['role'] }}") == LQ_CHAT_CHATML);
    CHECK(lq_chat_format_detect("{{ '[INST] ' + m['content'] }}") == LQ_CHAT_LLAMA2);
    CHECK(lq_chat_format_detect("{{ m['content'] }}") == LQ_CHAT_PLAIN);

    /* Serving: system, user, assistant answered by a new generation prompt after a user turn. */
    const struct lq_chat_message conversation[] = {{LQ_ROLE_SYSTEM, "You tell stories."},
                                                   {LQ_ROLE_USER, "Who is Lily?"},
                                                   {LQ_ROLE_ASSISTANT, "A girl."}};
    static char text[4096];
    struct lq_chat_prompt p;
    CHECK_OK(lq_chat_render(&llama3, conversation, 2, &p));
    flatten_as(&p, "<|begin_of_text|>", text, sizeof text);
    CHECK_MSG(strcmp(text,
                     "<|begin_of_text|>"
                     "<|start_header_id|>system<|end_header_id|>\n\nYou tell stories.<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\n\nWho is Lily?<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n") == 0,
              "llama3 serving render: '%s'", text);
    CHECK(p.stop && strcmp(p.stop, "<|eot_id|>") == 0);
    lq_chat_prompt_free(&p);
    /* The 3-message conversation: its last assistant message is continued. */
    CHECK_OK(lq_chat_render(&llama3, conversation, 3, &p));
    flatten_as(&p, "<|begin_of_text|>", text, sizeof text);
    CHECK_MSG(strcmp(text,
                     "<|begin_of_text|>"
                     "<|start_header_id|>system<|end_header_id|>\n\nYou tell stories.<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\n\nWho is Lily?<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\nA girl.") == 0,
              "llama3 continued render: '%s'", text);
    lq_chat_prompt_free(&p);
    /* Training: every message closed; only the answer and its <|eot_id|> are trainable. */
    CHECK_OK(lq_chat_render_training(&llama3, conversation, 3, NULL, &p));
    flatten_as(&p, "<|begin_of_text|>", text, sizeof text);
    CHECK_MSG(strcmp(text,
                     "<|begin_of_text|>"
                     "<|start_header_id|>system<|end_header_id|>\n\nYou tell stories.<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\n\nWho is Lily?<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\nA girl.<|eot_id|>") == 0,
              "llama3 training render: '%s'", text);
    size_t n_trainable = 0;
    for (size_t i = 0; i < p.n_segments; i++) {
        const struct lq_chat_segment *s = &p.segments[i];
        if (!s->trainable) continue;
        n_trainable++;
        CHECK(s->text && (strcmp(s->text, "A girl.") == 0 ||
                          (s->kind == LQ_SEGMENT_SPECIAL && strcmp(s->text, "<|eot_id|>") == 0)));
    }
    CHECK(n_trainable == 2);
    lq_chat_prompt_free(&p);

    /* Tokenized, with the pieces in the vocabulary: the dataset's masks as for ChatML. */
    struct lq_tokenizer *t = llama3_tokenizer();
    if (!t) return;
    int eot[] = {514};
    check_chat(t, LQ_CHAT_LLAMA3, eot, 1, eot, 1);
    char line[2048];
    snprintf(line, sizeof line, chat_line, 1);
    struct lq_dataset_options options;
    lq_dataset_options_default(&options);
    options.chat_style = &llama3;
    struct lq_dataset *d = load(write_text("chat.jsonl", line), t, &options);
    size_t headers = 0, header_ends = 0, eots = 0, trained_eots = 0, trained_headers = 0;
    for (size_t k = 0; d && k < d->documents[0].n_tokens; k++) {
        int id = d->documents[0].tokens[k];
        unsigned char m = d->documents[0].mask[k];
        headers += id == 512;
        header_ends += id == 513;
        eots += id == 514;
        trained_eots += id == 514 && m;
        trained_headers += (id == 512 || id == 513) && m;
    }
    CHECK(headers == 5 && header_ends == 5 && eots == 5 && trained_eots == 2 &&
          trained_headers == 0);
    lq_dataset_free(d);
    lq_tokenizer_free(t);
}

/* ---------- validation split ---------- */

static void test_validation_split(void) {
    struct lq_tokenizer *t = stories_tokenizer();
    char text[4096] = "";
    for (int i = 0; i < 8; i++) {
        char line[128];
        snprintf(line, sizeof line, "{\"text\": \"Story number %d about Lily.\"}\n", i);
        strcat(text, line);
    }
    const char *path = write_text("eight.jsonl", text);
    struct lq_dataset_options options;
    lq_dataset_options_default(&options);
    options.validation_fraction = 0.25;
    options.seed = 7;
    unsigned long first_lines[2] = {0, 0};
    int differs = 0;
    for (unsigned long long seed = 7; seed < 13; seed++) {
        options.seed = seed;
        struct lq_dataset *train = NULL, *held = NULL, *again = NULL, *held_again = NULL;
        CHECK_OK(lq_dataset_load(path, t, &options, &train, &held, NULL));
        CHECK_OK(lq_dataset_load(path, t, &options, &again, &held_again, NULL));
        if (!train || !held || !again || !held_again) {
            lq_dataset_free(train), lq_dataset_free(held), lq_dataset_free(again),
                lq_dataset_free(held_again);
            continue;
        }
        CHECK(train->n_documents == 6 && held->n_documents == 2);
        /* Same seed, same documents held out; every line in exactly one part, in file order. */
        int seen[9] = {0};
        for (size_t i = 0; i < held->n_documents; i++) {
            CHECK(held->documents[i].line == held_again->documents[i].line);
            seen[held->documents[i].line]++;
            CHECK(i == 0 || held->documents[i].line > held->documents[i - 1].line);
        }
        for (size_t i = 0; i < train->n_documents; i++) {
            seen[train->documents[i].line]++;
            CHECK(i == 0 || train->documents[i].line > train->documents[i - 1].line);
        }
        for (int line = 1; line <= 8; line++) CHECK(seen[line] == 1);
        CHECK(train->n_tokens + held->n_tokens == again->n_tokens + held_again->n_tokens);
        if (seed == 7)
            first_lines[0] = held->documents[0].line, first_lines[1] = held->documents[1].line;
        differs |=
            held->documents[0].line != first_lines[0] || held->documents[1].line != first_lines[1];
        lq_dataset_free(train), lq_dataset_free(held), lq_dataset_free(again),
            lq_dataset_free(held_again);
    }
    CHECK(differs); /* other seeds hold out other documents */
    /* At least one document each way. */
    options.validation_fraction = 0.01;
    struct lq_dataset *train = NULL, *held = NULL;
    CHECK_OK(lq_dataset_load(path, t, &options, &train, &held, NULL));
    CHECK(train && held && held->n_documents == 1 && train->n_documents == 7);
    lq_dataset_free(train), lq_dataset_free(held);
    options.validation_fraction = 0.99;
    CHECK_OK(lq_dataset_load(path, t, &options, &train, &held, NULL));
    CHECK(train && held && held->n_documents == 7 && train->n_documents == 1);
    lq_dataset_free(train), lq_dataset_free(held);
    /* One document cannot be split; bad fractions and asking twice are refused. */
    struct lq_error err = {0};
    const char *one = write_text("one.jsonl", "{\"text\": \"Lily.\"}\n");
    CHECK(lq_dataset_load(one, t, &options, &train, &held, &err) == LQ_EFORMAT);
    CHECK(strstr(err.message, "one.jsonl: 1 document cannot be split") != NULL);
    options.validation_fraction = 1;
    CHECK(lq_dataset_load(path, t, &options, &train, &held, &err) == LQ_EINVAL);
    options.validation_fraction = 0.5;
    options.validation_path = one;
    CHECK(lq_dataset_load(path, t, &options, &train, &held, &err) == LQ_EINVAL);
    CHECK(lq_dataset_load(path, t, &options, &train, NULL, &err) == LQ_EINVAL);
    /* A second file: loaded whole as validation; another format is refused. */
    options.validation_fraction = 0;
    CHECK_OK(lq_dataset_load(path, t, &options, &train, &held, NULL));
    CHECK(train && held && train->n_documents == 8 && held->n_documents == 1);
    lq_dataset_free(train), lq_dataset_free(held);
    options.validation_path = write_text("valid.txt", "Lily went home.\n");
    CHECK(lq_dataset_load(path, t, &options, &train, &held, &err) == LQ_EFORMAT);
    CHECK_MSG(strstr(err.message, "is plain but") && strstr(err.message, "eight.jsonl is text"),
              "%s", err.message);
    lq_tokenizer_free(t);
}

/* ---------- detection and errors ---------- */

static void test_detection(void) {
    struct {
        const char *name, *text;
        enum lq_dataset_format format;
    } cases[] = {
        {"a.jsonl", "{\"text\": \"x\"}\n", LQ_DATASET_TEXT},
        {"a.JSON", "\n{\"prompt\": \"x\", \"completion\": \"y\"}\n", LQ_DATASET_PROMPT_COMPLETION},
        {"a.ndjson", "{\"completion\": \"y\", \"prompt\": \"\"}\n", LQ_DATASET_PROMPT_COMPLETION},
        {"a.jsonl", "{\"messages\": [], \"text\": \"x\"}\n", LQ_DATASET_CHAT},
        {"a.txt", "{\"text\": \"x\"}\n", LQ_DATASET_PLAIN}, /* the extension decides */
        {"a.md", "# Title\n", LQ_DATASET_PLAIN},
        {"data", "  {\"text\": \"x\"}\n", LQ_DATASET_TEXT}, /* no extension: the first line */
        {"data", "\xef\xbb\xbf{\"text\": \"x\"}\n", LQ_DATASET_TEXT}, /* after a BOM */
        {"data.csv", "\n\nOnce upon a time\n", LQ_DATASET_PLAIN},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *path = write_text(cases[i].name, cases[i].text);
        enum lq_dataset_format format = LQ_DATASET_AUTO;
        struct lq_error err = {0};
        CHECK_MSG(lq_dataset_detect(path, NULL, &format, &err) == 0 && format == cases[i].format,
                  "case %zu: %s %s", i, lq_dataset_format_name(format), err.message);
    }
    /* The label, not the path, names the file and gives the extension. */
    const char *stored = write_text("file-0123", "{\"text\": \"x\"}\n");
    enum lq_dataset_format format;
    CHECK(lq_dataset_detect(stored, "notes.txt", &format, NULL) == 0 && format == LQ_DATASET_PLAIN);
    for (int f = LQ_DATASET_AUTO; f <= LQ_DATASET_CHAT; f++) {
        enum lq_dataset_format parsed;
        CHECK(lq_dataset_format_parse(lq_dataset_format_name((enum lq_dataset_format)f), &parsed) ==
                  0 &&
              parsed == (enum lq_dataset_format)f);
    }
    CHECK(lq_dataset_format_parse("jsonl", &format) == LQ_EINVAL);
    /* An explicit format reads the file as that format. */
    struct lq_dataset_summary summary;
    CHECK_OK(lq_dataset_validate(stored, "x.jsonl", LQ_DATASET_PLAIN, &summary, NULL));
    CHECK(summary.format == LQ_DATASET_PLAIN && summary.n_documents == 1);
}

static void test_errors(void) {
    /* The example of the issue: the 17th line is not a {"text"} object. */
    char text[4096] = "";
    for (int i = 0; i < 16; i++) strcat(text, "{\"text\": \"Lily played.\"}\n");
    strcat(text, "{\"txt\": \"Lily played.\"}\n{\"text\": \"fine\"}\n");
    expect_error(write_text("train.jsonl", text), "train.jsonl", LQ_DATASET_AUTO,
                 "train.jsonl:17: expected a JSON object with \"text\"", 1);
    struct {
        const char *text, *message;
        enum lq_dataset_format format;
    } cases[] = {
        {"", "t.jsonl: no documents (the file is empty or blank)", LQ_DATASET_AUTO},
        {"\n  \n\t\n", "t.jsonl: no documents (the file is empty or blank)", LQ_DATASET_AUTO},
        {"\n\n", "t.jsonl: no documents (the file is empty or blank)", LQ_DATASET_PLAIN},
        {"{\"text\": \"a\"}\n{\"text\": \"b\"\n", "t.jsonl:2: not valid JSON (near column 12)",
         LQ_DATASET_AUTO},
        {"{\"text\": \"a\"} {\"text\": \"b\"}\n",
         "t.jsonl:1: more than one JSON value (the second at column 15): one object a line",
         LQ_DATASET_AUTO},
        {"[\"text\"]\n",
         "t.jsonl:1: expected a JSON object with \"text\", \"prompt\" and \"completion\", or "
         "\"messages\"",
         LQ_DATASET_AUTO},
        {"{\"body\": \"a\"}\n",
         "t.jsonl:1: expected a JSON object with \"text\", \"prompt\" and \"completion\", or "
         "\"messages\"",
         LQ_DATASET_AUTO},
        {"{\"text\": 3}\n", "t.jsonl:1: \"text\" must be a string", LQ_DATASET_AUTO},
        {"{\"text\": \"\"}\n", "t.jsonl:1: \"text\" is empty", LQ_DATASET_AUTO},
        {"{\"text\": \"a\"}\n", "t.jsonl:1: expected a JSON object with \"messages\"",
         LQ_DATASET_CHAT},
        {"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n",
         "t.jsonl:2: expected a JSON object with \"prompt\" and \"completion\"", LQ_DATASET_AUTO},
        {"{\"prompt\": 1, \"completion\": \"b\"}\n", "t.jsonl:1: \"prompt\" must be a string",
         LQ_DATASET_AUTO},
        {"{\"prompt\": \"a\", \"completion\": \"\"}\n",
         "t.jsonl:1: \"completion\" is empty: nothing to train on", LQ_DATASET_AUTO},
        {"{\"messages\": {}}\n", "t.jsonl:1: \"messages\" must be a list of messages",
         LQ_DATASET_AUTO},
        {"{\"messages\": []}\n", "t.jsonl:1: \"messages\" is empty", LQ_DATASET_AUTO},
        {"{\"messages\": [\"hi\"]}\n",
         "t.jsonl:1: messages[0] must be an object with \"role\" and \"content\"", LQ_DATASET_AUTO},
        {"{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n",
         "t.jsonl:1: messages[0].role: unknown role \"tool\" (system, developer, user or "
         "assistant)",
         LQ_DATASET_AUTO},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\"}]}\n",
         "t.jsonl:1: messages[1].content must be a string or a list of {\"type\": \"text\", "
         "\"text\"} parts",
         LQ_DATASET_AUTO},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
         "t.jsonl:1: no assistant message: nothing to train on", LQ_DATASET_AUTO},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", "
         "\"content\": \"y\", \"weight\": 0}]}\n",
         "t.jsonl:1: every assistant message has weight 0: nothing to train on", LQ_DATASET_AUTO},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\", \"weight\": 1}]}\n",
         "t.jsonl:1: messages[0].weight: only assistant messages have a weight", LQ_DATASET_AUTO},
        {"{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\", \"weight\": 0.5}]}\n",
         "t.jsonl:1: messages[0].weight must be 0 or 1", LQ_DATASET_AUTO},
        {"{\"text\": \"a\"}\n{\"text\": \"caf\xe9\"}\n",
         "t.jsonl:2: not valid UTF-8 (byte 0xE9 at column 14); save the file as UTF-8",
         LQ_DATASET_AUTO},
        {"Lily\n\xed\xa0\x80\n",
         "t.jsonl:2: not valid UTF-8 (byte 0xED at column 1); save the file as UTF-8",
         LQ_DATASET_PLAIN}, /* a UTF-16 surrogate */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_error(write_text("t.jsonl", cases[i].text), "t.jsonl", cases[i].format,
                     cases[i].message, 1);
    /* A NUL byte: a binary file. */
    const char binary[] = "Lily\nab\0cd\n";
    expect_error(write_bytes("b.txt", binary, sizeof binary - 1), "b.txt", LQ_DATASET_AUTO,
                 "b.txt:2: a NUL byte at column 3 (is this a binary file?)", 1);
    /* A missing file. */
    struct lq_error err = {0};
    char missing[4200];
    ensure_temp_dir();
    snprintf(missing, sizeof missing, "%s/none.jsonl", temp_dir);
    CHECK(lq_dataset_validate(missing, "none.jsonl", LQ_DATASET_AUTO, NULL, &err) == LQ_ENOTFOUND);
    CHECK(strstr(err.message, "none.jsonl: No such file") != NULL);
}

LQ_TEST_MAIN(LQ_TEST(test_plain_text), LQ_TEST(test_jsonl_text), LQ_TEST(test_prompt_completion),
             LQ_TEST(test_chat), LQ_TEST(test_llama3), LQ_TEST(test_validation_split),
             LQ_TEST(test_detection), LQ_TEST(test_errors))
