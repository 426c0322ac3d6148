/* lqd finetune: LoRA finetuning of a model on a dataset file, written as a PEFT adapter
 * directory (core/finetune.h does the work; this file is options, progress and the report). */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/adapter.h"
#include "core/file_util.h"
#include "core/finetune.h"
#include "core/lq_model_file.h"
#include "kernels/backend_select.h"
#include "server/cli.h"
#include "server/cli_model.h"

static const char finetune_usage[] =
    "usage: lqd finetune --model DIR --train FILE --out ADAPTER_DIR [options]\n"
    "\n"
    "LoRA finetuning on the CPU. With --init lq (the default for an LQ model directory) the\n"
    "model's own L1, L2 are trained with Q frozen (LQ-LoRA) and the adapter replaces them; with\n"
    "--init zero (the default for any other model) a new rank-R pair is trained on top of the\n"
    "model as it is (QLoRA-style) and the adapter adds to it. The result is a PEFT LoRA\n"
    "directory: adapter_config.json + adapter_model.safetensors.\n"
    "\n"
    "data:\n"
    "  --train FILE               training data (plain text: documents separated by blank\n"
    "                             lines; JSON lines: {\"text\"}, {\"prompt\", \"completion\"},\n"
    "                             {\"messages\"})\n"
    "  --format F                 auto (default), plain, text, prompt-completion or chat\n"
    "  --validation FILE          validation data in the same format, or\n"
    "  --validation-fraction F    hold out this share of --train's documents (seeded)\n"
    "  --tokenizer T              tokenizer file (default: the one in the model directory)\n"
    "training:\n"
    "  --steps N | --epochs E     optimizer steps, or passes over the data (default 1 epoch)\n"
    "  --batch-size B             rows per step (default 8)\n"
    "  --micro-batch M            rows per forward/backward pass (default min(4, B))\n"
    "  --seq-len T                tokens per row (default min(256, the model's context))\n"
    "  --learning-rate LR         peak learning rate (default 2e-4)\n"
    "  --schedule S               cosine (default), linear or constant decay after warmup\n"
    "  --warmup N                 linear warmup steps (default 0)\n"
    "  --weight-decay W           AdamW decoupled weight decay (default 0)\n"
    "  --max-grad-norm G          clip the gradient's global norm (default 1; 0: never)\n"
    "  --init lq|zero             train the LQ model's own L1 L2, or a new zero-initialised pair\n"
    "  --rank R                   rank of the new pair with --init zero (default 8)\n"
    "  --seed S                   data order, validation split, the new pair's L2 (default 0)\n"
    "  --recompute                keep less activation memory: recompute during backward\n"
    "  --threads N                CPU threads (default: all CPUs, or LQ_THREADS)\n"
    "  --device D                 cpu (default), cuda, cuda:N or auto: where training runs (a\n"
    "                             backend without training ops, or no GPU: the CPU, said so)\n"
    "progress and results:\n"
    "  --eval-every N             validation loss every N steps (default: before and after)\n"
    "  --checkpoint FILE          checkpoint file: when it exists, the run resumes from it and\n"
    "                             continues exactly as if never interrupted; it is written at\n"
    "                             the end, on Ctrl-C, and every --checkpoint-every N steps\n"
    "  --checkpoint-every N       (needs --checkpoint)\n"
    "  --out ADAPTER_DIR          the adapter directory to write (renamed into place)\n"
    "  --force                    replace ADAPTER_DIR when it is an existing adapter\n"
    "  --json                     one JSON event per line on stdout (start, step, checkpoint,\n"
    "                             done); step events carry step, train_loss, val_loss,\n"
    "                             learning_rate, tokens_per_second, eta_seconds\n"
    "  --quiet                    no progress lines on stderr\n"
    "\n"
    "example: lqd finetune --model models/stories260K-lq --train stories.txt --steps 100 \\\n"
    "             --validation-fraction 0.05 --out stories-adapter\n";

struct finetune_args {
    const char *model, *tokenizer, *train, *validation, *out, *checkpoint, *format, *init;
    const char *schedule;
    double validation_fraction, epochs, learning_rate, weight_decay, max_grad_norm;
    long steps, seed;
    int batch_size, micro_batch, seq_len, rank, warmup, eval_every, checkpoint_every, threads;
    int have_rank, have_steps, have_epochs, have_fraction, have_learning_rate, have_max_grad_norm;
    int recompute, force, json, quiet;
    struct lq_cli_device device;
};

