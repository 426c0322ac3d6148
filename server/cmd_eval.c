/* lqd eval: perplexity on a text file, or logits of given tokens dumped as .npy. */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/eval.h"
#include "core/file_util.h"
#include "server/cli.h"
#include "server/cli_model.h"

static const char eval_usage[] =
    "usage: lqd eval --model M [--tokenizer T] [--adapter DIR] --ppl FILE [--max-tokens N]\n"
    "                [--context N] [--documents lines|paragraphs|stream] [--json] [--device D]\n"
    "       lqd eval --model M [--tokenizer T] --ppl FILE --documents llama-perplexity\n"
    "                [--context N] [--max-chunks N] [--json]\n"
    "       lqd eval --model M [--adapter DIR] --tokens ID,ID,... --dump-logits OUT.npy\n"
    "\n"
    "Perplexity of M (HuggingFace directory, llama2.c .bin, GGUF file or LQ directory) on FILE:\n"
    "documents are FILE's non-empty lines (default; --documents paragraphs splits on blank\n"
    "lines), each tokenized with BOS and evaluated from position 0, at most --context positions\n"
    "each (default: the model's maximum). --documents stream: the whole FILE tokenized as one\n"
    "sequence (BOS first when the tokenizer adds one) and cut into consecutive windows of\n"
    "--context tokens, each evaluated from position 0 (HF's perplexity protocol, no stride).\n"
    "The count stops after --max-tokens predicted tokens.\n"
    "--documents llama-perplexity: llama.cpp's llama-perplexity protocol, so that the figure\n"
    "compares with `llama-perplexity -f FILE -c N [--chunks K]`: FILE tokenized once, cut into\n"
    "chunks of --context tokens (at most --max-chunks), each evaluated from an empty cache with\n"
    "its first token replaced by BOS when the tokenizer adds one, only the second half of each\n"
    "chunk scored; prints llama-perplexity's \"Final estimate: PPL = X +/- Y\".\n"
    "--json prints "
    "{\"ppl\",\"ppl_error\",\"nll\",\"tokens\",\"documents\",\"protocol\",\"context\",\n"
    "\"seconds\",...}. With --tokens, the logits of that token sequence (no BOS added) are\n"
    "written as float32 [n, vocab] to OUT.npy.\n"
    "\n" LQ_CLI_ADAPTER_USAGE LQ_CLI_DEVICE_USAGE "\n"
    "example: lqd eval --model models/stories260K-hf --tokenizer models/stories260K/tok512.bin "
    "--ppl ../shared/data/tinystories_val_subset.txt --max-tokens 200000\n";

static const char *const protocol_names[] = {
    [LQ_SPLIT_LINES] = "lines",
    [LQ_SPLIT_PARAGRAPHS] = "paragraphs",
    [LQ_SPLIT_STREAM] = "stream",
    [LQ_SPLIT_LLAMA_PERPLEXITY] = "llama-perplexity",
};

#define usage_error(format, value) lq_cli_usage_error("eval", format, value)

/* "1,5,9" -> ids; returns count or -1. */
static int parse_tokens(const char *text, int **ids) {
    int count = 1;
    for (const char *p = text; *p; p++) count += *p == ',';
    *ids = malloc((size_t)count * sizeof **ids);
    if (!*ids) return -1;
    const char *cursor = text;
    for (int i = 0; i < count; i++) {
        char *end;
        long value = strtol(cursor, &end, 10);
        if (end == cursor || value < 0 || value > (1 << 24) || (*end != ',' && *end != '\0')) {
            free(*ids);
            return -1;
        }
        (*ids)[i] = (int)value;
        cursor = end + 1;
    }
    return count;
}

/* float32 [rows, cols] as a .npy file (format version 1.0), written atomically. */
static int write_npy(const char *path, const float *data, int rows, int cols,
                     struct lq_error *err) {
    char header[128];
    int length =
        snprintf(header, sizeof header,
                 "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }", rows, cols);
    int padded = ((10 + length + 1 + 63) / 64) * 64 - 10; /* total header a multiple of 64 */
    size_t bytes = 10 + (size_t)padded + (size_t)rows * cols * sizeof(float);
    unsigned char *buffer = malloc(bytes);
    if (!buffer) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    memcpy(buffer, "\x93NUMPY\x01\x00", 8);
    buffer[8] = (unsigned char)(padded & 0xff), buffer[9] = (unsigned char)(padded >> 8);
    memset(buffer + 10, ' ', (size_t)padded);
    memcpy(buffer + 10, header, (size_t)length);
    buffer[10 + padded - 1] = '\n';
    memcpy(buffer + 10 + padded, data, (size_t)rows * cols * sizeof(float));
    int rc = lq_file_write_atomic(path, buffer, bytes, err);
    free(buffer);
    return rc;
}

