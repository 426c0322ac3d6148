/* Finetuning from a dataset file to an adapter, as `lqd finetune` and the daemon's finetune
 * jobs run it: the file is read and tokenized (core/dataset.h), its documents packed into rows
 * of seq_len predictions (lq_train_pack, separators already in the documents), rows without a
 * loss target dropped, and a trainer (core/train.h) steps through the rows in a seeded order:
 * epoch e visits every row once, in a permutation drawn from (seed, e), and step s takes the
 * rows s·batch_size … (s + 1)·batch_size − 1 of that endless sequence. The order is a function
 * of the step alone, so a run restored from a checkpoint at step s continues exactly as the
 * uninterrupted run would have, bit for bit.
 *
 * Checkpoints (lq_trainer_save) go to checkpoint_path every checkpoint_every steps, at the end,
 * and when the caller stops the run; beside it, checkpoint_path + ".json" describes the run
 * (data fingerprint, batch, sequence length, seed, optimizer, schedule), and a run that finds
 * a checkpoint resumes from it only when its own description is the same. */
#ifndef LQ_FINETUNE_H
#define LQ_FINETUNE_H

#include <stddef.h>

#include "core/adapter.h"
#include "core/chat_template.h"
#include "core/dataset.h"
#include "core/error.h"
#include "core/model.h"
#include "core/tokenizer.h"
#include "core/train.h"

enum lq_finetune_event_type {
    LQ_FINETUNE_START,      /* data ready; val_loss before any update on a fresh run */
    LQ_FINETUNE_STEP,       /* one optimizer step done */
    LQ_FINETUNE_CHECKPOINT, /* checkpoint_path written at step */
};

struct lq_finetune_event {
    enum lq_finetune_event_type type;
    long step, total_steps;          /* updates made so far (START: 0, or the step restored) */
    double epoch;                    /* rows seen / rows per epoch */
    double train_loss;               /* STEP: the step's mean cross-entropy; else NAN */
    double val_loss;                 /* when validation ran at this point; else NAN */
    double learning_rate, grad_norm; /* STEP */
    long tokens;                     /* STEP: targets in the step's loss */
    double tokens_per_second;        /* targets trained per second in this process (STEP) */
    double eta_seconds;              /* until total_steps, at this process's pace; < 0: unknown */
    long resumed_from;               /* the step the run was restored at (0: fresh) */
    size_t train_documents, validation_documents, train_rows, validation_rows;
    size_t train_targets; /* loss targets in one epoch */
    const char *path;     /* CHECKPOINT: the file */
};

struct lq_finetune_options {
    const char *train_path;
    const char *train_label;      /* the name for format detection and messages; NULL: train_path */
    const char *validation_path;  /* a second file (same format), or NULL */
    const char *validation_label; /* NULL: validation_path */
    double validation_fraction;   /* or hold out this share of train_path's documents */
    enum lq_dataset_format format;
    const struct lq_chat_style *chat_style; /* the model's (lq_finetune_chat_style); borrowed */
    /* init, rank, seed, seq_len, micro_batch, optimizer, schedule, warmup; total_steps is set
     * from steps or epochs. */
    struct lq_train_options train;
    int batch_size;       /* rows per optimizer step */
    long steps;           /* > 0: this many steps */
    double epochs;        /* else ceil(epochs · rows / batch_size) steps */
    int eval_every;       /* validation loss every N steps (0: before training and at the end) */
    int max_eval_rows;    /* validation rows evaluated, at most (0: all) */
    int checkpoint_every; /* 0: only at the end and when stopped */
    double checkpoint_seconds;   /* also at the first step this long after the last (0: not) */
    const char *checkpoint_path; /* NULL: no checkpoints, no resume */
    /* Called after each event, on the caller's thread; nonzero stops the run between steps
     * (a checkpoint is saved first when checkpoint_path is set). */
    int (*on_event)(void *context, const struct lq_finetune_event *event);
    void *context;
};

/* Training defaults (lq_train_options_default), batch 8 rows, 1 epoch, no validation, no
 * checkpoints, format auto, chat format plain. */
void lq_finetune_options_default(struct lq_finetune_options *options);

struct lq_finetune_result {
    long steps, total_steps, resumed_from;
    double train_loss;       /* the last step's (NAN when no step ran in this process) */
    double val_loss;         /* at the end (NAN without validation) */
    double initial_val_loss; /* before training (NAN without validation, or when resumed) */
    double seconds;          /* in this process */
    size_t train_documents, validation_documents, train_rows, validation_rows;
    int interrupted; /* on_event asked to stop */
};

/* Runs the finetuning of model (borrowed; only read) on backend with tokenizer, and returns the
 * trained pairs as a new adapter (*adapter, free with lq_adapter_free): LQ_ADAPTER_REPLACE for
 * init lq, LQ_ADAPTER_ADD for init zero, base_model = model->path. result (optional) gets the
 * figures. When on_event stops it: LQ_EINVAL, result->interrupted = 1 and *adapter NULL. Errors
 * name the file, the option or the checkpoint at fault. */
int lq_finetune_run(struct lq_backend *backend, struct lq_model *model,
                    const struct lq_tokenizer *tokenizer, const struct lq_finetune_options *options,
                    struct lq_adapter **adapter, struct lq_finetune_result *result,
                    struct lq_error *err);

/* The adapter of a trainer's current values (mode by its init; see lq_finetune_run). */
int lq_finetune_adapter(const struct lq_trainer *trainer, const struct lq_model *model,
                        struct lq_adapter **out, struct lq_error *err);

/* The chat style of the model in directory dir: its tokenizer_config.json "chat_template" (a
 * string, or HF's list of {"name", "template"}: "default", else the first), detected with
 * lq_chat_style_detect; for a GGUF model file, its tokenizer.chat_template; plain when there is
 * none (or dir is another file). The caller frees *out with lq_chat_style_free. */
int lq_finetune_chat_style(const char *dir, struct lq_chat_style *out, struct lq_error *err);

#endif