#define usage_error(format, value) lq_cli_usage_error("finetune", format, value)

static int parse_args(int argc, char **argv, struct finetune_args *a) {
    enum {
        OPT_TOKENIZER = 256,
        OPT_VALIDATION,
        OPT_FRACTION,
        OPT_FORMAT,
        OPT_STEPS,
        OPT_EPOCHS,
        OPT_LR,
        OPT_BATCH,
        OPT_MICRO,
        OPT_SEQ,
        OPT_INIT,
        OPT_RANK,
        OPT_WARMUP,
        OPT_SCHEDULE,
        OPT_WD,
        OPT_CLIP,
        OPT_SEED,
        OPT_EVAL,
        OPT_CKPT_EVERY,
        OPT_CKPT,
        OPT_JSON,
        OPT_THREADS,
        OPT_DEVICE,
        OPT_GPU_MEMORY,
        OPT_RECOMPUTE,
        OPT_FORCE,
        OPT_QUIET,
    };
    static const struct option long_options[] = {
        {"model", required_argument, NULL, 'm'},
        {"train", required_argument, NULL, 't'},
        {"out", required_argument, NULL, 'o'},
        {"tokenizer", required_argument, NULL, OPT_TOKENIZER},
        {"validation", required_argument, NULL, OPT_VALIDATION},
        {"validation-fraction", required_argument, NULL, OPT_FRACTION},
        {"format", required_argument, NULL, OPT_FORMAT},
        {"steps", required_argument, NULL, OPT_STEPS},
        {"epochs", required_argument, NULL, OPT_EPOCHS},
        {"learning-rate", required_argument, NULL, OPT_LR},
        {"batch-size", required_argument, NULL, OPT_BATCH},
        {"micro-batch", required_argument, NULL, OPT_MICRO},
        {"seq-len", required_argument, NULL, OPT_SEQ},
        {"init", required_argument, NULL, OPT_INIT},
        {"rank", required_argument, NULL, OPT_RANK},
        {"warmup", required_argument, NULL, OPT_WARMUP},
        {"schedule", required_argument, NULL, OPT_SCHEDULE},
        {"weight-decay", required_argument, NULL, OPT_WD},
        {"max-grad-norm", required_argument, NULL, OPT_CLIP},
        {"seed", required_argument, NULL, OPT_SEED},
        {"eval-every", required_argument, NULL, OPT_EVAL},
        {"checkpoint-every", required_argument, NULL, OPT_CKPT_EVERY},
        {"checkpoint", required_argument, NULL, OPT_CKPT},
        {"json", no_argument, NULL, OPT_JSON},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"gpu-memory", required_argument, NULL, OPT_GPU_MEMORY},
        {"recompute", no_argument, NULL, OPT_RECOMPUTE},
        {"force", no_argument, NULL, OPT_FORCE},
        {"quiet", no_argument, NULL, OPT_QUIET},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    memset(a, 0, sizeof *a);
    a->batch_size = 8;
    a->format = "auto";
    a->schedule = "cosine";
    a->epochs = 1.0;
    a->rank = 8;
    long number;
    double real;
    optind = 1;
    opterr = 0;
    int option;
    while ((option = getopt_long(argc, argv, "m:t:o:h", long_options, NULL)) != -1) {
        switch (option) {
        case 'm':
            a->model = optarg;
            break;
        case 't':
            a->train = optarg;
            break;
        case 'o':
            a->out = optarg;
            break;
        case OPT_TOKENIZER:
            a->tokenizer = optarg;
            break;
        case OPT_VALIDATION:
            a->validation = optarg;
            break;
        case OPT_FRACTION:
            if (lq_cli_parse_double(optarg, 0.0, 0.99, &real) || !(real > 0))
                return usage_error("--validation-fraction '%s': expected a number in (0, 0.99]",
                                   optarg);
            a->validation_fraction = real, a->have_fraction = 1;
            break;
        case OPT_FORMAT:
            a->format = optarg;
            break;
        case OPT_STEPS:
            if (lq_cli_parse_int(optarg, 1, 1000000000L, &number))
                return usage_error("--steps '%s': expected an integer >= 1", optarg);
            a->steps = number, a->have_steps = 1;
            break;
        case OPT_EPOCHS:
            if (lq_cli_parse_double(optarg, 1e-6, 1e6, &real))
                return usage_error("--epochs '%s': expected a number > 0", optarg);
            a->epochs = real, a->have_epochs = 1;
            break;
        case OPT_LR:
            if (lq_cli_parse_double(optarg, 0.0, 10.0, &real))
                return usage_error("--learning-rate '%s': expected a number in [0, 10]", optarg);
            a->learning_rate = real, a->have_learning_rate = 1;
            break;
        case OPT_BATCH:
            if (lq_cli_parse_int(optarg, 1, 1 << 20, &number))
                return usage_error("--batch-size '%s': expected an integer >= 1", optarg);
            a->batch_size = (int)number;
            break;
        case OPT_MICRO:
            if (lq_cli_parse_int(optarg, 1, 1 << 20, &number))
                return usage_error("--micro-batch '%s': expected an integer >= 1", optarg);
            a->micro_batch = (int)number;
            break;
        case OPT_SEQ:
            if (lq_cli_parse_int(optarg, 2, 1 << 20, &number))
                return usage_error("--seq-len '%s': expected an integer >= 2", optarg);
            a->seq_len = (int)number;
            break;
        case OPT_INIT:
            a->init = optarg;
            break;
        case OPT_RANK:
            if (lq_cli_parse_int(optarg, 1, 1 << 16, &number))
                return usage_error("--rank '%s': expected an integer >= 1", optarg);
            a->rank = (int)number, a->have_rank = 1;
            break;
        case OPT_WARMUP:
            if (lq_cli_parse_int(optarg, 0, 1000000000L, &number))
                return usage_error("--warmup '%s': expected an integer >= 0", optarg);
            a->warmup = (int)number;
            break;
        case OPT_SCHEDULE:
            a->schedule = optarg;
            break;
        case OPT_WD:
            if (lq_cli_parse_double(optarg, 0.0, 1e3, &real))
                return usage_error("--weight-decay '%s': expected a number >= 0", optarg);
            a->weight_decay = real;
            break;
        case OPT_CLIP:
            if (lq_cli_parse_double(optarg, 0.0, 1e12, &real))
                return usage_error("--max-grad-norm '%s': expected a number >= 0", optarg);
            a->max_grad_norm = real, a->have_max_grad_norm = 1;
            break;
        case OPT_SEED:
            if (lq_cli_parse_int(optarg, 0, __LONG_MAX__, &number))
                return usage_error("--seed '%s': expected an integer >= 0", optarg);
            a->seed = number;
            break;
        case OPT_EVAL:
            if (lq_cli_parse_int(optarg, 1, 1000000000L, &number))
                return usage_error("--eval-every '%s': expected an integer >= 1", optarg);
            a->eval_every = (int)number;
            break;
        case OPT_CKPT_EVERY:
            if (lq_cli_parse_int(optarg, 1, 1000000000L, &number))
                return usage_error("--checkpoint-every '%s': expected an integer >= 1", optarg);
            a->checkpoint_every = (int)number;
            break;
        case OPT_CKPT:
            a->checkpoint = optarg;
            break;
        case OPT_JSON:
            a->json = 1;
            break;
        case OPT_THREADS:
            if (lq_cli_parse_int(optarg, 1, 1024, &number))
                return usage_error("--threads '%s': expected an integer >= 1", optarg);
            a->threads = (int)number;
            break;
        case OPT_DEVICE:
        case OPT_GPU_MEMORY:
            if (lq_cli_device_option("finetune", option == OPT_DEVICE ? "device" : "gpu-memory",
                                     optarg, &a->device) == 2)
                return 2;
            break;
        case OPT_RECOMPUTE:
            a->recompute = 1;
            break;
        case OPT_FORCE:
            a->force = 1;
            break;
        case OPT_QUIET:
            a->quiet = 1;
            break;
        case 'h':
            fputs(finetune_usage, stdout);
            return -1;
        default:
            return usage_error("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!a->model) return usage_error("%s", "--model DIR is required");
    if (!a->train) return usage_error("%s", "--train FILE is required");
    if (!a->out) return usage_error("%s", "--out ADAPTER_DIR is required");
    if (a->have_steps && a->have_epochs)
        return usage_error("%s", "--steps and --epochs exclude each other");
    if (a->validation && a->have_fraction)
        return usage_error("%s", "--validation and --validation-fraction exclude each other");
    if (a->checkpoint_every && !a->checkpoint)
        return usage_error("%s", "--checkpoint-every needs --checkpoint FILE");
    if (a->init && strcmp(a->init, "lq") != 0 && strcmp(a->init, "zero") != 0)
        return usage_error("--init '%s': expected lq or zero", a->init);
    if (a->init && strcmp(a->init, "lq") == 0 && a->have_rank)
        return usage_error("%s", "--rank applies to --init zero (--init lq trains the model's own "
                                 "rank)");
    enum lq_dataset_format format;
    if (lq_dataset_format_parse(a->format, &format))
        return usage_error("--format '%s': expected auto, plain, text, prompt-completion or chat",
                           a->format);
    enum lq_lr_schedule schedule;
    if (lq_lr_schedule_parse(a->schedule, &schedule, NULL))
        return usage_error("--schedule '%s': expected cosine, linear or constant", a->schedule);
    if (a->micro_batch > a->batch_size)
        return usage_error("%s", "--micro-batch cannot exceed --batch-size");
    return 0;
}

/* ---------- progress ---------- */

static volatile sig_atomic_t interrupted;

static void on_signal(int signal_number) {
    (void)signal_number;
    interrupted = 1;
}

struct progress {
    int json, quiet;
    double last_line; /* monotonic seconds of the last stderr line */
};

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void print_json_line(cJSON *object) {
    char *text = cJSON_PrintUnformatted(object);
    cJSON_Delete(object);
    if (!text) return;
    puts(text);
    fflush(stdout);
    cJSON_free(text);
}

static int on_event(void *context, const struct lq_finetune_event *e) {
    struct progress *p = context;
    if (p->json) {
        cJSON *o = cJSON_CreateObject();
        if (e->type == LQ_FINETUNE_START) {
            cJSON_AddStringToObject(o, "type", "start");
            cJSON_AddNumberToObject(o, "step", (double)e->step);
            cJSON_AddNumberToObject(o, "total_steps", (double)e->total_steps);
            cJSON_AddNumberToObject(o, "resumed_from", (double)e->resumed_from);
            cJSON_AddNumberToObject(o, "train_documents", (double)e->train_documents);
            cJSON_AddNumberToObject(o, "validation_documents", (double)e->validation_documents);
            cJSON_AddNumberToObject(o, "train_rows", (double)e->train_rows);
            cJSON_AddNumberToObject(o, "validation_rows", (double)e->validation_rows);
            cJSON_AddNumberToObject(o, "train_targets", (double)e->train_targets);
            cJSON_AddNumberToObject(o, "val_loss", e->val_loss); /* NaN prints as null */
        } else if (e->type == LQ_FINETUNE_STEP) {
            cJSON_AddStringToObject(o, "type", "step");
            cJSON_AddNumberToObject(o, "step", (double)e->step);
            cJSON_AddNumberToObject(o, "total_steps", (double)e->total_steps);
            cJSON_AddNumberToObject(o, "epoch", e->epoch);
            cJSON_AddNumberToObject(o, "train_loss", e->train_loss);
            cJSON_AddNumberToObject(o, "val_loss", e->val_loss);
            cJSON_AddNumberToObject(o, "learning_rate", e->learning_rate);
            cJSON_AddNumberToObject(o, "grad_norm", e->grad_norm);
            cJSON_AddNumberToObject(o, "tokens", (double)e->tokens);
            cJSON_AddNumberToObject(o, "tokens_per_second", e->tokens_per_second);
            cJSON_AddNumberToObject(o, "eta_seconds", e->eta_seconds);
        } else {
            cJSON_AddStringToObject(o, "type", "checkpoint");
            cJSON_AddNumberToObject(o, "step", (double)e->step);
            cJSON_AddStringToObject(o, "path", e->path ? e->path : "");
        }
        print_json_line(o);
    } else if (!p->quiet) {
        double now = now_seconds();
        if (e->type == LQ_FINETUNE_START) {
            fprintf(stderr,
                    "lqd finetune: %zu training documents in %zu rows (%zu targets), %zu "
                    "validation rows; %ld steps",
                    e->train_documents, e->train_rows, e->train_targets, e->validation_rows,
                    e->total_steps);
            if (e->resumed_from) fprintf(stderr, ", resuming at step %ld", e->resumed_from);
            if (!isnan(e->val_loss)) fprintf(stderr, "; validation loss %.4f", e->val_loss);
            fputc('\n', stderr);
        } else if (e->type == LQ_FINETUNE_STEP &&
                   (!isnan(e->val_loss) || e->step == e->total_steps ||
                    now - p->last_line >= 1.0)) {
            p->last_line = now;
            fprintf(stderr, "step %ld/%ld  loss %.4f", e->step, e->total_steps, e->train_loss);
            if (!isnan(e->val_loss)) fprintf(stderr, "  val %.4f", e->val_loss);
            fprintf(stderr, "  lr %.3g  %.0f tok/s  ETA %.0fs\n", e->learning_rate,
                    e->tokens_per_second, e->eta_seconds);
        }
    }
    return interrupted ? 1 : 0;
}

/* ---------- the command ---------- */

static int find_tokenizer(const char *model, const char *given, char *out, size_t size,
                          struct lq_error *err) {
    if (given) {
        snprintf(out, size, "%s", given);
        return LQ_OK;
    }
    struct lq_tokenizer_files files;
    int rc = lq_model_file_find_tokenizer(model, 1, &files, err);
    if (rc) return rc;
    const char *path = lq_tokenizer_files_primary(&files);
    if (path) {
        snprintf(out, size, "%s", path);
        return LQ_OK;
    }
    return lq_error_set(err, LQ_ENOTFOUND,
                        "%s: no tokenizer.json, tokenizer.model or tokenizer.bin found; pass "
                        "--tokenizer FILE",
                        model);
}

/* The CPU backend, or what --device names when it can train; a GPU without training ops is
 * said so on stderr and the CPU trains instead. */
static int open_backend(const struct lq_cli_device *device, struct lq_backend **out,
                        struct lq_error *err) {
    if (device->device && strcmp(device->device, "cpu") != 0) {
        char notice[LQ_BACKEND_NOTICE_SIZE];
        struct lq_backend *backend = NULL;
        int rc = lq_backend_open(device->device, device->memory_limit, &backend, notice, err);
        if (rc) return rc;
        int is_cpu = strcmp(backend->ops->name, "cpu") == 0;
        if (is_cpu || (backend->ops->linear_lora && backend->ops->adamw))
            fprintf(stderr, "lqd finetune: %s\n", notice); /* the device, or why not a GPU */
        if (!is_cpu && backend->ops->linear_lora && backend->ops->adamw) {
            *out = backend;
            return LQ_OK;
        }
        fprintf(stderr, "lqd finetune: the %s backend has no training ops: training on the CPU\n",
                backend->ops->name);
        if (is_cpu) {
            *out = backend;
            return LQ_OK;
        }
        backend->ops->destroy(backend);
    }
    return lq_backend_cpu_create(out, err);
}

static void print_report(const struct finetune_args *a, const struct lq_adapter *adapter,
                         const struct lq_finetune_result *r) {
    int pairs = 0, rank = 0;
    for (int i = 0; i < adapter->n_layers * LQ_LINEARS_PER_LAYER; i++)
        if (adapter->matrices[i].rank) pairs++, rank = adapter->matrices[i].rank;
    if (a->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", "done");
        cJSON_AddStringToObject(o, "adapter", a->out);
        cJSON_AddStringToObject(o, "mode", lq_adapter_mode_name(adapter->mode));
        cJSON_AddStringToObject(o, "init", adapter->init);
        cJSON_AddNumberToObject(o, "rank", rank);
        cJSON_AddNumberToObject(o, "matrices", pairs);
        cJSON_AddNumberToObject(o, "steps", (double)r->steps);
        cJSON_AddNumberToObject(o, "resumed_from", (double)r->resumed_from);
        cJSON_AddNumberToObject(o, "train_loss", r->train_loss);
        cJSON_AddNumberToObject(o, "val_loss", r->val_loss);
        cJSON_AddNumberToObject(o, "initial_val_loss", r->initial_val_loss);
        cJSON_AddNumberToObject(o, "seconds", r->seconds);
        print_json_line(o);
        return;
    }
    printf("adapter         %s (%s mode, init %s, rank %d, %d matrices)\n", a->out,
           lq_adapter_mode_name(adapter->mode), adapter->init, rank, pairs);
    printf("steps           %ld", r->steps);
    if (r->resumed_from) printf(" (resumed from step %ld)", r->resumed_from);
    printf("\n");
    if (!isnan(r->train_loss)) printf("train loss      %.4f (last step)\n", r->train_loss);
    if (!isnan(r->val_loss)) {
        printf("validation loss %.4f", r->val_loss);
        if (!isnan(r->initial_val_loss)) printf(" (before training: %.4f)", r->initial_val_loss);
        printf("\n");
    }
    printf("time            %.1f s\n", r->seconds);
}

int lq_cli_finetune(int argc, char **argv) {
    struct finetune_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;
    if (a.threads) {
        char text[16];
        snprintf(text, sizeof text, "%d", a.threads);
        setenv("LQ_THREADS", text, 1);
    }
    struct lq_error err = {0};
    struct lq_model *model = NULL;
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_backend *backend = NULL;
    struct lq_adapter *adapter = NULL;
    struct lq_chat_style chat_style = {LQ_CHAT_PLAIN, NULL};
    int status = 1;
    struct stat info;
    /* Refuse what would fail at the end before any training. */
    if (lstat(a.out, &info) == 0 && !a.force) {
        lq_error_set(&err, LQ_EINVAL, "%s already exists (--force replaces an adapter directory)",
                     a.out);
        goto fail;
    }
    if (!lq_path_is_file(a.train)) {
        lq_error_set(&err, LQ_EIO, "--train %s: no such file", a.train);
        goto fail;
    }
    if (a.validation && !lq_path_is_file(a.validation)) {
        lq_error_set(&err, LQ_EIO, "--validation %s: no such file", a.validation);
        goto fail;
    }
    char tokenizer_path[4096];
    if (find_tokenizer(a.model, a.tokenizer, tokenizer_path, sizeof tokenizer_path, &err) ||
        lq_model_load(a.model, &model, &err) || lq_tokenizer_load(tokenizer_path, &tokenizer, &err))
        goto fail;

    struct lq_finetune_options o;
    lq_finetune_options_default(&o);
    o.train_path = a.train;
    o.validation_path = a.validation;
    o.validation_fraction = a.validation_fraction;
    lq_dataset_format_parse(a.format, &o.format);
    if (lq_finetune_chat_style(a.model, &chat_style, &err)) goto fail;
    o.chat_style = &chat_style;
    /* Default init: the LQ model's own pair when there is one, else a new pair. */
    const char *init = a.init ? a.init : model->is_lq ? "lq" : "zero";
    lq_lora_init_parse(init, &o.train.init, NULL);
    o.train.rank = a.rank;
    o.train.seed = (uint64_t)a.seed;
    int context = model->config.max_seq_len;
    o.train.seq_len = a.seq_len ? a.seq_len : context < 256 ? context : 256;
    if (o.train.seq_len > context) {
        lq_error_set(&err, LQ_EINVAL, "--seq-len %d: %s allows at most %d positions",
                     o.train.seq_len, a.model, context);
        goto fail;
    }
    o.batch_size = a.batch_size;
    o.train.micro_batch = a.micro_batch ? a.micro_batch : a.batch_size < 4 ? a.batch_size : 4;
    o.train.recompute = a.recompute;
    if (a.have_learning_rate) o.train.learning_rate = a.learning_rate;
    lq_lr_schedule_parse(a.schedule, &o.train.schedule, NULL);
    o.train.warmup_steps = a.warmup;
    o.train.weight_decay = a.weight_decay;
    if (a.have_max_grad_norm) o.train.max_grad_norm = a.max_grad_norm;
    o.steps = a.have_steps ? a.steps : 0;
    o.epochs = a.epochs;
    o.eval_every = a.eval_every;
    o.checkpoint_every = a.checkpoint_every;
    o.checkpoint_path = a.checkpoint;
    struct progress progress = {a.json, a.quiet, -1e9};
    o.on_event = on_event, o.context = &progress;
    if (open_backend(&a.device, &backend, &err)) goto fail;

    struct sigaction action = {0}, old_int, old_term;
    action.sa_handler = on_signal;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &old_int);
    sigaction(SIGTERM, &action, &old_term);
    struct lq_finetune_result result;
    rc = lq_finetune_run(backend, model, tokenizer, &o, &adapter, &result, &err);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (rc && result.interrupted) {
        fprintf(stderr, "lqd finetune: interrupted: %s%s\n", err.message,
                a.checkpoint ? " (the same command resumes from it)" : "");
        status = 130;
        goto done;
    }
    if (rc) goto fail;
    snprintf(adapter->base_model, sizeof adapter->base_model, "%s", a.model);
    if (lq_adapter_save(adapter, a.out, a.force, &err)) goto fail;
    print_report(&a, adapter, &result);
    status = 0;
    goto done;
fail:
    fprintf(stderr, "lqd finetune: %s\n", err.message);
done:
    lq_adapter_free(adapter);
    if (backend) backend->ops->destroy(backend);
    lq_chat_style_free(&chat_style);
    lq_tokenizer_free(tokenizer);
    lq_model_free(model);
    return status;
}
