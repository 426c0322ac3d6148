/* lqd generate: text from a model on the CPU. */
#include <getopt.h>
#include <time.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>

#include "core/generate.h"
#include "server/cli.h"
#include "server/cli_model.h"

static const char generate_usage[] =
    "usage: lqd generate --model M [--tokenizer T] [--adapter DIR] [--prompt TEXT]\n"
    "                    [--max-tokens N] [--temperature F] [--top-k K] [--top-p P]\n"
    "                    [--min-p P] [--repetition-penalty F] [--seed S] [--stop TEXT]...\n"
    "                    [--no-bos]\n"
    "\n"
    "Generates text from M (a HuggingFace directory, a llama2.c .bin or an LQ directory written\n"
    "by lqd compress) and prints only the generated text on stdout, as it is produced.\n"
    "\n"
    "  --tokenizer T        tokenizer.json, tokenizer.model or llama2.c tokenizer.bin (default:\n"
    "                       the one in M's directory, or tokenizer.bin beside a .bin)\n"
    "  --prompt TEXT        the prompt (default empty: generation starts from BOS)\n"
    "  --max-tokens N       tokens to generate at most (default 256)\n"
    "  --temperature F      0 is greedy (default 1)\n"
    "  --top-k K, --top-p P, --min-p P, --repetition-penalty F   sampling filters (off by "
    "default)\n"
    "  --seed S             random seed: the same seed gives the same text (default 0)\n"
    "  --stop TEXT          stop before TEXT (up to 8)\n"
    "  --context N          positions to allocate (default: the model's maximum)\n"
    "  --stats              print token counts, finish reason and speed on "
    "stderr\n" LQ_CLI_ADAPTER_USAGE LQ_CLI_DEVICE_USAGE "\n"
    "example: lqd generate --model models/stories260K/stories260K.bin --tokenizer "
    "models/stories260K/tok512.bin --temperature 0 --max-tokens 200\n";

static int print_text(void *context, const char *text, size_t length) {
    (void)context;
    fwrite(text, 1, length, stdout);
    fflush(stdout);
    return 0;
}

#define usage_error(format, value) lq_cli_usage_error("generate", format, value)

