/* The LoRA trainer (core/train.h) on tiny random models, against the same network written again
 * in double and differentiated by central differences (train_reference.h); the optimizer's
 * schedule, clipping, accumulation, masking, checkpoints, export and packing; and a short real
 * training run on the shipped stories260K-lq. */
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "core/forward.h"
#include "core/parallel.h"
#include "core/safetensors.h"
#include "core/tokenizer.h"
#include "core/train.h"
#include "kernels/cpu/nf_gemv.h"
#include "tests/unit/lq_test.h"
#include "tests/unit/train_reference.h"

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

/* Points every linear's pair at the trainer's layout in params. */
static void ref_attach(struct ref_model *r, const struct lq_trainer *t, const double *params) {
    for (int l = 0; l < LAYERS; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            struct lq_trainer_matrix info;
            lq_trainer_matrix_info(t, l, (enum lq_linear_kind)k, &info);
            r->linear[l][k].rank = info.rank;
            r->linear[l][k].L1 = params + info.L1_offset;
            r->linear[l][k].L2 = params + info.L2_offset;
        }
}

/* ---------- fixtures ---------- */

struct tiny_batch {
    int inputs[4 * MAX_T], targets[4 * MAX_T];
    unsigned char mask[4 * MAX_T];
    struct lq_train_batch batch;
};

static void tiny_batch(struct tiny_batch *b, int rows, int T, uint64_t seed, int masked) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    for (int i = 0; i < rows * T; i++) {
        b->inputs[i] = (int)(lq_rng_next(&rng) % VOCAB);
        b->targets[i] = (int)(lq_rng_next(&rng) % VOCAB);
        b->mask[i] = masked ? (i % 3 != 1) : 1;
    }
    struct lq_train_batch batch = {rows, T, b->inputs, b->targets, b->mask};
    b->batch = batch;
}

static struct lq_trainer *make_trainer(struct lq_model *m, enum lq_lora_init init, int rank,
                                       int micro, int recompute) {
    struct lq_train_options o;
    lq_train_options_default(&o);
    o.init = init, o.rank = rank, o.seq_len = MAX_T, o.micro_batch = micro;
    o.recompute = recompute, o.seed = 42;
    struct lq_trainer *t = NULL;
    struct lq_error err = {0};
    if (lq_trainer_create(cpu(), m, &o, &t, &err)) {
        fprintf(stderr, "lq_trainer_create: %s\n", err.message);
        abort();
    }
    return t;
}

/* Sets every pair to random values (a fresh L1 = 0 would hide half the gradient). */
static void randomize_parameters(struct lq_trainer *t, uint64_t seed) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    size_t n = lq_trainer_parameter_count(t);
    float *p = random_array(&rng, n, 0, 0.3);
    CHECK_OK(lq_trainer_set_parameters(t, p, NULL));
    free(p);
}

/* The trainer's gradient against central differences of the double network, per tensor
 * (each matrix's L1 and L2). Returns the worst relative error. */
static double check_model_gradient(struct lq_trainer *t, struct lq_model *m, int with_own_pair,
                                   const struct lq_train_batch *batch, const char *label) {
    size_t n = lq_trainer_parameter_count(t);
    float *p = malloc(n * sizeof *p), *g = malloc(n * sizeof *g);
    double loss = 0, *numeric = malloc(n * sizeof *numeric);
    CHECK_OK(lq_trainer_gradient(t, batch, &loss, NULL, NULL));
    CHECK_OK(lq_trainer_get_gradients(t, g, NULL));
    CHECK_OK(lq_trainer_get_parameters(t, p, NULL));
    double *params = to_double(p, n);
    struct ref_model r;
    ref_build(&r, m, with_own_pair);
    ref_attach(&r, t, params);
    double reference = ref_loss(&r, batch);
    CHECK_MSG(fabs(loss - reference) < 1e-5 * fabs(reference), "%s: loss %.9g, double %.9g", label,
              loss, reference);
    const double step = 1e-5;
    for (size_t i = 0; i < n; i++) {
        double saved = params[i];
        params[i] = saved + step;
        double plus = ref_loss(&r, batch);
        params[i] = saved - step;
        double minus = ref_loss(&r, batch);
        params[i] = saved;
        numeric[i] = (plus - minus) / (2 * step);
    }
    double worst = 0;
    for (int l = 0; l < LAYERS; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            struct lq_trainer_matrix info;
            lq_trainer_matrix_info(t, l, (enum lq_linear_kind)k, &info);
            size_t l1 = (size_t)info.rows * info.rank, l2 = (size_t)info.rank * info.cols;
            double e1 = relative_error(g + info.L1_offset, numeric + info.L1_offset, l1);
            double e2 = relative_error(g + info.L2_offset, numeric + info.L2_offset, l2);
            CHECK_MSG(e1 < 1e-2 && e2 < 1e-2, "%s: layer %d %s: relative error L1 %g, L2 %g", label,
                      l, lq_linear_kind_short((enum lq_linear_kind)k), e1, e2);
            worst = fmax(worst, fmax(e1, e2));
        }
    printf("  %s: loss %.6f, worst relative gradient error per tensor %.2e (%zu parameters)\n",
           label, loss, worst, n);
    ref_free(&r);
    free(p), free(g), free(numeric), free(params);
    return worst;
}

