/* The picture of a model's bit allocation: bits/param of each linear matrix type against the
 * layer, as a self-contained SVG (grouped bars while they stay readable, lines for deep
 * models), with the average reached and the budget asked for. Drawn by `lqd inspect --svg`
 * and served at GET /v1/models/{id}/allocation.svg. */
#ifndef LQ_ALLOCATION_SVG_H
#define LQ_ALLOCATION_SVG_H

#include <stdio.h>

#include "core/error.h"
#include "core/lq_model_file.h"

/* What the model file says beyond the summary: its "lqd.bits" budget and "lqd.rank". */
struct lq_allocation_labels {
    const char *title; /* the model's name */
    double budget;     /* NAN when unknown */
    const char *rank;  /* NULL or "" when unknown */
};

/* Reads "lqd.bits" and "lqd.rank" from dir/model.safetensors when there is one (budget NAN
 * and rank "" otherwise); rank is written into rank_buffer. */
void lq_allocation_labels_read(const char *dir, struct lq_allocation_labels *labels,
                               char *rank_buffer, size_t rank_size);

/* Draws s (a model of `layers` layers) to out. A model without LQ matrices is drawn with its
 * dense matrices (32 bits/param), so every model has a picture. */
void lq_allocation_svg_draw(FILE *out, const struct lq_allocation_labels *labels,
                            const struct lq_model_summary *s, int layers);

/* The same into a malloc'ed string (*length bytes); LQ_ENOMEM on failure. */
int lq_allocation_svg_string(const struct lq_allocation_labels *labels,
                             const struct lq_model_summary *s, int layers, char **text,
                             size_t *length, struct lq_error *err);

#endif
