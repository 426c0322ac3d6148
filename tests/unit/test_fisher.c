/* The diagonal empirical Fisher information (core/fisher.h) of a tiny random dense model
 * against central differences of the same network in double (train_reference.h), its file,
 * and what it refuses. */
#include <unistd.h>

#include "core/fisher.h"
#include "core/safetensors.h"
#include "tests/unit/lq_test.h"
#include "tests/unit/train_reference.h"

static void test_fisher(void) {
    struct lq_model *m = tiny_model(0, 0, 20);
    struct lq_rng rng;
    lq_rng_seed(&rng, 21);
    int tokens[3][8];
    const int lengths[] = {5, 8, 4};
    const int *sequences[] = {tokens[0], tokens[1], tokens[2]};
    for (int s = 0; s < 3; s++)
        for (int t = 0; t < 8; t++) tokens[s][t] = (int)(lq_rng_next(&rng) % VOCAB);
    struct lq_fisher fisher;
    CHECK_OK(lq_fisher_compute(cpu(), m, sequences, lengths, 3, NULL, &fisher, NULL));
    CHECK(fisher.samples == 3 && fisher.n_layers == LAYERS);
    /* F = mean over sequences of (∂ mean loss / ∂W)², by central differences in double */
    struct ref_model r;
    ref_build(&r, m, 0);
    double worst = 0;
    for (int l = 0; l < LAYERS; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            struct ref_linear *w = &r.linear[l][k];
            size_t n = (size_t)w->rows * w->cols;
            double *reference = calloc(n, sizeof *reference);
            for (int s = 0; s < 3; s++) {
                struct lq_train_batch b = {1, lengths[s] - 1, sequences[s], sequences[s] + 1, NULL};
                for (size_t i = 0; i < n; i++) {
                    double saved = w->w[i];
                    w->w[i] = saved + 1e-5;
                    double plus = ref_loss(&r, &b);
                    w->w[i] = saved - 1e-5;
                    double minus = ref_loss(&r, &b);
                    w->w[i] = saved;
                    double g = (plus - minus) / 2e-5;
                    reference[i] += g * g / 3;
                }
            }
            double e =
                relative_error(lq_fisher_matrix(&fisher, l, (enum lq_linear_kind)k), reference, n);
            CHECK_MSG(e < 1e-2, "Fisher of layer %d %s: relative error %g", l,
                      lq_linear_kind_short((enum lq_linear_kind)k), e);
            worst = fmax(worst, e);
            free(reference);
        }
    printf("  Fisher: worst relative error per matrix %.2e\n", worst);
    ref_free(&r);
    /* saved under the weights' names, as lqd decompose --fisher FILE:NAME reads it */
    char dir[] = "/tmp/lqd_fisher_XXXXXX", path[256];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/fisher.safetensors", dir);
    CHECK_OK(lq_fisher_save(&fisher, m, path, NULL));
    struct lq_safetensors *file = NULL;
    float *values = NULL;
    CHECK_OK(lq_safetensors_open(path, &file, NULL));
    if (file) {
        CHECK_OK(lq_safetensors_read_f32(file, "model.layers.1.mlp.gate_proj.weight", &values, NULL,
                                         NULL));
        CHECK(values && !memcmp(values, lq_fisher_matrix(&fisher, 1, LQ_GATE_PROJ),
                                (size_t)HIDDEN * DIM * sizeof(float)));
        lq_safetensors_close(file);
    }
    free(values);
    unlink(path), rmdir(dir);
    lq_fisher_free(&fisher);
    /* refused: an LQ model, a sequence with nothing to predict */
    struct lq_error err = {0};
    const int one[] = {1};
    CHECK(lq_fisher_compute(cpu(), m, (const int *const[]){one}, (const int[]){1}, 1, NULL, &fisher,
                            &err) == LQ_EINVAL);
    lq_model_free(m);
    m = tiny_model(1, 2, 20);
    CHECK(lq_fisher_compute(cpu(), m, sequences, lengths, 3, NULL, &fisher, &err) == LQ_EINVAL &&
          strstr(err.message, "dense"));
    lq_model_free(m);
}

LQ_TEST_MAIN(LQ_TEST(test_fisher))