/* ---------- gradients of whole models ---------- */

static void test_gradient_lq_init(void) {
    struct lq_model *m = tiny_model(1, 4, 1);
    struct lq_trainer *t = make_trainer(m, LQ_LORA_INIT_LQ, 0, 2, 0);
    struct tiny_batch b;
    tiny_batch(&b, 2, 6, 11, 1);
    check_model_gradient(t, m, 0, &b.batch, "LQ init, rank 4");
    lq_trainer_free(t);
    lq_model_free(m);
}

static void test_gradient_zero_init(void) {
    /* an LQ model with its own frozen pair of rank 2, a new pair of rank 3 on top, one row
     * per micro-batch, activations recomputed */
    struct lq_model *m = tiny_model(1, 2, 2);
    struct lq_trainer *t = make_trainer(m, LQ_LORA_INIT_ZERO, 3, 1, 1);
    randomize_parameters(t, 5);
    struct tiny_batch b;
    tiny_batch(&b, 2, 7, 12, 1);
    check_model_gradient(t, m, 1, &b.batch, "zero init on LQ, rank 3, recompute");
    lq_trainer_free(t);
    lq_model_free(m);
    /* LoRA on a dense model */
    m = tiny_model(0, 0, 3);
    t = make_trainer(m, LQ_LORA_INIT_ZERO, 2, 4, 0);
    randomize_parameters(t, 6);
    tiny_batch(&b, 3, 5, 13, 0);
    check_model_gradient(t, m, 1, &b.batch, "zero init on dense, rank 2");
    lq_trainer_free(t);
    lq_model_free(m);
}

/* Recomputing activations gives the gradient of keeping them. */
static void test_recompute(void) {
    struct lq_model *m = tiny_model(1, 4, 4);
    struct lq_trainer *saved = make_trainer(m, LQ_LORA_INIT_LQ, 0, 2, 0);
    struct lq_trainer *recomputed = make_trainer(m, LQ_LORA_INIT_LQ, 0, 2, 1);
    struct tiny_batch b;
    tiny_batch(&b, 2, 9, 14, 1);
    size_t n = lq_trainer_parameter_count(saved);
    float *g1 = malloc(n * sizeof *g1), *g2 = malloc(n * sizeof *g2);
    CHECK_OK(lq_trainer_gradient(saved, &b.batch, NULL, NULL, NULL));
    CHECK_OK(lq_trainer_gradient(recomputed, &b.batch, NULL, NULL, NULL));
    CHECK_OK(lq_trainer_get_gradients(saved, g1, NULL));
    CHECK_OK(lq_trainer_get_gradients(recomputed, g2, NULL));
    CHECK(memcmp(g1, g2, n * sizeof *g1) == 0);
    free(g1), free(g2);
    lq_trainer_free(saved), lq_trainer_free(recomputed);
    lq_model_free(m);
}

/* ---------- the optimizer ---------- */

