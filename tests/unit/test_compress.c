/* lq_compress (Algorithm 1) and LQ model directories on the real stories260K weights, with a
 * small grid and rank 4 so that each full error table takes well under a second. */
#include "core/compress.h"
#include "core/error_table.h"
#include "core/file_util.h"
#include "core/lq_model_file.h"
#include "core/model.h"
#include "tests/unit/lq_test.h"

#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *grid_text = "4,8,fp32,64,256;3,8,fp32,64,256;2,8,fp32,64,256;3,4,bf16,32,64;"
                               "2,4,fp16,16,16;4,2,bf16,64,16;2,2,bf16,64,256;3,3,fp16,16,64";
#define GRID_SIZE 8
#define N_MATRICES 35

static struct lq_model *source;
static struct lq_nf_config *grid;
static size_t grid_size;
static char work[256];
static int warnings;

static void count_warning(void *context, const char *message) {
    (void)context;
    (void)message;
    warnings++;
}

static void options_for(struct lq_compress_options *o, double budget, const char *cache) {
    lq_compress_options_default(o);
    o->budget = budget;
    o->rank = 4;
    o->iters = 5; /* enough steps to exercise the loop, few enough to keep the test fast */
    o->grid = grid, o->grid_size = grid_size;
    o->cache_dir = cache;
    o->use_cache = cache != NULL;
    o->warning = count_warning;
}

/* 1 when every linear of a and b holds the same bytes. */
static int same_linears(const struct lq_model *a, const struct lq_model *b) {
    for (int l = 0; l < a->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *x = &a->layers[l].linear[k], *y = &b->layers[l].linear[k];
            if (!x->is_lq || !y->is_lq || x->rank != y->rank || x->rows != y->rows ||
                memcmp(&x->q.config, &y->q.config, sizeof x->q.config) != 0 ||
                x->q.scale_offset != y->q.scale_offset ||
                memcmp(x->q.codes, y->q.codes, lq_nf_codes_bytes(&x->q)) != 0 ||
                memcmp(x->q.scale_codes, y->q.scale_codes, lq_nf_scale_codes_bytes(&x->q)) != 0 ||
                memcmp(x->q.group_scales, y->q.group_scales, lq_nf_group_scales_bytes(&x->q)) !=
                    0 ||
                memcmp(x->lora_A, y->lora_A, (size_t)x->rank * x->cols * sizeof(float)) != 0 ||
                memcmp(x->lora_B, y->lora_B, (size_t)x->rows * x->rank * sizeof(float)) != 0)
                return 0;
        }
    return 1;
}

/* Runs at exit, whichever cases ran. */
static void cleanup(void) {
    lq_model_free(source);
    free(grid);
    if (work[0]) {
        char command[400];
        snprintf(command, sizeof command, "rm -rf '%s'", work);
        if (system(command) != 0) fprintf(stderr, "could not remove %s\n", work);
    }
}

static int setup(void) {
    if (source) return 1;
    const char *root = getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root);
    struct lq_error err = {0};
    int rc = lq_model_load(path, &source, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    rc = lq_compress_grid_parse(grid_text, &grid, &grid_size, &err);
    CHECK_MSG(rc == 0 && grid_size == GRID_SIZE, "%s", err.message);
    snprintf(work, sizeof work, "/tmp/lq-test-compress-XXXXXX");
    if (!mkdtemp(work)) work[0] = '\0';
    CHECK(work[0] != '\0');
    atexit(cleanup);
    return source != NULL && grid != NULL;
}

static void test_grid_parse(void) {
    if (!setup()) return;
    struct lq_nf_config *g = NULL;
    size_t n = 0;
    struct lq_error err = {0};
    CHECK(lq_compress_grid_parse("table1", &g, &n, &err) == 0 && n == LQ_NF_TABLE1_SIZE);
    free(g);
    CHECK(lq_compress_grid_parse(" 4,8,fp32,64,256 ; 3,8,16,64,256 ;", &g, &n, &err) == 0 &&
          n == 2);
    CHECK(n == 2 && g[1].b0 == 3 && g[1].b2 == LQ_SCALE_FP16);
    free(g);
    CHECK(lq_compress_grid_parse("4,8,fp32,64,256;4,8,fp32,64,256", &g, &n, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "twice") != NULL);
    CHECK(lq_compress_grid_parse("5,8,fp32,64,256", &g, &n, &err) == LQ_EINVAL && g == NULL);
    CHECK(lq_compress_grid_parse(" ; ", &g, &n, &err) == LQ_EINVAL);
    char file[300];
    snprintf(file, sizeof file, "%s/grid.txt", work);
    FILE *f = fopen(file, "w");
    if (f) {
        fputs("# two configurations\n2,8,fp32,64,256\n\n3,4,bf16,32,64  # NF3\n", f);
        fclose(f);
    }
    CHECK(lq_compress_grid_parse(file, &g, &n, &err) == 0 && n == 2 && g[1].B0 == 32);
    free(g);
}