int lq_cli_generate(int argc, char **argv) {
    enum {
        OPT_TOKENIZER = 256,
        OPT_PROMPT,
        OPT_MAX,
        OPT_TEMP,
        OPT_TOPK,
        OPT_TOPP,
        OPT_MINP,
        OPT_REP,
        OPT_SEED,
        OPT_STOP,
        OPT_NOBOS,
        OPT_CONTEXT,
        OPT_STATS,
        OPT_DEVICE,
        OPT_GPU_MEMORY,
        OPT_ADAPTER
    };
    static const struct option long_options[] = {
        {"model", required_argument, NULL, 'm'},
        {"tokenizer", required_argument, NULL, OPT_TOKENIZER},
        {"prompt", required_argument, NULL, OPT_PROMPT},
        {"max-tokens", required_argument, NULL, OPT_MAX},
        {"temperature", required_argument, NULL, OPT_TEMP},
        {"top-k", required_argument, NULL, OPT_TOPK},
        {"top-p", required_argument, NULL, OPT_TOPP},
        {"min-p", required_argument, NULL, OPT_MINP},
        {"repetition-penalty", required_argument, NULL, OPT_REP},
        {"seed", required_argument, NULL, OPT_SEED},
        {"stop", required_argument, NULL, OPT_STOP},
        {"no-bos", no_argument, NULL, OPT_NOBOS},
        {"context", required_argument, NULL, OPT_CONTEXT},
        {"stats", no_argument, NULL, OPT_STATS},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"gpu-memory", required_argument, NULL, OPT_GPU_MEMORY},
        {"adapter", required_argument, NULL, OPT_ADAPTER},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model_path = NULL, *tokenizer_path = NULL, *adapter_path = NULL, *prompt = "";
    struct lq_generate_options options;
    lq_generate_options_default(&options);
    int stops = 0, context = 0, stats = 0;
    long number;
    double real;
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
        case OPT_PROMPT:
            prompt = optarg;
            break;
        case OPT_MAX:
            if (lq_cli_parse_int(optarg, 0, 1 << 24, &number))
                return usage_error("--max-tokens '%s': expected an integer >= 0", optarg);
            options.max_tokens = (int)number;
            break;
        case OPT_TEMP:
            if (lq_cli_parse_double(optarg, 0, 1e6, &real))
                return usage_error("--temperature '%s': expected a number >= 0", optarg);
            options.sampler.temperature = (float)real;
            break;
        case OPT_TOPK:
            if (lq_cli_parse_int(optarg, 0, 1 << 24, &number))
                return usage_error("--top-k '%s': expected an integer >= 0", optarg);
            options.sampler.top_k = (int)number;
            break;
        case OPT_TOPP:
            if (lq_cli_parse_double(optarg, 1e-9, 1, &real))
                return usage_error("--top-p '%s': expected a number in (0, 1]", optarg);
            options.sampler.top_p = (float)real;
            break;
        case OPT_MINP:
            if (lq_cli_parse_double(optarg, 0, 1, &real))
                return usage_error("--min-p '%s': expected a number in [0, 1]", optarg);
            options.sampler.min_p = (float)real;
            break;
        case OPT_REP:
            if (lq_cli_parse_double(optarg, 1e-6, 1e6, &real))
                return usage_error("--repetition-penalty '%s': expected a number > 0", optarg);
            options.sampler.repetition_penalty = (float)real;
            break;
        case OPT_SEED:
            if (lq_cli_parse_int(optarg, 0, __LONG_MAX__, &number))
                return usage_error("--seed '%s': expected an integer >= 0", optarg);
            options.sampler.seed = (uint64_t)number;
            break;
        case OPT_STOP:
            if (stops == LQ_GENERATE_MAX_STOPS)
                return usage_error("%s", "at most 8 --stop strings");
            options.stop[stops++] = optarg;
            break;
        case OPT_NOBOS:
            options.add_bos = 0;
            break;
        case OPT_CONTEXT:
            if (lq_cli_parse_int(optarg, 1, 1 << 24, &number))
                return usage_error("--context '%s': expected an integer >= 1", optarg);
            context = (int)number;
            break;
        case OPT_STATS:
            stats = 1;
            break;
        case OPT_ADAPTER:
            adapter_path = optarg;
            break;
        case OPT_DEVICE:
        case OPT_GPU_MEMORY:
            if (lq_cli_device_option("generate", option == OPT_DEVICE ? "device" : "gpu-memory",
                                     optarg, &device) == 2)
                return 2;
            break;
        case 'h':
            fputs(generate_usage, stdout);
            return 0;
        default:
            return usage_error("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!model_path) return usage_error("%s", "--model M is required");

    struct lq_error err = {0};
    struct lq_cli_model m;
    if (lq_cli_model_open(model_path, tokenizer_path, 1, &device, &m, &err) ||
        (adapter_path && lq_cli_model_load_adapter(&m, adapter_path, &err))) {
        fprintf(stderr, "lqd generate: %s\n", err.message);
        lq_cli_model_close(&m);
        return 1;
    }
    int status = 1;
    struct lq_session *session = NULL;
    const struct lq_model_config *config = &m.model->config;
    if (context == 0 || context > config->max_seq_len) context = config->max_seq_len;
    struct lq_generate_result result;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (lq_cli_model_session(&m, context, 512, &session, &err) ||
        lq_generate(session, m.tokenizer, prompt, &options, print_text, NULL, &result, &err)) {
        fprintf(stderr, "lqd generate: %s\n", err.message);
    } else {
        if (isatty(STDOUT_FILENO)) putchar('\n'); /* pipes get the text exactly */
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        if (stats)
            fprintf(stderr, "\nprompt %d tokens, generated %d, finish %s, %.1f tokens/s\n",
                    result.prompt_tokens, result.completion_tokens,
                    lq_finish_reason_name(result.finish), result.completion_tokens / seconds);
        status = 0;
    }
    lq_session_free(session);
    lq_cli_model_close(&m);
    return status;
}