static void test_schedule(void) {
    struct lq_train_options o;
    lq_train_options_default(&o);
    o.learning_rate = 1.0, o.warmup_steps = 10, o.total_steps = 110, o.min_lr_ratio = 0.1;
    CHECK_NEAR(lq_train_learning_rate(&o, 0), 0.1, 1e-12); /* (0 + 1)/10 */
    CHECK_NEAR(lq_train_learning_rate(&o, 4), 0.5, 1e-12);
    CHECK_NEAR(lq_train_learning_rate(&o, 9), 1.0, 1e-12);  /* warmup ends at the peak */
    CHECK_NEAR(lq_train_learning_rate(&o, 10), 1.0, 1e-12); /* the decay starts there */
    CHECK_NEAR(lq_train_learning_rate(&o, 35), 0.1 + 0.45 * (1 + cos(M_PI / 4)), 1e-12);
    CHECK_NEAR(lq_train_learning_rate(&o, 60), 0.55, 1e-12); /* halfway: the mean */
    CHECK_NEAR(lq_train_learning_rate(&o, 110), 0.1, 1e-12);
    CHECK_NEAR(lq_train_learning_rate(&o, 1000), 0.1, 1e-12); /* stays at the minimum */
    o.schedule = LQ_LR_LINEAR;
    CHECK_NEAR(lq_train_learning_rate(&o, 35), 0.775, 1e-12);
    CHECK_NEAR(lq_train_learning_rate(&o, 60), 0.55, 1e-12);
    CHECK_NEAR(lq_train_learning_rate(&o, 110), 0.1, 1e-12);
    CHECK_NEAR(lq_train_learning_rate(&o, 5), 0.6, 1e-12);
    o.schedule = LQ_LR_CONSTANT;
    CHECK_NEAR(lq_train_learning_rate(&o, 5), 0.6, 1e-12);
    CHECK_NEAR(lq_train_learning_rate(&o, 100), 1.0, 1e-12);
    o.schedule = LQ_LR_COSINE, o.total_steps = 0; /* no total: no decay */
    CHECK_NEAR(lq_train_learning_rate(&o, 500), 1.0, 1e-12);
    o.warmup_steps = 0, o.total_steps = 100, o.min_lr_ratio = 0;
    CHECK_NEAR(lq_train_learning_rate(&o, 0), 1.0, 1e-12);
    CHECK_NEAR(lq_train_learning_rate(&o, 100), 0.0, 1e-12);
    enum lq_lr_schedule s;
    enum lq_lora_init init;
    struct lq_error err = {0};
    CHECK(lq_lr_schedule_parse("linear", &s, NULL) == 0 && s == LQ_LR_LINEAR);
    CHECK(lq_lr_schedule_parse("step", &s, &err) == LQ_EINVAL && strstr(err.message, "step"));
    CHECK(lq_lora_init_parse("zero", &init, NULL) == 0 && init == LQ_LORA_INIT_ZERO);
    o.min_lr_ratio = 2;
    CHECK(lq_train_options_validate(&o, &err) == LQ_EINVAL && strstr(err.message, "min_lr"));
}

/* One step with the gradient clipped: the first AdamW step moves each parameter by
 * lr·c·g/(|c·g| + eps), which depends on the clipping scale c through eps. */
static void test_clipping(void) {
    struct lq_model *m = tiny_model(1, 4, 5);
    struct lq_train_options o;
    lq_train_options_default(&o);
    o.seq_len = MAX_T, o.micro_batch = 2, o.learning_rate = 0.1, o.eps = 1e-3;
    o.max_grad_norm = 0.01;
    struct lq_trainer *t = NULL;
    CHECK_OK(lq_trainer_create(cpu(), m, &o, &t, NULL));
    struct tiny_batch b;
    tiny_batch(&b, 2, 6, 15, 0);
    size_t n = lq_trainer_parameter_count(t);
    float *p0 = malloc(n * sizeof *p0), *g = malloc(n * sizeof *g), *p1 = malloc(n * sizeof *p1);
    CHECK_OK(lq_trainer_get_parameters(t, p0, NULL));
    CHECK_OK(lq_trainer_gradient(t, &b.batch, NULL, NULL, NULL));
    CHECK_OK(lq_trainer_get_gradients(t, g, NULL));
    double norm = 0;
    for (size_t i = 0; i < n; i++) norm += (double)g[i] * g[i];
    norm = sqrt(norm);
    struct lq_train_stats stats;
    CHECK_OK(lq_trainer_step(t, &b.batch, &stats, NULL));
    CHECK_NEAR(stats.grad_norm, norm, 1e-6 * norm);
    double c = 0.01 / (norm + 1e-6);
    CHECK_NEAR(stats.clip_scale, c, 1e-9);
    CHECK(norm > 0.01 && stats.step == 1 && stats.learning_rate == 0.1);
    CHECK_OK(lq_trainer_get_parameters(t, p1, NULL));
    double *expected = malloc(n * sizeof *expected);
    for (size_t i = 0; i < n; i++) {
        double cg = c * g[i];
        expected[i] = p0[i] - 0.1 * cg / (fabs(cg) + 1e-3);
    }
    double e = relative_error(p1, expected, n);
    CHECK_MSG(e < 1e-6, "clipped step: relative error %g", e);
    lq_trainer_free(t);
    o.max_grad_norm = 1e9; /* not reached: no clipping */
    CHECK_OK(lq_trainer_create(cpu(), m, &o, &t, NULL));
    CHECK_OK(lq_trainer_step(t, &b.batch, &stats, NULL));
    CHECK(stats.clip_scale == 1.0);
    lq_trainer_free(t);
    free(p0), free(g), free(p1), free(expected);
    lq_model_free(m);
}