/* The budget holds, every matrix is LQ, the final decompositions repeat the table's exactly,
 * a second budget reads the table from the cache, and more bits mean less error. */
static void test_compress_budget_and_cache(void) {
    if (!setup()) return;
    char cache[300];
    snprintf(cache, sizeof cache, "%s/cache-a", work);
    struct lq_compress_options o;
    struct lq_compress_report r3, r35, again;
    struct lq_model *m3 = NULL, *m35 = NULL, *m_again = NULL;
    struct lq_error err = {0};
    options_for(&o, 3.0, cache);
    int rc = lq_compress(source, &o, &m3, &r3, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (rc) return;
    CHECK(r3.n_matrices == N_MATRICES && r3.n_configs == GRID_SIZE);
    CHECK(r3.decompositions == N_MATRICES * GRID_SIZE && r3.cells_cached == 0 && r3.cache_used);
    CHECK(r3.bits_per_param <= 3.0 && r3.bits_per_param > 2.9);
    CHECK(r3.effective_bits > r3.bits_per_param);
    CHECK(r3.table_min > 0 && r3.table_min < r3.table_max && r3.table_max < 1);
    double total_bits = 0, params = 0;
    for (size_t i = 0; i < N_MATRICES; i++) {
        const struct lq_linear *lin = &m3->layers[i / 7].linear[i % 7];
        CHECK(lin->is_lq && lin->rank == 4 && lin->lora_A && lin->lora_B && !lin->dense);
        CHECK(memcmp(&lin->q.config, &r3.chosen[i], sizeof r3.chosen[i]) == 0);
        CHECK_MSG(r3.error[i] == r3.table_error[i], "matrix %zu: final %.17g, table %.17g", i,
                  r3.error[i], r3.table_error[i]);
        size_t numel = (size_t)lin->rows * lin->cols;
        total_bits += lq_nf_storage_bits(numel, &lin->q.config);
        params += (double)numel;
    }
    CHECK_NEAR(total_bits / params, r3.bits_per_param, 1e-12);
    CHECK(m3->embed != source->embed && memcmp(m3->embed, source->embed, 512 * 64 * 4) == 0);
    CHECK(m3->lm_head == m3->embed);

    options_for(&o, 3.5, cache);
    rc = lq_compress(source, &o, &m35, &r35, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (!rc) {
        CHECK(r35.decompositions == 0 && r35.cells_cached == N_MATRICES * GRID_SIZE);
        CHECK(r35.bits_per_param <= 3.5 && r35.bits_per_param > r3.bits_per_param);
        CHECK(r35.total_error < r3.total_error);
    }

    /* Same budget from the cache: the very same model. */
    options_for(&o, 3.0, cache);
    rc = lq_compress(source, &o, &m_again, &again, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (!rc) {
        CHECK(again.decompositions == 0);
        CHECK(memcmp(again.choice, r3.choice, N_MATRICES * sizeof(int)) == 0);
        CHECK(same_linears(m3, m_again));
        CHECK(again.total_error == r3.total_error);
    }
    CHECK(warnings == 0);
    lq_model_free(m3), lq_model_free(m35), lq_model_free(m_again);
    lq_compress_report_free(&r3), lq_compress_report_free(&r35), lq_compress_report_free(&again);
}

/* One worker or two, cache or none: the same bytes (seeds come from matrix and configuration). */
static void test_compress_threads_and_corrupt_cache(void) {
    if (!setup()) return;
    char cache[300];
    snprintf(cache, sizeof cache, "%s/cache-b", work);
    struct lq_compress_options o;
    struct lq_compress_report a, b, c;
    struct lq_model *ma = NULL, *mb = NULL, *mc = NULL;
    struct lq_error err = {0};
    options_for(&o, 2.75, cache);
    o.threads = 2;
    CHECK_OK(lq_compress(source, &o, &ma, &a, &err));
    options_for(&o, 2.75, NULL);
    o.threads = 1;
    CHECK_OK(lq_compress(source, &o, &mb, &b, &err));
    if (!ma || !mb) return;
    CHECK(!b.cache_used && b.decompositions == N_MATRICES * GRID_SIZE);
    CHECK(same_linears(ma, mb));

    /* Flip one byte of the saved table: it is ignored with a warning and recomputed. */
    FILE *f = fopen(a.cache_path, "r+b");
    CHECK(f != NULL);
    if (f) {
        fseek(f, 100, SEEK_SET);
        int byte = fgetc(f);
        fseek(f, 100, SEEK_SET);
        fputc(byte ^ 0x40, f);
        fclose(f);
    }
    int before = warnings;
    options_for(&o, 2.75, cache);
    CHECK_OK(lq_compress(source, &o, &mc, &c, &err));
    if (mc) {
        CHECK(warnings == before + 1);
        CHECK(c.decompositions == N_MATRICES * GRID_SIZE && c.cells_cached == 0);
        CHECK(same_linears(ma, mc));
        lq_compress_report_free(&c), lq_model_free(mc), mc = NULL;
    }
    /* A truncated table as well; the rewritten one is then read again. */
    CHECK(truncate(a.cache_path, 64) == 0);
    before = warnings;
    CHECK_OK(lq_compress(source, &o, &mc, &c, &err));
    CHECK(warnings == before + 1 && c.decompositions == N_MATRICES * GRID_SIZE);
    lq_compress_report_free(&c), lq_model_free(mc), mc = NULL;
    CHECK_OK(lq_compress(source, &o, &mc, &c, &err));
    CHECK(warnings == before + 1 && c.decompositions == 0);
    lq_model_free(ma), lq_model_free(mb), lq_model_free(mc);
    lq_compress_report_free(&a), lq_compress_report_free(&b), lq_compress_report_free(&c);
}

/* A run stopped by its progress callback keeps the rows it finished; the next one resumes. */
static int stop_after_rows(void *context, const struct lq_compress_progress *p) {
    (void)context;
    return p->phase == LQ_COMPRESS_TABLE && p->matrices_done >= 3 ? LQ_EINVAL : 0;
}

static void test_compress_resume(void) {
    if (!setup()) return;
    char cache[300];
    snprintf(cache, sizeof cache, "%s/cache-c", work);
    struct lq_compress_options o;
    struct lq_compress_report r, full;
    struct lq_model *m = NULL, *m_full = NULL;
    struct lq_error err = {0};
    options_for(&o, 3.0, cache);
    o.threads = 1;
    o.progress = stop_after_rows;
    CHECK(lq_compress(source, &o, &m, &r, &err) == LQ_EINVAL && m == NULL);
    CHECK(strstr(err.message, "error table") != NULL);
    options_for(&o, 3.0, cache);
    CHECK_OK(lq_compress(source, &o, &m, &r, &err));
    if (!m) return;
    CHECK_MSG(r.cells_cached >= 3 * GRID_SIZE && r.cells_cached < N_MATRICES * GRID_SIZE,
              "%zu cells cached", r.cells_cached);
    CHECK(r.decompositions + r.cells_cached == N_MATRICES * GRID_SIZE);
    options_for(&o, 3.0, NULL);
    CHECK_OK(lq_compress(source, &o, &m_full, &full, &err));
    if (m_full) CHECK(same_linears(m, m_full));
    lq_model_free(m), lq_model_free(m_full);
    lq_compress_report_free(&r), lq_compress_report_free(&full);
}

static void test_compress_errors(void) {
    if (!setup()) return;
    struct lq_compress_options o;
    struct lq_compress_report r;
    struct lq_model *m = NULL;
    struct lq_error err = {0};
    /* The cheapest grid entry is (2, 2, bf16, 64, 256): 2 + 2/64 + 16/16384 bits. */
    options_for(&o, 2.0, NULL);
    CHECK(lq_compress(source, &o, &m, &r, &err) == LQ_EINFEASIBLE && m == NULL);
    CHECK_MSG(strstr(err.message, "2.0322265625") != NULL, "%s", err.message);
    CHECK(r.decompositions == 0);
    options_for(&o, 3.0, NULL);
    o.rank = 33; /* k_proj and v_proj are 32 x 64 */
    CHECK(lq_compress(source, &o, &m, &r, &err) == LQ_EINVAL && m == NULL);
    CHECK_MSG(strstr(err.message, "k_proj") && strstr(err.message, "32 x 64"), "%s", err.message);
    options_for(&o, 3.0, NULL);
    o.budget = NAN;
    CHECK(lq_compress(source, &o, &m, &r, &err) == LQ_EINVAL);
    /* An LQ model is not a source. */
    options_for(&o, 3.0, NULL);
    CHECK_OK(lq_compress(source, &o, &m, &r, &err));
    if (!m) return;
    struct lq_model *twice = NULL;
    struct lq_compress_report r2;
    CHECK(lq_compress(m, &o, &twice, &r2, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "already") != NULL);
    lq_model_free(m);
    lq_compress_report_free(&r);
}

/* Counts entries of dir whose name starts with prefix. */
static int count_entries(const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
    if (d) closedir(d);
    return n;
}

static void test_model_directory_round_trip(void) {
    if (!setup()) return;
    struct lq_compress_options o;
    struct lq_compress_report r;
    struct lq_model *m = NULL, *back = NULL;
    struct lq_error err = {0};
    options_for(&o, 3.0, NULL);
    CHECK_OK(lq_compress(source, &o, &m, &r, &err));
    if (!m) return;
    char dir[300], tok[300], inner[400];
    snprintf(dir, sizeof dir, "%s/model-lq", work);
    snprintf(tok, sizeof tok, "%s/tok512.bin", work);
    FILE *f = fopen(tok, "wb");
    if (f) fputs("not really a tokenizer", f), fclose(f);
    struct lq_tokenizer_files tokenizer;
    CHECK_OK(lq_model_file_find_tokenizer(tok, 0, &tokenizer, &err));
    CHECK(tokenizer.count == 1 && strcmp(tokenizer.name[0], "tokenizer.bin") == 0);
    struct lq_model_file_options fo;
    lq_model_file_options_default(&fo);
    fo.source = "stories260K-hf", fo.budget = 3.0, fo.rank = 4, fo.grid_size = GRID_SIZE;
    fo.tokenizer = &tokenizer;
    int rc = lq_model_file_write(m, dir, &fo, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    snprintf(inner, sizeof inner, "%s/tokenizer.bin", dir);
    CHECK(lq_path_is_file(inner));
    rc = lq_model_load(dir, &back, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (back) {
        CHECK(back->is_lq && same_linears(m, back));
        CHECK(memcmp(back->embed, source->embed, 512 * 64 * sizeof(float)) == 0);
        CHECK(back->lm_head == back->embed && back->config.tie_embeddings);
        CHECK(memcmp(back->layers[3].ffn_norm, source->layers[3].ffn_norm, 64 * sizeof(float)) ==
              0);
        struct lq_model_summary s;
        CHECK_OK(lq_model_summary_compute(back, &s, &err));
        CHECK_NEAR(s.bits_per_param, r.bits_per_param, 1e-12);
        CHECK_NEAR(s.effective_bits, r.effective_bits, 1e-12);
        CHECK(s.n_matrices == N_MATRICES && s.linear_params == 226560);
        CHECK(s.total_bytes == s.linear_bytes + s.other_bytes &&
              s.other_bytes == (512 * 64 + 64 * 11) * 4);
        lq_model_summary_free(&s);
        lq_model_free(back);
    }
    /* An existing directory: refused without force, replaced with it; nothing left beside. */
    CHECK(lq_model_file_write(m, dir, &fo, &err) == LQ_EINVAL && strstr(err.message, "exists"));
    fo.force = 1;
    rc = lq_model_file_write(m, dir, &fo, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    CHECK(count_entries(work, "model-lq") == 1);
    /* --force never replaces a directory that is not an LQ model. */
    char other[300];
    snprintf(other, sizeof other, "%s/precious", work);
    mkdir(other, 0755);
    snprintf(inner, sizeof inner, "%s/notes.txt", other);
    f = fopen(inner, "w");
    if (f) fputs("keep me", f), fclose(f);
    CHECK(lq_model_file_write(m, other, &fo, &err) == LQ_EINVAL && lq_path_is_file(inner));
    CHECK(count_entries(work, "precious") == 1);
    /* A missing parent directory fails before anything is written. */
    snprintf(other, sizeof other, "%s/no/such/dir", work);
    CHECK(lq_model_file_write(m, other, &fo, &err) == LQ_EINVAL);
    lq_model_free(m);
    lq_compress_report_free(&r);
}

LQ_TEST_MAIN(LQ_TEST(test_grid_parse), LQ_TEST(test_compress_budget_and_cache),
             LQ_TEST(test_compress_threads_and_corrupt_cache), LQ_TEST(test_compress_resume),
             LQ_TEST(test_compress_errors), LQ_TEST(test_model_directory_round_trip))