static int dump_logits(struct lq_cli_model *m, const int *ids, int count, const char *out,
                       struct lq_error *err) {
    const struct lq_model_config *c = &m->model->config;
    if (count > c->max_seq_len)
        return lq_error_set(err, LQ_EINVAL, "%d tokens: the model holds %d positions", count,
                            c->max_seq_len);
    struct lq_session *session;
    int rc = lq_cli_model_session(m, count, count, &session, err);
    if (rc) return rc;
    float *logits = malloc((size_t)count * c->vocab_size * sizeof *logits);
    if (!logits) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    if (!rc) rc = lq_session_forward(session, ids, count, 1, logits, err);
    if (!rc) rc = write_npy(out, logits, count, c->vocab_size, err);
    free(logits);
    lq_session_free(session);
    return rc;
}

int lq_cli_eval(int argc, char **argv) {
    enum {
        OPT_TOKENIZER = 256,
        OPT_PPL,
        OPT_MAX,
        OPT_CONTEXT,
        OPT_JSON,
        OPT_TOKENS,
        OPT_DUMP,
        OPT_DOCUMENTS,
        OPT_DEVICE,
        OPT_GPU_MEMORY,
        OPT_ADAPTER,
        OPT_MAX_CHUNKS
    };
    static const struct option long_options[] = {
        {"model", required_argument, NULL, 'm'},
        {"tokenizer", required_argument, NULL, OPT_TOKENIZER},
        {"ppl", required_argument, NULL, OPT_PPL},
        {"max-tokens", required_argument, NULL, OPT_MAX},
        {"context", required_argument, NULL, OPT_CONTEXT},
        {"json", no_argument, NULL, OPT_JSON},
        {"tokens", required_argument, NULL, OPT_TOKENS},
        {"dump-logits", required_argument, NULL, OPT_DUMP},
        {"documents", required_argument, NULL, OPT_DOCUMENTS},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"gpu-memory", required_argument, NULL, OPT_GPU_MEMORY},
        {"adapter", required_argument, NULL, OPT_ADAPTER},
        {"max-chunks", required_argument, NULL, OPT_MAX_CHUNKS},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model_path = NULL, *tokenizer_path = NULL, *ppl_path = NULL, *tokens = NULL,
               *dump = NULL, *adapter_path = NULL;
    struct lq_eval_options options = {.split = LQ_SPLIT_LINES};
    int json = 0;
    long number;
    struct lq_cli_device device = {NULL, 0};
    optind = 1;
    opterr = 0;
    int option;
    while ((option = getopt_long(argc, argv, "m:h", long_options, NULL)) != -1) {
        switch (option) {
        case 'm':
            model_path = optarg;
            break;
        case OPT_TOKENIZER:
            tokenizer_path = optarg;
            break;
        case OPT_PPL:
            ppl_path = optarg;
            break;
        case OPT_MAX:
            if (lq_cli_parse_int(optarg, 1, __LONG_MAX__, &number))
                return usage_error("--max-tokens '%s': expected an integer >= 1", optarg);
            options.max_tokens = (size_t)number;
            break;
        case OPT_MAX_CHUNKS:
            if (lq_cli_parse_int(optarg, 1, __LONG_MAX__, &number))
                return usage_error("--max-chunks '%s': expected an integer >= 1", optarg);
            options.max_chunks = (size_t)number;
            break;
        case OPT_CONTEXT:
            if (lq_cli_parse_int(optarg, 2, 1 << 24, &number))
                return usage_error("--context '%s': expected an integer >= 2", optarg);
            options.context = (int)number;
            break;
        case OPT_JSON:
            json = 1;
            break;
        case OPT_TOKENS:
            tokens = optarg;
            break;
        case OPT_DUMP:
            dump = optarg;
            break;
        case OPT_ADAPTER:
            adapter_path = optarg;
            break;
        case OPT_DOCUMENTS:
            if (strcmp(optarg, "lines") == 0)
                options.split = LQ_SPLIT_LINES;
            else if (strcmp(optarg, "paragraphs") == 0)
                options.split = LQ_SPLIT_PARAGRAPHS;
            else if (strcmp(optarg, "stream") == 0)
                options.split = LQ_SPLIT_STREAM;
            else if (strcmp(optarg, "llama-perplexity") == 0)
                options.split = LQ_SPLIT_LLAMA_PERPLEXITY;
            else
                return usage_error(
                    "--documents '%s': expected lines, paragraphs, stream or llama-perplexity",
                    optarg);
            break;
        case OPT_DEVICE:
        case OPT_GPU_MEMORY:
            if (lq_cli_device_option("eval", option == OPT_DEVICE ? "device" : "gpu-memory", optarg,
                                     &device) == 2)
                return 2;
            break;
        case 'h':
            fputs(eval_usage, stdout);
            return 0;
        default:
            return usage_error("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!model_path) return usage_error("%s", "--model M is required");
    if (!ppl_path == !tokens) return usage_error("%s", "give either --ppl FILE or --tokens IDS");
    if (tokens && !dump) return usage_error("%s", "--tokens needs --dump-logits OUT.npy");
    int llama_protocol = options.split == LQ_SPLIT_LLAMA_PERPLEXITY;
    if (options.max_chunks && !llama_protocol)
        return usage_error("%s", "--max-chunks needs --documents llama-perplexity");
    if (options.max_tokens && llama_protocol)
        return usage_error("%s", "--documents llama-perplexity counts whole chunks: give "
                                 "--max-chunks N instead of --max-tokens");
    int *ids = NULL, count = 0;
    if (tokens && (count = parse_tokens(tokens, &ids)) < 0)
        return usage_error("--tokens '%s': expected comma-separated token ids", tokens);

    struct lq_error err = {0};
    struct lq_cli_model m;
    char *text = NULL;
    size_t length = 0;
    int status = 1;
    if (lq_cli_model_open(model_path, tokenizer_path, ppl_path != NULL, &device, &m, &err)) {
        fprintf(stderr, "lqd eval: %s\n", err.message);
        free(ids);
        return 1;
    }
    if (adapter_path && lq_cli_model_load_adapter(&m, adapter_path, &err)) goto done;
    options.adapter = m.adapter_weights;
    if (tokens) {
        for (int i = 0; i < count; i++)
            if (ids[i] >= m.model->config.vocab_size) {
                lq_error_set(&err, LQ_EINVAL, "token %d is outside the vocabulary (%d)", ids[i],
                             m.model->config.vocab_size);
                goto done;
            }
        if (dump_logits(&m, ids, count, dump, &err)) goto done;
        status = 0;
        goto done;
    }
    if (lq_file_read_all(ppl_path, (size_t)1 << 32, &text, &length, &err)) goto done;
    struct lq_eval_result result;
    if (lq_eval_perplexity(m.runtime, m.tokenizer, text, length, &options, &result, &err))
        goto done;
    if (json) {
        cJSON *root = cJSON_CreateObject();
        cJSON_AddNumberToObject(root, "ppl", result.ppl);
        if (!isnan(result.ppl_error)) cJSON_AddNumberToObject(root, "ppl_error", result.ppl_error);
        cJSON_AddNumberToObject(root, "nll", result.nll);
        cJSON_AddNumberToObject(root, "tokens", (double)result.tokens);
        cJSON_AddNumberToObject(root, "documents", (double)result.documents);
        cJSON_AddStringToObject(root, "protocol", protocol_names[options.split]);
        cJSON_AddNumberToObject(root, "context", result.context);
        cJSON_AddNumberToObject(root, "seconds", result.seconds);
        cJSON_AddNumberToObject(root, "tokens_per_second", (double)result.tokens / result.seconds);
        if (adapter_path) cJSON_AddStringToObject(root, "adapter", adapter_path);
        char *printed = cJSON_PrintUnformatted(root);
        cJSON_Delete(root);
        if (printed) puts(printed);
        cJSON_free(printed);
    } else {
        if (llama_protocol) /* the line llama-perplexity ends with, for the same parsers */
            printf("Final estimate: PPL = %.4f +/- %.5f\n", result.ppl, result.ppl_error);
        printf("perplexity %.4f over %zu tokens (%zu %s), nll %.4f/token, %.2f s, %.0f "
               "tokens/s\n",
               result.ppl, result.tokens, result.documents, llama_protocol ? "chunks" : "documents",
               result.nll / (double)result.tokens, result.seconds,
               (double)result.tokens / result.seconds);
    }
    status = 0;
done:
    if (status) fprintf(stderr, "lqd eval: %s\n", err.message);
    free(text);
    free(ids);
    lq_cli_model_close(&m);
    return status;
}