/* Two micro-batches of one row give the gradient and the step of one micro-batch of two. */
static void test_accumulation(void) {
    struct lq_model *m = tiny_model(1, 4, 6);
    struct lq_trainer *one = make_trainer(m, LQ_LORA_INIT_LQ, 0, 1, 0);
    struct lq_trainer *two = make_trainer(m, LQ_LORA_INIT_LQ, 0, 2, 0);
    struct tiny_batch b;
    tiny_batch(&b, 2, 8, 16, 1);
    size_t n = lq_trainer_parameter_count(one);
    float *a = malloc(n * sizeof *a), *c = malloc(n * sizeof *c);
    double loss_one, loss_two;
    CHECK_OK(lq_trainer_gradient(one, &b.batch, &loss_one, NULL, NULL));
    CHECK_OK(lq_trainer_gradient(two, &b.batch, &loss_two, NULL, NULL));
    CHECK_NEAR(loss_one, loss_two, 1e-6 * loss_two);
    CHECK_OK(lq_trainer_get_gradients(one, a, NULL));
    CHECK_OK(lq_trainer_get_gradients(two, c, NULL));
    double *reference = to_double(c, n);
    CHECK_MSG(relative_error(a, reference, n) < 1e-5, "accumulated gradient: %g",
              relative_error(a, reference, n));
    CHECK_OK(lq_trainer_step(one, &b.batch, NULL, NULL));
    CHECK_OK(lq_trainer_step(two, &b.batch, NULL, NULL));
    CHECK_OK(lq_trainer_get_parameters(one, a, NULL));
    CHECK_OK(lq_trainer_get_parameters(two, c, NULL));
    free(reference);
    reference = to_double(c, n);
    CHECK_MSG(relative_error(a, reference, n) < 1e-5, "accumulated step: %g",
              relative_error(a, reference, n));
    free(a), free(c), free(reference);
    lq_trainer_free(one), lq_trainer_free(two);
    lq_model_free(m);
}

/* Masked-out targets change nothing: neither loss nor gradient moves when they do. */
static void test_masking(void) {
    struct lq_model *m = tiny_model(1, 4, 7);
    struct lq_trainer *t = make_trainer(m, LQ_LORA_INIT_LQ, 0, 2, 0);
    struct tiny_batch b;
    tiny_batch(&b, 2, 6, 17, 1);
    size_t n = lq_trainer_parameter_count(t);
    float *g1 = malloc(n * sizeof *g1), *g2 = malloc(n * sizeof *g2);
    double loss1, loss2;
    long tokens;
    CHECK_OK(lq_trainer_gradient(t, &b.batch, &loss1, &tokens, NULL));
    CHECK(tokens == 8); /* 12 positions, every third masked out */
    CHECK_OK(lq_trainer_get_gradients(t, g1, NULL));
    for (int i = 0; i < 12; i++)
        if (!b.mask[i]) b.targets[i] = (b.targets[i] + 7) % VOCAB;
    CHECK_OK(lq_trainer_gradient(t, &b.batch, &loss2, NULL, NULL));
    CHECK_OK(lq_trainer_get_gradients(t, g2, NULL));
    CHECK(loss1 == loss2);
    CHECK(memcmp(g1, g2, n * sizeof *g1) == 0);
    for (int i = 0; i < 12; i++)
        if (!b.mask[i]) b.targets[i] = -1; /* never read */
    CHECK_OK(lq_trainer_gradient(t, &b.batch, &loss2, NULL, NULL));
    CHECK(loss1 == loss2);
    /* an all-ones mask is no mask */
    memset(b.mask, 1, sizeof b.mask);
    for (int i = 0; i < 12; i++) b.targets[i] = i % VOCAB;
    CHECK_OK(lq_trainer_gradient(t, &b.batch, &loss1, NULL, NULL));
    CHECK_OK(lq_trainer_get_gradients(t, g1, NULL));
    b.batch.mask = NULL;
    CHECK_OK(lq_trainer_gradient(t, &b.batch, &loss2, &tokens, NULL));
    CHECK_OK(lq_trainer_get_gradients(t, g2, NULL));
    CHECK(loss1 == loss2 && tokens == 12 && memcmp(g1, g2, n * sizeof *g1) == 0);
    /* nothing in the loss, bad tokens, rows too long */
    struct lq_error err = {0};
    memset(b.mask, 0, sizeof b.mask);
    b.batch.mask = b.mask;
    CHECK(lq_trainer_step(t, &b.batch, NULL, &err) == LQ_EINVAL &&
          strstr(err.message, "no target"));
    b.mask[3] = 1, b.inputs[5] = VOCAB;
    CHECK(lq_trainer_step(t, &b.batch, NULL, &err) == LQ_EINVAL && strstr(err.message, "vocab"));
    b.inputs[5] = 0, b.batch.seq_len = MAX_T + 1;
    CHECK(lq_trainer_step(t, &b.batch, NULL, &err) == LQ_EINVAL);
    CHECK(lq_trainer_step_count(t) == 0);
    free(g1), free(g2);
    lq_trainer_free(t);
    lq_model_free(m);
}

