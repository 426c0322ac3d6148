/* lqd: LQ-LoRA model compression and serving. Dispatches to the subcommands. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/connections_cuda.h"
#include "server/cli.h"

struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
};

static const struct command commands[] = {
    {"decompose", lq_cli_decompose,
     "LQ-decompose one matrix of a safetensors file (W = Q + L1 L2) and report its errors"},
    {"generate", lq_cli_generate, "generate text from a model (HF, llama2.c .bin or LQ directory)"},
    {"eval", lq_cli_eval, "perplexity on a text file, or logits of given tokens as .npy"},
    {"compress", lq_cli_compress, "compress a model with LQ-LoRA to a bit budget (Algorithm 1)"},
    {"finetune", lq_cli_finetune,
     "LoRA-finetune a model on a dataset file and write a PEFT adapter directory"},
    {"import", lq_cli_import, "write a llama.cpp GGUF model as a HuggingFace directory"},
    {"inspect", lq_cli_inspect, "show an LQ model's per-matrix allocation (text, JSON or SVG)"},
    {"serve", lq_cli_serve, "serve models over HTTP (OpenAI-compatible API, metrics, hot swap)"},
    {"version", lq_cli_version, "print versions of lqd, its libraries and the CUDA devices seen"},
};

static void usage(FILE *out) {
    fprintf(out, "usage: lqd <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "\n'lqd <command> --help' describes a command's options.\n");
}

int lq_cli_usage_error(const char *command, const char *format, const char *value) {
    fprintf(stderr, "lqd %s: ", command);
    fprintf(stderr, format, value);
    fprintf(stderr, "\n(see 'lqd %s --help')\n", command);
    return 2;
}

int lq_cli_parse_int(const char *text, long min, long max, long *out) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end != '\0' || value < min || value > max) return -1;
    *out = value;
    return 0;
}

int lq_cli_parse_double(const char *text, double min, double max, double *out) {
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno || end == text || *end != '\0' || !isfinite(value) || value < min || value > max)
        return -1;
    *out = value;
    return 0;
}

int main(int argc, char **argv) {
    /* Before any thread exists (setenv is not safe beside other threads' getenv): the CUDA
     * backend's hardware queues, which it would otherwise set when it first probes a device. */
    lq_cuda_default_connections();
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[1];
    if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0 || strcmp(name, "help") == 0) {
        if (argc > 2 && strcmp(name, "help") == 0) {
            char *help_argv[] = {argv[2], "--help", NULL};
            for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
                if (strcmp(commands[i].name, argv[2]) == 0) return commands[i].run(2, help_argv);
            fprintf(stderr, "lqd: unknown command '%s'\n", argv[2]);
            return 2;
        }
        usage(stdout);
        return 0;
    }
    if (strcmp(name, "--version") == 0) return lq_cli_version(1, argv + 1);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(commands[i].name, name) == 0) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "lqd: unknown command '%s'\n\n", name);
    usage(stderr);
    return 2;
}
