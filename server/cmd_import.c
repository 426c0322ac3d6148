/* lqd import: a llama.cpp GGUF model to a HuggingFace source directory (core/gguf_import.h). */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "core/gguf_import.h"
#include "server/cli.h"

static const char import_usage[] =
    "usage: lqd import --model FILE.gguf --out DIR [--force] [--json]\n"
    "\n"
    "Writes a llama.cpp GGUF model (architecture llama) as a HuggingFace LLaMA directory that\n"
    "lqd and transformers read: model.safetensors (every tensor in F32 under its HF name,\n"
    "exactly the floats lqd computes from the GGUF: dequantized, Q/K rows back in HF order),\n"
    "config.json (LlamaForCausalLM), and the GGUF's tokenizer as tokenizer.json and\n"
    "tokenizer_config.json (chat template, BOS/EOS). lqd generate, eval and compress also\n"
    "take the GGUF file itself; importing gives a directory other tools can read.\n"
    "\n"
    "  --model FILE.gguf    the GGUF model\n"
    "  --out DIR            the directory to write; built beside DIR and renamed into place\n"
    "  --force              replace DIR if it is an earlier import (or empty)\n"
    "  --json               print what was written as one JSON object\n"
    "\n"
    "example: lqd import --model SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-hf\n";

struct import_args {
    const char *model, *out;
    int force, json;
};

#define usage_error(format, value) lq_cli_usage_error("import", format, value)

static int parse_args(int argc, char **argv, struct import_args *a) {
    enum { OPT_FORCE = 256, OPT_JSON };
    static const struct option long_options[] = {
        {"model", required_argument, NULL, 'm'}, {"out", required_argument, NULL, 'o'},
        {"force", no_argument, NULL, OPT_FORCE}, {"json", no_argument, NULL, OPT_JSON},
        {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0},
    };
    memset(a, 0, sizeof *a);
    optind = 1;
    opterr = 0;
    int option;
    while ((option = getopt_long(argc, argv, "m:o:h", long_options, NULL)) != -1) {
        switch (option) {
        case 'm':
            a->model = optarg;
            break;
        case 'o':
            a->out = optarg;
            break;
        case OPT_FORCE:
            a->force = 1;
            break;
        case OPT_JSON:
            a->json = 1;
            break;
        case 'h':
            fputs(import_usage, stdout);
            return -1;
        default:
            return usage_error("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!a->model) return usage_error("%s", "--model FILE.gguf is required");
    if (!a->out) return usage_error("%s", "--out DIR is required");
    return 0;
}

static void print_json(const struct import_args *a, const struct lq_gguf_import_report *r) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "model", a->model);
    cJSON_AddStringToObject(root, "out", a->out);
    cJSON_AddNumberToObject(root, "tensors", (double)r->tensors);
    cJSON_AddNumberToObject(root, "parameters", (double)r->parameters);
    cJSON_AddBoolToObject(root, "tie_word_embeddings", r->tied);
    if (r->has_tokenizer) {
        cJSON *t = cJSON_AddObjectToObject(root, "tokenizer");
        cJSON_AddStringToObject(t, "model", r->tokenizer);
        cJSON_AddNumberToObject(t, "vocab_size", r->vocab_size);
        cJSON_AddNumberToObject(t, "merges", (double)r->merges);
        cJSON_AddNumberToObject(t, "added_tokens", (double)r->added);
        cJSON_AddBoolToObject(t, "chat_template", r->chat_template);
    } else {
        cJSON_AddNullToObject(root, "tokenizer");
    }
    char *text = cJSON_PrintUnformatted(root);
    if (text) puts(text);
    cJSON_free(text);
    cJSON_Delete(root);
}

int lq_cli_import(int argc, char **argv) {
    struct import_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;
    struct lq_error err = {0};
    struct lq_gguf_import_report report;
    if (lq_gguf_import(a.model, a.out, a.force, &report, &err)) {
        fprintf(stderr, "lqd import: %s\n", err.message);
        return 1;
    }
    if (a.json) {
        print_json(&a, &report);
        return 0;
    }
    printf("%s: %zu tensors (%llu parameters, F32%s), config.json", a.out, report.tensors,
           (unsigned long long)report.parameters, report.tied ? ", tied embeddings" : "");
    if (report.has_tokenizer)
        printf(", tokenizer.json (%s, %d pieces, %zu merges%s)", report.tokenizer,
               report.vocab_size, report.merges, report.chat_template ? ", chat template" : "");
    else
        printf("; the GGUF holds no tokenizer");
    printf("\n");
    return 0;
}