/* ---------- checkpoints and export ---------- */

static void test_checkpoint(void) {
    char dir[] = "/tmp/lqd_train_XXXXXX", path[256];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/checkpoint.safetensors", dir);
    struct lq_model *m = tiny_model(1, 2, 8);
    struct lq_train_options o;
    lq_train_options_default(&o);
    o.init = LQ_LORA_INIT_ZERO, o.rank = 3, o.seq_len = MAX_T, o.micro_batch = 2;
    o.learning_rate = 0.01, o.warmup_steps = 2, o.total_steps = 6, o.weight_decay = 0.1;
    o.seed = 1;
    struct tiny_batch batches[5];
    for (int i = 0; i < 5; i++) tiny_batch(&batches[i], 2, 6, 100 + i, 1);
    struct lq_trainer *a = NULL, *b = NULL;
    CHECK_OK(lq_trainer_create(cpu(), m, &o, &a, NULL));
    for (int i = 0; i < 3; i++) CHECK_OK(lq_trainer_step(a, &batches[i].batch, NULL, NULL));
    lq_rng_next(lq_trainer_rng(a)); /* a data order drawn from the trainer's generator */
    CHECK_OK(lq_trainer_save(a, path, NULL));
    for (int i = 3; i < 5; i++) CHECK_OK(lq_trainer_step(a, &batches[i].batch, NULL, NULL));
    o.seed = 2; /* another start, replaced by the checkpoint */
    CHECK_OK(lq_trainer_create(cpu(), m, &o, &b, NULL));
    CHECK_OK(lq_trainer_load(b, path, NULL));
    CHECK(lq_trainer_step_count(b) == 3);
    for (int i = 3; i < 5; i++) CHECK_OK(lq_trainer_step(b, &batches[i].batch, NULL, NULL));
    size_t n = lq_trainer_parameter_count(a);
    float *pa = malloc(n * sizeof *pa), *pb = malloc(n * sizeof *pb);
    CHECK_OK(lq_trainer_get_parameters(a, pa, NULL));
    CHECK_OK(lq_trainer_get_parameters(b, pb, NULL));
    CHECK(memcmp(pa, pb, n * sizeof *pa) == 0); /* the same continuation, bit for bit */
    CHECK(lq_rng_next(lq_trainer_rng(a)) == lq_rng_next(lq_trainer_rng(b)));
    /* any safetensors reader sees PEFT-named factors */
    struct lq_safetensors *file = NULL;
    CHECK_OK(lq_safetensors_open(path, &file, NULL));
    const struct lq_safetensors_tensor *A =
        file ? lq_safetensors_find(file, "model.layers.1.mlp.down_proj.lora_A") : NULL;
    CHECK(A && A->shape[0] == 3 && A->shape[1] == HIDDEN);
    CHECK(file && !strcmp(lq_safetensors_metadata(file, "lqd.step"), "3"));
    lq_safetensors_close(file);
    /* refused: another init, another rank, no file */
    struct lq_error err = {0};
    struct lq_trainer *c = NULL;
    o.init = LQ_LORA_INIT_LQ;
    CHECK_OK(lq_trainer_create(cpu(), m, &o, &c, NULL));
    CHECK(lq_trainer_load(c, path, &err) == LQ_EFORMAT && strstr(err.message, "init"));
    lq_trainer_free(c);
    o.init = LQ_LORA_INIT_ZERO, o.rank = 2;
    CHECK_OK(lq_trainer_create(cpu(), m, &o, &c, NULL));
    CHECK(lq_trainer_load(c, path, &err) == LQ_EFORMAT && strstr(err.message, "lora_"));
    CHECK(lq_trainer_step_count(c) == 0);
    snprintf(path, sizeof path, "%s/absent.safetensors", dir);
    CHECK(lq_trainer_load(c, path, &err) != 0);
    lq_trainer_free(c);
    snprintf(path, sizeof path, "%s/checkpoint.safetensors", dir);
    unlink(path), rmdir(dir);
    free(pa), free(pb);
    lq_trainer_free(a), lq_trainer_free(b);
    lq_model_free(m);
}

