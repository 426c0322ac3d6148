#include "server/allocation_svg.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/file_util.h"
#include "core/safetensors.h"

void lq_allocation_labels_read(const char *dir, struct lq_allocation_labels *labels,
                               char *rank_buffer, size_t rank_size) {
    labels->budget = NAN;
    labels->rank = rank_buffer;
    rank_buffer[0] = '\0';
    char path[4096 + 32];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct lq_safetensors *file;
    if (!lq_path_is_file(path) || lq_safetensors_open(path, &file, NULL) != 0) return;
    const char *value;
    if ((value = lq_safetensors_metadata(file, "lqd.bits"))) labels->budget = strtod(value, NULL);
    if ((value = lq_safetensors_metadata(file, "lqd.rank")))
        snprintf(rank_buffer, rank_size, "%s", value);
    lq_safetensors_close(file);
}

/* Tableau 10: distinct for the colour-blind and in greyscale print. */
static const char *const kind_colors[LQ_LINEARS_PER_LAYER] = {
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"};

static void xml_escape(FILE *out, const char *text) {
    for (; *text; text++) {
        switch (*text) {
        case '<':
            fputs("&lt;", out);
            break;
        case '>':
            fputs("&gt;", out);
            break;
        case '&':
            fputs("&amp;", out);
            break;
        case '"':
            fputs("&quot;", out);
            break;
        default:
            fputc(*text, out);
        }
    }
}

/* Grouped bars (a bar per matrix type in each layer's group) while they stay readable,
 * lines with markers for deep models. y = bits/param of the quantized part. */
void lq_allocation_svg_draw(FILE *out, const struct lq_allocation_labels *labels,
                            const struct lq_model_summary *s, int layers) {
    const double width = 960, height = 540, left = 70, right = 100, top = 64, bottom = 92;
    const double plot_w = width - left - right, plot_h = height - top - bottom;
    int any_lq = 0;
    for (size_t i = 0; i < s->n_matrices; i++) any_lq |= s->matrices[i].is_lq;
/* Matrices drawn: the LQ ones, or every one of a dense model. */
#define DRAWN(m) ((m)->is_lq || !any_lq)
    double lo = INFINITY, hi = -INFINITY;
    for (size_t i = 0; i < s->n_matrices; i++)
        if (DRAWN(&s->matrices[i])) {
            lo = fmin(lo, s->matrices[i].bits_per_param);
            hi = fmax(hi, s->matrices[i].bits_per_param);
        }
    double budget = labels->budget;
    if (isfinite(budget)) lo = fmin(lo, budget), hi = fmax(hi, budget);
    double y0 = fmax(0.0, floor(lo * 2.0) / 2.0 - 0.5), y1 = ceil(hi * 2.0) / 2.0 + 0.5;
    double tick = y1 - y0 > 6 ? 1.0 : 0.5;
#define Y(v) (top + plot_h * (1.0 - ((v)-y0) / (y1 - y0)))
    fprintf(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    fprintf(out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
            "viewBox=\"0 0 %.0f %.0f\" font-family=\"Helvetica, Arial, sans-serif\">\n",
            width, height, width, height);
    fprintf(out, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    fprintf(out,
            "<text x=\"%.1f\" y=\"28\" font-size=\"17\" font-weight=\"bold\" "
            "text-anchor=\"middle\">",
            left + plot_w / 2);
    xml_escape(out, labels->title ? labels->title : "model");
    fprintf(out, ": bits per parameter by layer</text>\n");
    fprintf(out,
            "<text x=\"%.1f\" y=\"48\" font-size=\"13\" fill=\"#444\" text-anchor=\"middle\">"
            "average %.3f bits/param (quantized part), %.3f effective with L1 L2",
            left + plot_w / 2, s->bits_per_param, s->effective_bits);
    if (isfinite(budget)) fprintf(out, "; budget %g", budget);
    if (labels->rank && labels->rank[0]) fprintf(out, "; rank %s", labels->rank);
    fprintf(out, "</text>\n");
    /* Grid lines and the y axis. */
    for (double v = y0; v <= y1 + 1e-9; v += tick) {
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n",
                left, Y(v), left + plot_w, Y(v));
        fprintf(out,
                "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"end\">%.1f</text>\n",
                left - 8, Y(v) + 4, v);
    }
    fprintf(out,
            "<text transform=\"translate(22 %.1f) rotate(-90)\" font-size=\"13\" "
            "text-anchor=\"middle\">bits / parameter (quantized part)</text>\n",
            top + plot_h / 2);
    double group = plot_w / layers;
    int bars = layers <= 16;
    double bar = group * 0.8 / LQ_LINEARS_PER_LAYER;
    int label_every = layers <= 32 ? 1 : layers <= 64 ? 4 : 8;
    for (int l = 0; l < layers; l++) {
        if (l % label_every) continue;
        fprintf(out,
                "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"middle\">%d</text>\n",
                left + group * (l + 0.5), top + plot_h + 18, l);
    }
    fprintf(out,
            "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"middle\">layer</text>\n",
            left + plot_w / 2, top + plot_h + 44);
    for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
        if (!bars)
            fprintf(out, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.6\" points=\"",
                    kind_colors[k]);
        for (int l = 0; l < layers; l++) {
            const struct lq_matrix_summary *m =
                &s->matrices[(size_t)l * LQ_LINEARS_PER_LAYER + (size_t)k];
            if (!DRAWN(m)) continue;
            double v = m->bits_per_param;
            if (bars)
                fprintf(out,
                        "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" "
                        "fill=\"%s\"><title>layer %d %s: %.4f bits/param</title></rect>\n",
                        left + group * (l + 0.1) + bar * k, Y(v), bar * 0.92, Y(y0) - Y(v),
                        kind_colors[k], l, lq_linear_kind_short((enum lq_linear_kind)k), v);
            else
                fprintf(out, "%.2f,%.2f ", left + group * (l + 0.5), Y(v));
        }
        if (!bars) fprintf(out, "\"/>\n");
    }
    /* Reference lines: the average reached, and the budget asked for. */
    fprintf(out,
            "<line x1=\"%.1f\" y1=\"%.2f\" x2=\"%.1f\" y2=\"%.2f\" stroke=\"#222\" "
            "stroke-dasharray=\"6 4\"/>\n",
            left, Y(s->bits_per_param), left + plot_w, Y(s->bits_per_param));
    fprintf(out, "<text x=\"%.1f\" y=\"%.2f\" font-size=\"11\">average %.3f</text>\n",
            left + plot_w + 6, Y(s->bits_per_param) + 4, s->bits_per_param);
    if (isfinite(budget) && fabs(budget - s->bits_per_param) * plot_h / (y1 - y0) > 12)
        fprintf(out,
                "<text x=\"%.1f\" y=\"%.2f\" font-size=\"11\" fill=\"#b00\">budget %g</text>\n",
                left + plot_w + 6, Y(budget) + 4, budget);
    if (isfinite(budget))
        fprintf(out,
                "<line x1=\"%.1f\" y1=\"%.2f\" x2=\"%.1f\" y2=\"%.2f\" stroke=\"#b00\" "
                "stroke-dasharray=\"2 3\"/>\n",
                left, Y(budget), left + plot_w, Y(budget));
    fprintf(out,
            "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
            "stroke=\"#888\"/>\n",
            left, top, plot_w, plot_h);
    /* Legend: one row under the axis, where nothing else is drawn. */
    double legend_x = left + plot_w / 2 - LQ_LINEARS_PER_LAYER * 72.0 / 2;
    for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
        double x = legend_x + 72.0 * k, y = height - 18;
        fprintf(out, "<rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"14\" fill=\"%s\"/>\n", x,
                y - 12, kind_colors[k]);
        fprintf(out, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\">%s</text>\n", x + 19, y,
                lq_linear_kind_short((enum lq_linear_kind)k));
    }
    fprintf(out, "</svg>\n");
#undef Y
#undef DRAWN
}

int lq_allocation_svg_string(const struct lq_allocation_labels *labels,
                             const struct lq_model_summary *s, int layers, char **text,
                             size_t *length, struct lq_error *err) {
    *text = NULL;
    *length = 0;
    FILE *out = open_memstream(text, length);
    if (!out) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    lq_allocation_svg_draw(out, labels, s, layers);
    if (fclose(out) != 0) {
        free(*text);
        *text = NULL;
        return lq_error_set(err, LQ_ENOMEM, "out of memory drawing the allocation");
    }
    return LQ_OK;
}
