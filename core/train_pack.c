/* Sequence packing for training (core/train.h): documents with per-token loss masks into
 * fixed rows of inputs, targets and mask, separated by BOS/EOS, with no padding but at the
 * very end. */
#include <stdlib.h>
#include <string.h>

#include "core/train.h"

int lq_train_pack(const struct lq_train_document *documents, size_t count,
                  const struct lq_train_pack_options *o, struct lq_train_packed *out,
                  struct lq_error *err) {
    memset(out, 0, sizeof *out);
    if (o->seq_len < 1) return lq_error_set(err, LQ_EINVAL, "seq_len %d must be >= 1", o->seq_len);
    /* the stream: [BOS] tokens [EOS] per non-empty document, with the mask of each token as
     * a target (a BOS never is one; an EOS takes its document's last mask) */
    size_t length = 0;
    for (size_t d = 0; d < count; d++)
        if (documents[d].length)
            length += documents[d].length + (o->bos_id >= 0) + (o->eos_id >= 0);
    int *stream = malloc((length ? length : 1) * sizeof *stream);
    unsigned char *in_loss = malloc(length ? length : 1);
    if (!stream || !in_loss) {
        free(stream), free(in_loss);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for %zu packed tokens", length);
    }
    size_t at = 0;
    for (size_t d = 0; d < count; d++) {
        const struct lq_train_document *doc = &documents[d];
        if (!doc->length) continue;
        if (o->bos_id >= 0) stream[at] = o->bos_id, in_loss[at++] = 0;
        for (size_t i = 0; i < doc->length; i++) {
            if (doc->tokens[i] < 0) {
                free(stream), free(in_loss);
                return lq_error_set(err, LQ_EINVAL, "document %zu: token %zu is %d", d, i,
                                    doc->tokens[i]);
            }
            stream[at] = doc->tokens[i];
            in_loss[at++] = doc->mask ? doc->mask[i] != 0 : 1;
        }
        if (o->eos_id >= 0) {
            stream[at] = o->eos_id;
            in_loss[at] = in_loss[at - 1];
            at++;
        }
    }
    /* length − 1 predictions (each token but the first predicted from what precedes it) */
    size_t predictions = length > 1 ? length - 1 : 0, T = (size_t)o->seq_len;
    size_t rows = (predictions + T - 1) / T;
    if (rows > (size_t)1 << 30) {
        free(stream), free(in_loss);
        return lq_error_set(err, LQ_EINVAL, "%zu packed rows are too many", rows);
    }
    out->rows = (int)rows, out->seq_len = o->seq_len;
    out->inputs = malloc((rows * T + 1) * sizeof *out->inputs);
    out->targets = malloc((rows * T + 1) * sizeof *out->targets);
    out->mask = malloc(rows * T + 1);
    if (!out->inputs || !out->targets || !out->mask) {
        free(stream), free(in_loss);
        lq_train_packed_free(out);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for %zu packed rows", rows);
    }
    for (size_t i = 0; i < rows * T; i++) {
        int real = i < predictions;
        out->inputs[i] = real ? stream[i] : o->pad_id;
        out->targets[i] = real ? stream[i + 1] : o->pad_id;
        out->mask[i] = real ? in_loss[i + 1] : 0;
        out->tokens_in_loss += out->mask[i];
    }
    free(stream), free(in_loss);
    return LQ_OK;
}

void lq_train_packed_free(struct lq_train_packed *packed) {
    free(packed->inputs), free(packed->targets), free(packed->mask);
    memset(packed, 0, sizeof *packed);
}

struct lq_train_batch lq_train_packed_batch(const struct lq_train_packed *packed, int first,
                                            int rows) {
    size_t offset = (size_t)first * packed->seq_len;
    struct lq_train_batch batch = {rows, packed->seq_len, packed->inputs + offset,
                                   packed->targets + offset, packed->mask + offset};
    return batch;
}