/* The mean cross-entropy of one row computed by the inference path (lq_session_forward). */
static double inference_loss(struct lq_model *m, const struct lq_train_batch *b) {
    struct lq_runtime *runtime = NULL;
    struct lq_session *session = NULL;
    float *logits = malloc((size_t)b->seq_len * VOCAB * sizeof *logits);
    CHECK_OK(lq_runtime_create(cpu(), m, &runtime, NULL));
    CHECK_OK(lq_session_create(runtime, b->seq_len, b->seq_len, &session, NULL));
    CHECK_OK(lq_session_forward(session, b->inputs, b->seq_len, 1, logits, NULL));
    double loss = 0;
    for (int t = 0; t < b->seq_len; t++) {
        const float *row = logits + (size_t)t * VOCAB;
        double max = -INFINITY, sum = 0;
        for (int i = 0; i < VOCAB; i++) max = fmax(max, row[i]);
        for (int i = 0; i < VOCAB; i++) sum += exp(row[i] - max);
        loss += log(sum) + max - row[b->targets[t]];
    }
    lq_session_free(session);
    lq_runtime_free(runtime);
    free(logits);
    return loss / b->seq_len;
}

static void check_apply(int lq, int own_rank, enum lq_lora_init init, const char *label) {
    struct lq_model *m = tiny_model(lq, own_rank, 9), *copy = tiny_model(lq, own_rank, 9);
    struct lq_trainer *t = make_trainer(m, init, 3, 2, 0);
    randomize_parameters(t, 10);
    struct tiny_batch b;
    tiny_batch(&b, 1, 10, 18, 0);
    double trained = 0;
    long tokens = 0;
    CHECK_OK(lq_trainer_evaluate(t, &b.batch, &trained, &tokens, NULL));
    CHECK_OK(lq_trainer_apply_to_model(t, copy, NULL));
    double served = inference_loss(copy, &b.batch);
    CHECK_MSG(fabs(trained / tokens - served) < 1e-5 * served, "%s: trainer %.9g, served %.9g",
              label, trained / tokens, served);
    struct lq_error err = {0};
    CHECK(lq_trainer_apply_to_model(t, m, &err) == LQ_EINVAL);
    lq_trainer_free(t);
    lq_model_free(m), lq_model_free(copy);
}

static void test_apply_to_model(void) {
    check_apply(1, 4, LQ_LORA_INIT_LQ, "LQ init");
    check_apply(1, 2, LQ_LORA_INIT_ZERO, "zero init on LQ (pairs side by side)");
    check_apply(0, 0, LQ_LORA_INIT_ZERO, "zero init on dense (merged)");
    /* LQ init needs a low-rank part */
    struct lq_model *m = tiny_model(1, 0, 9);
    struct lq_train_options o;
    lq_train_options_default(&o);
    o.seq_len = MAX_T;
    struct lq_trainer *t = NULL;
    struct lq_error err = {0};
    CHECK(lq_trainer_create(cpu(), m, &o, &t, &err) == LQ_EINVAL &&
          strstr(err.message, "model.layers.0.self_attn.q_proj"));
    o.init = LQ_LORA_INIT_ZERO, o.rank = 17; /* wider than the 16-wide matrices */
    CHECK(lq_trainer_create(cpu(), m, &o, &t, &err) == LQ_EINVAL && strstr(err.message, "rank"));
    lq_model_free(m);
}

/* ---------- packing ---------- */

static void test_pack(void) {
    static const int a[] = {10, 11, 12}, b[] = {20, 21}, c[] = {30};
    static const unsigned char b_mask[] = {0, 1}, c_mask[] = {0};
    struct lq_train_document docs[] = {
        {a, NULL, 3}, {b, b_mask, 2}, {NULL, NULL, 0}, {c, c_mask, 1}};
    struct lq_train_pack_options o = {4, 1, 2, 0};
    struct lq_train_packed p;
    CHECK_OK(lq_train_pack(docs, 4, &o, &p, NULL));
    /* stream 1 10 11 12 2 | 1 20 21 2 | 1 30 2: 12 tokens, 11 predictions, 3 rows of 4 */
    static const int inputs[] = {1, 10, 11, 12, 2, 1, 20, 21, 2, 1, 30, 0};
    static const int targets[] = {10, 11, 12, 2, 1, 20, 21, 2, 1, 30, 2, 0};
    static const unsigned char mask[] = {1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0};
    CHECK(p.rows == 3 && p.seq_len == 4 && p.tokens_in_loss == 6);
    CHECK(memcmp(p.inputs, inputs, sizeof inputs) == 0);
    CHECK(memcmp(p.targets, targets, sizeof targets) == 0);
    CHECK(memcmp(p.mask, mask, sizeof mask) == 0);
    struct lq_train_batch batch = lq_train_packed_batch(&p, 1, 2);
    CHECK(batch.rows == 2 && batch.inputs[0] == 2 && batch.targets[0] == 1 && batch.mask[2] == 1);
    lq_train_packed_free(&p);
    o.bos_id = -1; /* EOS only, as many finetuning sets */
    CHECK_OK(lq_train_pack(docs, 2, &o, &p, NULL));
    CHECK(p.rows == 2 && p.inputs[3] == 2 && p.targets[3] == 20 && p.mask[3] == 0);
    lq_train_packed_free(&p);
    struct lq_error err = {0};
    static const int bad[] = {5, -3};
    struct lq_train_document bad_doc = {bad, NULL, 2};
    CHECK(lq_train_pack(&bad_doc, 1, &o, &p, &err) == LQ_EINVAL && strstr(err.message, "-3"));
    o.seq_len = 0;
    CHECK(lq_train_pack(docs, 1, &o, &p, &err) == LQ_EINVAL);
}

/* ---------- a real model ---------- */

/* A few hundred tokens of simple stories written for this test. */
static const char *const stories[] = {
    "Once upon a time, there was a little cat named Tom. Tom liked to sit in the sun by the big "
    "window. One day, a small bird came to the window. Tom wanted to play with the bird, but the "
    "bird was scared. Tom said, \"Do not be scared. I want to be your friend.\" The bird was happy "
    "and they played all day.",
    "Lily had a red ball. She took the ball to the park with her mom. At the park, she saw a boy "
    "who was sad. Lily asked, \"Why are you sad?\" The boy said, \"I have no toy to play with.\" "
    "Lily gave him her red ball. The boy smiled and they played together until the sun went down.",
    "There was a big tree in the garden. A happy dog lived under the tree. Every morning, the dog "
    "ran around the tree and barked at the birds. One day, it began to rain. The dog was wet and "
    "cold. A kind girl came and gave the dog a warm blanket. The dog was not cold anymore.",
};

static double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void test_stories260k_training(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-lq", root());
    struct lq_model *m = NULL;
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_error err = {0};
    CHECK_OK(lq_model_load(path, &m, NULL));
    snprintf(path, sizeof path, "%s/models/stories260K-lq/tokenizer.bin", root());
    CHECK_OK(lq_tokenizer_load(path, &tokenizer, NULL));
    if (!m || !tokenizer) return;
    int *ids[3];
    size_t counts[3];
    struct lq_train_document docs[3];
    for (int i = 0; i < 3; i++) {
        CHECK_OK(lq_tokenizer_encode(tokenizer, stories[i], strlen(stories[i]), 0, &ids[i],
                                     &counts[i], NULL));
        docs[i] = (struct lq_train_document){ids[i], NULL, counts[i]};
    }
    struct lq_train_pack_options pack = {64, m->config.bos_id, m->config.eos_id, m->config.eos_id};
    struct lq_train_packed packed;
    CHECK_OK(lq_train_pack(docs, 3, &pack, &packed, NULL));
    struct lq_train_batch batch = lq_train_packed_batch(&packed, 0, packed.rows);
    struct lq_train_options o;
    lq_train_options_default(&o);
    o.seq_len = 64, o.micro_batch = 2, o.learning_rate = 3e-3, o.warmup_steps = 3;
    o.total_steps = 30, o.min_lr_ratio = 0.1;
    struct lq_trainer *t = NULL;
    CHECK(lq_trainer_create(cpu(), m, &o, &t, &err) == 0);
    if (!t) {
        fprintf(stderr, "%s\n", err.message);
        return;
    }
    /* before training the trainer's loss is the served model's */
    double before = 0;
    long tokens = 0;
    CHECK_OK(lq_trainer_evaluate(t, &batch, &before, &tokens, NULL));
    struct lq_train_batch first = lq_train_packed_batch(&packed, 0, 1);
    double served = 0;
    {
        struct lq_runtime *runtime = NULL;
        struct lq_session *session = NULL;
        float *logits = malloc((size_t)64 * m->config.vocab_size * sizeof *logits);
        CHECK_OK(lq_runtime_create(cpu(), m, &runtime, NULL));
        CHECK_OK(lq_session_create(runtime, 64, 64, &session, NULL));
        CHECK_OK(lq_session_forward(session, first.inputs, 64, 1, logits, NULL));
        long count = 0;
        for (int i = 0; i < 64; i++) {
            if (!first.mask[i]) continue;
            const float *row = logits + (size_t)i * m->config.vocab_size;
            double max = -INFINITY, sum = 0;
            for (int v = 0; v < m->config.vocab_size; v++) max = fmax(max, row[v]);
            for (int v = 0; v < m->config.vocab_size; v++) sum += exp(row[v] - max);
            served += log(sum) + max - row[first.targets[i]], count++;
        }
        served /= count;
        lq_session_free(session);
        lq_runtime_free(runtime);
        free(logits);
    }
    double first_trainer = 0;
    long first_tokens = 0;
    CHECK_OK(lq_trainer_evaluate(t, &first, &first_trainer, &first_tokens, NULL));
    /* the trainer runs the exact fp32 kernels; serving an LQ model runs the integer ones and
     * the int8 head where the CPU has AVX-512 (kernels/cpu/int_gemv.h): ~2e-4 apart here */
    CHECK_NEAR(first_trainer / first_tokens, served,
               lq_nf_gemv_default_kernel() == LQ_NF_GEMV_INT ? 1e-3 : 1e-5);
    double start = seconds_now();
    struct lq_train_stats stats = {0};
    for (int step = 0; step < o.total_steps; step++) {
        CHECK_OK(lq_trainer_step(t, &batch, &stats, NULL));
        if (step % 10 == 0 || step == o.total_steps - 1)
            printf("  step %2ld  loss %.4f  grad norm %.3f  lr %.2e\n", stats.step, stats.loss,
                   stats.grad_norm, stats.learning_rate);
    }
    double elapsed = seconds_now() - start;
    double after = 0;
    long tokens_after = 0;
    CHECK_OK(lq_trainer_evaluate(t, &batch, &after, &tokens_after, NULL));
    before /= tokens, after /= tokens_after;
    printf("  stories260K-lq: %d rows x 64 (%ld targets), loss %.4f -> %.4f in %d steps, "
           "%.0f training tokens/s (%d threads)\n",
           packed.rows, tokens, before, after, o.total_steps,
           (double)o.total_steps * packed.rows * 64 / elapsed, lq_parallel_threads());
    CHECK_MSG(after < 0.7 * before, "the loss fell only from %.4f to %.4f", before, after);
    lq_trainer_free(t);
    lq_train_packed_free(&packed);
    for (int i = 0; i < 3; i++) free(ids[i]);
    lq_tokenizer_free(tokenizer);
    lq_model_free(m);
}

LQ_TEST_MAIN(LQ_TEST(test_gradient_lq_init), LQ_TEST(test_gradient_zero_init),
             LQ_TEST(test_recompute), LQ_TEST(test_schedule), LQ_TEST(test_clipping),
             LQ_TEST(test_accumulation), LQ_TEST(test_masking), LQ_TEST(test_checkpoint),
             LQ_TEST(test_apply_to_model), LQ_TEST(test_pack), LQ_TEST(test_stories260k_training))
