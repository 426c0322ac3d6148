/* safetensors reader and writer: round trips, conversions, the real stories260K checkpoint,
 * a table of malformed files each rejected with the right code and a message naming the
 * tensor, and atomic replacement by the writer. */
#include "core/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/unit/lq_test.h"

/* ---- helpers ---- */

static char *path_join(const char *directory, const char *name) {
    size_t size = strlen(directory) + strlen(name) + 2;
    char *path = malloc(size);
    snprintf(path, size, "%s/%s", directory, name);
    return path;
}

static char *make_temporary_directory(void) {
    char template[] = "/tmp/lq_test_safetensors_XXXXXX";
    char *directory = mkdtemp(template);
    return directory ? strdup(directory) : NULL;
}

/* Removes the files in directory (flat) and the directory itself. */
static void remove_directory(char *directory) {
    DIR *dir = opendir(directory);
    if (dir) {
        struct dirent *entry;
        while ((entry = readdir(dir))) {
            if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
            char *path = path_join(directory, entry->d_name);
            if (unlink(path) != 0) rmdir(path);
            free(path);
        }
        closedir(dir);
    }
    rmdir(directory);
    free(directory);
}

static int count_directory_entries(const char *directory) {
    int count = 0;
    DIR *dir = opendir(directory);
    if (!dir) return -1;
    struct dirent *entry;
    while ((entry = readdir(dir))) {
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0) count++;
    }
    closedir(dir);
    return count;
}

static int write_bytes(const char *path, const void *bytes, size_t size) {
    FILE *file = fopen(path, "wb");
    if (!file) return -1;
    size_t written = size ? fwrite(bytes, 1, size, file) : 0;
    return fclose(file) == 0 && written == size ? 0 : -1;
}

static uint8_t *read_bytes(const char *path, size_t *size) {
    FILE *file = fopen(path, "rb");
    if (!file) return NULL;
    fseek(file, 0, SEEK_END);
    long length = ftell(file);
    fseek(file, 0, SEEK_SET);
    uint8_t *bytes = malloc(length > 0 ? (size_t)length : 1);
    *size = fread(bytes, 1, (size_t)length, file);
    fclose(file);
    return bytes;
}

/* A file image: 8-byte little-endian header length, header, then data_size zero bytes. */
static uint8_t *build_image(const char *header, size_t data_size, size_t *size) {
    size_t header_size = strlen(header);
    *size = 8 + header_size + data_size;
    uint8_t *image = calloc(1, *size);
    for (int i = 0; i < 8; i++) image[i] = (uint8_t)((uint64_t)header_size >> (8 * i));
    memcpy(image + 8, header, header_size);
    return image;
}

/* Equal as bit patterns: tells -0 from 0, and compares infinities. */
static int float_bits_equal(float a, float b) {
    uint32_t x, y;
    memcpy(&x, &a, sizeof x);
    memcpy(&y, &b, sizeof y);
    return x == y;
}

static const char *repo_root(void) {
    const char *root = getenv("LQ_REPO_ROOT");
    return root && *root ? root : ".";
}

/* ---- round trip ---- */

static void test_round_trip(void) {
    float f32[6] = {1.5f, -2.25f, 0.0f, 3.0e-40f /* subnormal */, 1e30f, -0.0f};
    uint16_t f16[4] = {0x3c00, 0xc000, 0x7bff, 0x0001};
    uint16_t bf16[4] = {0x3f80, 0xc040, 0x7f7f, 0x0001};
    uint8_t u8[5] = {0, 1, 127, 200, 255};
    int32_t i32[3] = {-2147483647 - 1, 0, 2147483647};
    double f64 = 3.141592653589793;
    const int64_t shape_f32[2] = {2, 3}, shape_4[1] = {4}, shape_2x2[2] = {2, 2}, shape_5[1] = {5},
                  shape_3[1] = {3}, shape_empty[2] = {0, 7};
    struct lq_safetensors_writer *writer = NULL;
    struct lq_error err = {0};
    CHECK_OK(lq_safetensors_writer_create(&writer, &err));
    /* U8 first with an odd size: the writer must still place wider types aligned. */
    CHECK_OK(lq_safetensors_writer_add(writer, "u8", LQ_DTYPE_U8, 1, shape_5, u8, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "w.f32", LQ_DTYPE_F32, 2, shape_f32, f32, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "w.f16", LQ_DTYPE_F16, 1, shape_4, f16, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "w.bf16", LQ_DTYPE_BF16, 2, shape_2x2, bf16, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "i32", LQ_DTYPE_I32, 1, shape_3, i32, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "scalar", LQ_DTYPE_F64, 0, NULL, &f64, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "empty", LQ_DTYPE_F32, 2, shape_empty, NULL, &err));
    CHECK_OK(lq_safetensors_writer_set_metadata(writer, "format", "pt", &err));
    CHECK_OK(lq_safetensors_writer_set_metadata(writer, "note", "draft", &err));
    CHECK_OK(lq_safetensors_writer_set_metadata(writer, "note", "q\"uo\\te\nnéwline", &err));

    char *directory = make_temporary_directory();
    char *path = path_join(directory, "round.safetensors");
    CHECK_OK(lq_safetensors_writer_write(writer, path, &err));
    lq_safetensors_writer_free(writer);

    /* The format's own layout promises: header length a multiple of 8, so with contiguous
     * tensors sorted widest first each one starts at a multiple of its element size. */
    size_t size = 0;
    uint8_t *image = read_bytes(path, &size);
    uint64_t header_size = 0;
    for (int i = 0; i < 8; i++) header_size |= (uint64_t)image[i] << (8 * i);
    CHECK((8 + header_size) % 8 == 0);
    CHECK(image[8] == '{');
    free(image);

    struct lq_safetensors *file = NULL;
    CHECK_OK(lq_safetensors_open(path, &file, &err));
    if (!file) goto cleanup;
    CHECK(lq_safetensors_count(file) == 7);
    CHECK(lq_safetensors_tensor_at(file, 7) == NULL);
    uint64_t total = 0;
    for (size_t i = 0; i < lq_safetensors_count(file); i++) {
        const struct lq_safetensors_tensor *tensor = lq_safetensors_tensor_at(file, i);
        CHECK(tensor->offset % lq_dtype_size(tensor->dtype) == 0);
        CHECK(lq_safetensors_find(file, tensor->name) == tensor);
        total += tensor->nbytes;
    }
    CHECK(total == sizeof f32 + sizeof f16 + sizeof bf16 + sizeof u8 + sizeof i32 + sizeof f64);
    CHECK(8 + header_size + total == size); /* contiguous: no gaps, nothing after */

    const struct {
        const char *name;
        enum lq_dtype dtype;
        int ndim;
        const int64_t *shape;
        const void *data;
        size_t nbytes;
    } expected[] = {
        {"w.f32", LQ_DTYPE_F32, 2, shape_f32, f32, sizeof f32},
        {"w.f16", LQ_DTYPE_F16, 1, shape_4, f16, sizeof f16},
        {"w.bf16", LQ_DTYPE_BF16, 2, shape_2x2, bf16, sizeof bf16},
        {"u8", LQ_DTYPE_U8, 1, shape_5, u8, sizeof u8},
        {"i32", LQ_DTYPE_I32, 1, shape_3, i32, sizeof i32},
        {"scalar", LQ_DTYPE_F64, 0, NULL, &f64, sizeof f64},
        {"empty", LQ_DTYPE_F32, 2, shape_empty, NULL, 0},
    };
    for (size_t i = 0; i < sizeof expected / sizeof expected[0]; i++) {
        const struct lq_safetensors_tensor *tensor = lq_safetensors_find(file, expected[i].name);
        CHECK_MSG(tensor != NULL, "%s", expected[i].name);
        if (!tensor) continue;
        CHECK(strcmp(tensor->name, expected[i].name) == 0);
        CHECK(tensor->dtype == expected[i].dtype);
        CHECK(tensor->ndim == expected[i].ndim);
        for (int d = 0; d < tensor->ndim; d++) CHECK(tensor->shape[d] == expected[i].shape[d]);
        CHECK(tensor->nbytes == expected[i].nbytes);
        CHECK(tensor->numel * lq_dtype_size(tensor->dtype) == tensor->nbytes);
        if (expected[i].nbytes)
            CHECK(memcmp(lq_safetensors_data(file, tensor), expected[i].data, tensor->nbytes) == 0);
    }
    CHECK(lq_safetensors_find(file, "absent") == NULL);
    CHECK(lq_safetensors_find(file, "w") == NULL);
    const char *format = lq_safetensors_metadata(file, "format");
    const char *note = lq_safetensors_metadata(file, "note");
    CHECK(format && strcmp(format, "pt") == 0);
    CHECK(note && strcmp(note, "q\"uo\\te\nnéwline") == 0); /* escaped and replaced */
    CHECK(lq_safetensors_metadata(file, "absent") == NULL);

    float *values = NULL;
    CHECK_OK(lq_safetensors_read_f32(file, "w.f32", &values, NULL, &err));
    if (values) CHECK(memcmp(values, f32, sizeof f32) == 0); /* bit exact, -0 and subnormal too */
    free(values);
    const struct lq_safetensors_tensor *tensor = NULL;
    CHECK_OK(lq_safetensors_read_f32(file, "empty", &values, &tensor, &err));
    CHECK(values != NULL && tensor && tensor->numel == 0);
    free(values);
    lq_safetensors_close(file);
cleanup:
    free(path);
    remove_directory(directory);
}

/* Tensors larger than read_f32's 4 MiB chunk (each chunk's mapped pages are dropped once copied)
 * read back bit for bit, F32 and F16, from a mapped file. */
static void test_read_f32_chunks(void) {
    const size_t n32 = 1300000, n16 = 2300000; /* 5.2 MB and 4.6 MB: two chunks each */
    float *f32 = malloc(n32 * sizeof *f32);
    uint16_t *f16 = malloc(n16 * sizeof *f16);
    if (!f32 || !f16) {
        CHECK(0);
        free(f32), free(f16);
        return;
    }
    uint32_t state = 7;
    for (size_t i = 0; i < n32; i++) {
        state = state * 1664525u + 1013904223u;
        f32[i] = (float)(int32_t)state * 1e-9f;
    }
    /* 1.0, -2.0 and 65504 (0x3c00, 0xc000, 0x7bff) by a pattern no chunk boundary aligns to */
    const uint16_t bits[3] = {0x3c00, 0xc000, 0x7bff};
    const float expected[3] = {1.0f, -2.0f, 65504.0f};
    for (size_t i = 0; i < n16; i++) f16[i] = bits[(i * 7 + i / 1000) % 3];
    const int64_t shape32[1] = {(int64_t)n32}, shape16[1] = {(int64_t)n16};
    struct lq_safetensors_writer *writer = NULL;
    struct lq_error err = {0};
    CHECK_OK(lq_safetensors_writer_create(&writer, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "a", LQ_DTYPE_F32, 1, shape32, f32, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "b", LQ_DTYPE_F16, 1, shape16, f16, &err));
    char *directory = make_temporary_directory();
    char *path = path_join(directory, "big.safetensors");
    CHECK_OK(lq_safetensors_writer_write(writer, path, &err));
    lq_safetensors_writer_free(writer);
    struct lq_safetensors *file = NULL;
    CHECK_OK(lq_safetensors_open(path, &file, &err));
    float *values = NULL;
    if (file) {
        CHECK_OK(lq_safetensors_read_f32(file, "a", &values, NULL, &err));
        CHECK(values && memcmp(values, f32, n32 * sizeof *f32) == 0);
        free(values);
        values = NULL;
        CHECK_OK(lq_safetensors_read_f32(file, "b", &values, NULL, &err));
        size_t wrong = 0;
        for (size_t i = 0; values && i < n16; i++)
            wrong += values[i] != expected[(i * 7 + i / 1000) % 3];
        CHECK(values && wrong == 0);
        free(values);
        lq_safetensors_close(file);
    }
    free(path);
    remove_directory(directory);
    free(f32), free(f16);
}

/* The same tensors in any add order give the same bytes: files can be compared by hash. */
static void test_writer_deterministic(void) {
    float a[2] = {1, 2};
    uint8_t b[3] = {1, 2, 3};
    const int64_t two[1] = {2}, three[1] = {3};
    char *directory = make_temporary_directory();
    char *paths[2] = {path_join(directory, "one"), path_join(directory, "two")};
    for (int order = 0; order < 2; order++) {
        struct lq_safetensors_writer *writer = NULL;
        CHECK_OK(lq_safetensors_writer_create(&writer, NULL));
        for (int k = 0; k < 2; k++) {
            if ((k == 0) == (order == 0))
                CHECK_OK(lq_safetensors_writer_add(writer, "a", LQ_DTYPE_F32, 1, two, a, NULL));
            else
                CHECK_OK(lq_safetensors_writer_add(writer, "b", LQ_DTYPE_U8, 1, three, b, NULL));
        }
        CHECK_OK(lq_safetensors_writer_write(writer, paths[order], NULL));
        lq_safetensors_writer_free(writer);
    }
    size_t size0 = 0, size1 = 0;
    uint8_t *bytes0 = read_bytes(paths[0], &size0), *bytes1 = read_bytes(paths[1], &size1);
    CHECK(bytes0 && bytes1 && size0 == size1 && memcmp(bytes0, bytes1, size0) == 0);
    free(bytes0);
    free(bytes1);
    free(paths[0]);
    free(paths[1]);
    remove_directory(directory);
}

/* ---- conversions ---- */

static void test_read_f32_conversions(void) {
    /* Bit patterns and their exact values, independent of core/half.h. */
    const uint16_t f16_bits[] = {0x0000, 0x8000, 0x3c00, 0xc000, 0x3800, 0x7bff,
                                 0x0001, 0x03ff, 0x0400, 0x3555, 0x7c00, 0xfc00};
    const float f16_values[] = {0.0f,     -0.0f,           1.0f,     -2.0f,
                                0.5f,     65504.0f,        0x1p-24f, 0x3ffp-24f,
                                0x1p-14f, 0.333251953125f, INFINITY, -INFINITY};
    const uint16_t bf16_bits[] = {0x3f80, 0xc040, 0x3f00, 0x4049, 0x7f7f, 0x0001, 0x7f80, 0x8000};
    const float bf16_values[] = {1.0f,        -3.0f,     0.5f,     3.140625f,
                                 0x1.fep127f, 0x1p-133f, INFINITY, -0.0f};
    enum { NF16 = sizeof f16_bits / 2, NBF16 = sizeof bf16_bits / 2 };
    const float f32_values[3] = {1.0f, -1e-3f, 12345.678f};
    uint8_t u8[2] = {7, 9};
    const int64_t shape_f16[1] = {NF16}, shape_bf16[1] = {NBF16}, shape_3[1] = {3},
                  shape_2[1] = {2};
    struct lq_safetensors_writer *writer = NULL;
    CHECK_OK(lq_safetensors_writer_create(&writer, NULL));
    CHECK_OK(lq_safetensors_writer_add(writer, "h", LQ_DTYPE_F16, 1, shape_f16, f16_bits, NULL));
    CHECK_OK(lq_safetensors_writer_add(writer, "b", LQ_DTYPE_BF16, 1, shape_bf16, bf16_bits, NULL));
    CHECK_OK(lq_safetensors_writer_add(writer, "f", LQ_DTYPE_F32, 1, shape_3, f32_values, NULL));
    CHECK_OK(lq_safetensors_writer_add(writer, "bytes", LQ_DTYPE_U8, 1, shape_2, u8, NULL));
    char *directory = make_temporary_directory();
    char *path = path_join(directory, "conversions.safetensors");
    CHECK_OK(lq_safetensors_writer_write(writer, path, NULL));
    lq_safetensors_writer_free(writer);

    /* Reread from a buffer one byte off alignment: float reads must not assume alignment
     * (UBSan's alignment check catches a cast). */
    size_t size = 0;
    uint8_t *image = read_bytes(path, &size);
    uint8_t *shifted = malloc(size + 1);
    memcpy(shifted + 1, image, size);
    struct lq_safetensors *file = NULL;
    struct lq_error err = {0};
    CHECK_OK(lq_safetensors_open_buffer(shifted + 1, size, "conversions", &file, &err));
    if (!file) goto cleanup;

    float *values = NULL;
    const struct lq_safetensors_tensor *tensor = NULL;
    CHECK_OK(lq_safetensors_read_f32(file, "h", &values, &tensor, &err));
    CHECK(tensor && tensor->dtype == LQ_DTYPE_F16 && tensor->numel == NF16);
    for (int i = 0; values && i < NF16; i++) {
        CHECK_MSG(float_bits_equal(values[i], f16_values[i]), "f16 %04x -> %.9g", f16_bits[i],
                  values[i]);
    }
    free(values);
    CHECK_OK(lq_safetensors_read_f32(file, "b", &values, NULL, &err));
    for (int i = 0; values && i < NBF16; i++) {
        CHECK_MSG(float_bits_equal(values[i], bf16_values[i]), "bf16 %04x -> %.9g", bf16_bits[i],
                  values[i]);
    }
    free(values);
    CHECK_OK(lq_safetensors_read_f32(file, "f", &values, NULL, &err));
    if (values) CHECK(memcmp(values, f32_values, sizeof f32_values) == 0);
    free(values);

    values = (float *)&err; /* must be reset to NULL on failure */
    CHECK(lq_safetensors_read_f32(file, "bytes", &values, NULL, &err) == LQ_EUNSUPPORTED);
    CHECK(values == NULL);
    CHECK_MSG(strstr(err.message, "'bytes'") && strstr(err.message, "U8"), "%s", err.message);
    CHECK(lq_safetensors_read_f32(file, "nope", &values, NULL, &err) == LQ_ENOTFOUND);
    CHECK_MSG(strstr(err.message, "'nope'") && strstr(err.message, "conversions"), "%s",
              err.message);
    CHECK(err.code == LQ_ENOTFOUND);
    lq_safetensors_close(file);
cleanup:
    free(shifted);
    free(image);
    free(path);
    remove_directory(directory);
}

/* ---- the real checkpoint ---- */

static void test_real_model(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/models/stories260K-hf/model.safetensors", repo_root());
    struct lq_safetensors *file = NULL;
    struct lq_error err = {0};
    int rc = lq_safetensors_open(path, &file, &err);
    CHECK_MSG(rc == 0, "%s (set LQ_REPO_ROOT)", err.message);
    if (!file) return;
    /* 48 header entries: 47 tensors (the head is tied to the embedding) and __metadata__. */
    CHECK(lq_safetensors_count(file) == 47);
    const char *format = lq_safetensors_metadata(file, "format");
    CHECK(format && strcmp(format, "pt") == 0);

    const struct lq_safetensors_tensor *down = NULL;
    float *values = NULL;
    CHECK_OK(
        lq_safetensors_read_f32(file, "model.layers.0.mlp.down_proj.weight", &values, &down, &err));
    if (values && down) {
        CHECK(down->dtype == LQ_DTYPE_F32 && down->ndim == 2);
        CHECK(down->shape[0] == 64 && down->shape[1] == 172 && down->numel == 64 * 172);
        CHECK(down->offset == 131328 && down->nbytes == 44032);
        /* Reference values read with Python's struct.unpack('<f') from the same file. */
        CHECK(values[0] == 0.13498419523239136f);
        CHECK(values[1] == 0.06711847335100174f);
        CHECK(values[5 * 172 + 17] == -0.022798387333750725f);
        CHECK(values[64 * 172 - 1] == -0.11420675367116928f);
        double sum = 0, squares = 0;
        for (size_t i = 0; i < down->numel; i++) {
            sum += values[i];
            squares += (double)values[i] * values[i];
        }
        CHECK_NEAR(sum, 2.412316798055599, 1e-9);
        CHECK_NEAR(squares, 169.92886225358458, 1e-7);
        /* read_f32 dropped the tensor's pages: its bytes fault back in from the file, equal */
        float *again = NULL;
        CHECK_OK(lq_safetensors_read_f32(file, "model.layers.0.mlp.down_proj.weight", &again, NULL,
                                         &err));
        CHECK(again && memcmp(again, values, down->nbytes) == 0);
        lq_safetensors_drop_pages(file, down);
        CHECK(memcmp(lq_safetensors_data(file, down), values, down->nbytes) == 0);
        free(again);
    }
    free(values);

    const struct lq_safetensors_tensor *embed =
        lq_safetensors_find(file, "model.embed_tokens.weight");
    CHECK(embed && embed->shape[0] == 512 && embed->shape[1] == 64 && embed->offset == 0);
    /* torch writes tensors back to back: the byte ranges tile the data section exactly. */
    uint64_t total = 0;
    for (size_t i = 0; i < lq_safetensors_count(file); i++) {
        const struct lq_safetensors_tensor *tensor = lq_safetensors_tensor_at(file, i);
        total += tensor->nbytes;
        float *data = NULL;
        CHECK_OK(lq_safetensors_read_f32(file, tensor->name, &data, NULL, &err));
        for (size_t k = 0; data && k < tensor->numel; k++) {
            if (!isfinite(data[k])) {
                CHECK_MSG(0, "%s[%zu] is not finite", tensor->name, k);
                break;
            }
        }
        free(data);
    }
    CHECK(total == 1040128);
    lq_safetensors_close(file);

    /* The same file cut short must be rejected, not read past its end. */
    size_t size = 0;
    uint8_t *bytes = read_bytes(path, &size);
    CHECK(size == 1044992);
    size_t cuts[] = {0, 7, 8, 1000, 4863, 4864, size - 1};
    for (size_t i = 0; bytes && i < sizeof cuts / sizeof cuts[0]; i++) {
        rc = lq_safetensors_open_buffer(bytes, cuts[i], "cut.safetensors", &file, &err);
        CHECK_MSG(rc == LQ_EFORMAT && file == NULL, "cut at %zu: %d", cuts[i], rc);
        CHECK(strncmp(err.message, "cut.safetensors: ", 17) == 0);
    }
    /* One byte short: only the last tensor's range fails, and the message says so. */
    rc = lq_safetensors_open_buffer(bytes, size - 1, "cut.safetensors", &file, &err);
    CHECK_MSG(strstr(err.message, "past the end"), "%s", err.message);
    free(bytes);
}

/* A file written by the reference implementation (Python safetensors 0.8.0, serialize()),
 * kept in the fuzz corpus: F32, F16, an empty BF16, U8 and escaped metadata. */
static void test_reference_writer_file(void) {
    char path[4096];
    snprintf(path, sizeof path,
             "%s/tests/fuzz/corpus/safetensors/valid_reference_writer.safetensors", repo_root());
    struct lq_safetensors *file = NULL;
    struct lq_error err = {0};
    int rc = lq_safetensors_open(path, &file, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (!file) return;
    CHECK(lq_safetensors_count(file) == 4);
    const char *k = lq_safetensors_metadata(file, "k");
    CHECK(k && strcmp(k, "v\"\\") == 0);
    float *values = NULL;
    CHECK_OK(lq_safetensors_read_f32(file, "z", &values, NULL, &err));
    if (values) CHECK(values[0] == 1.0f && values[1] == -2.0f);
    free(values);
    const struct lq_safetensors_tensor *tensor = NULL;
    CHECK_OK(lq_safetensors_read_f32(file, "b.weight", &values, &tensor, &err));
    if (values) CHECK(values[0] == 1.0f && values[1] == -2.0f && values[2] == 0x1p-24f);
    CHECK(tensor && tensor->dtype == LQ_DTYPE_F16 && tensor->offset == 8);
    free(values);
    tensor = lq_safetensors_find(file, "a");
    CHECK(tensor && tensor->dtype == LQ_DTYPE_U8 &&
          memcmp(lq_safetensors_data(file, tensor), "12345", 5) == 0);
    tensor = lq_safetensors_find(file, "e");
    CHECK(tensor && tensor->dtype == LQ_DTYPE_BF16 && tensor->numel == 0);
    lq_safetensors_close(file);
}

/* ---- malformed files ---- */

struct malformed_case {
    const char *what;
    const char *header;  /* JSON text; NULL: image built by hand below */
    size_t data_size;    /* zero bytes after the header */
    int expected;        /* return code */
    const char *message; /* substring the message must contain (NULL: none) */
};

static const struct malformed_case malformed_cases[] = {
    {"non-JSON", "{\"w\": {\"dtype\": \"F32\"", 0, LQ_EFORMAT, "not valid JSON"},
    {"empty header", "", 0, LQ_EFORMAT, "not valid JSON"},
    {"non-object", "[1, 2]", 0, LQ_EFORMAT, "not a JSON object"},
    {"string header", "\"w\"", 0, LQ_EFORMAT, "not a JSON object"},
    {"trailing bytes", "{} x", 0, LQ_EFORMAT, "after its JSON value"},
    {"two objects", "{}{}", 0, LQ_EFORMAT, "after its JSON value"},
    {"control character", "{\"w\x01\": 1}", 0, LQ_EFORMAT, "control character"},
    {"invalid UTF-8", "{\"w\xff\": {}}", 0, LQ_EFORMAT, "UTF-8"},
    {"overlong UTF-8", "{\"\xc0\xaf\": {}}", 0, LQ_EFORMAT, "UTF-8"},
    {"entry not object", "{\"w\": 3}", 0, LQ_EFORMAT, "'w' is not a JSON object"},
    {"bad dtype", "{\"w\": {\"dtype\": \"F7\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
     LQ_EUNSUPPORTED, "tensor 'w' has unknown dtype 'F7'"},
    {"dtype not string", "{\"w\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
     LQ_EFORMAT, "tensor 'w'"},
    {"lowercase dtype", "{\"w\": {\"dtype\": \"f32\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
     4, LQ_EUNSUPPORTED, "tensor 'w'"},
    {"missing field", "{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, LQ_EFORMAT,
     "tensor 'w' has no 'data_offsets'"},
    {"unexpected field",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4], \"x\": 1}}", 4,
     LQ_EFORMAT, "tensor 'w' has unexpected field 'x'"},
    {"field twice",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
     LQ_EFORMAT, "tensor 'w' has field 'shape' twice"},
    {"shape not array", "{\"w\": {\"dtype\": \"F32\", \"shape\": 1, \"data_offsets\": [0, 4]}}", 4,
     LQ_EFORMAT, "tensor 'w'"},
    {"negative dim", "{\"w\": {\"dtype\": \"F32\", \"shape\": [-1, 2], \"data_offsets\": [0, 8]}}",
     8, LQ_EFORMAT, "tensor 'w' has shape[0] = -1"},
    {"fractional dim", "{\"w\": {\"dtype\": \"F32\", \"shape\": [2.5], \"data_offsets\": [0, 8]}}",
     8, LQ_EFORMAT, "tensor 'w' has shape[0] = 2.5"},
    {"string dim", "{\"w\": {\"dtype\": \"F32\", \"shape\": [\"2\"], \"data_offsets\": [0, 8]}}", 8,
     LQ_EFORMAT, "tensor 'w' has shape[0] that is not a number"},
    {"dim above 2^53",
     "{\"w\": {\"dtype\": \"U8\", \"shape\": [9007199254740994], \"data_offsets\": [0, 1]}}", 1,
     LQ_EFORMAT, "tensor 'w'"},
    {"nine dims",
     "{\"w\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 1]}}", 1,
     LQ_EUNSUPPORTED, "tensor 'w' has 9 dims"},
    {"shape product overflow",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 16], \"data_offsets\": [0, "
     "0]}}",
     0, LQ_EFORMAT, "tensor 'w' has shape [4294967296, 4294967296, 16] whose size overflows"},
    {"byte size overflow",
     "{\"w\": {\"dtype\": \"F64\", \"shape\": [9007199254740992, 256], \"data_offsets\": [0, "
     "8]}}",
     8, LQ_EFORMAT, "tensor 'w' has shape [9007199254740992, 256] whose size overflows"},
    {"wrong byte count",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 12]}}", 16, LQ_EFORMAT,
     "test.safetensors: tensor 'w' has data_offsets [0, 12] (12 bytes) but shape [2, 2] of F32 "
     "needs 16 bytes"},
    {"offsets past data",
     "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 8, LQ_EFORMAT,
     "tensor 'w' has data_offsets [0, 16] past the end of the 8-byte data section"},
    {"offsets far out of range",
     "{\"w\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [9007199254740988, "
     "9007199254740992]}}",
     8, LQ_EFORMAT, "tensor 'w' has data_offsets [9007199254740988, 9007199254740992] past"},
    {"offsets reversed", "{\"w\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [4, 0]}}",
     8, LQ_EFORMAT, "tensor 'w' has data_offsets [4, 0] that end before they begin"},
    {"offsets negative", "{\"w\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [-4, 0]}}",
     8, LQ_EFORMAT, "tensor 'w' has data_offsets that are not two integers"},
    {"three offsets", "{\"w\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4, 8]}}",
     8, LQ_EFORMAT, "tensor 'w' has data_offsets that are not two integers"},
    {"overlapping tensors",
     "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
     " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}",
     24, LQ_EFORMAT, "tensors 'a' [0, 16] and 'b' [8, 24] overlap"},
    {"tensor inside another",
     "{\"big\": {\"dtype\": \"U8\", \"shape\": [32], \"data_offsets\": [0, 32]},"
     " \"c\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [20, 21]},"
     " \"small\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [8, 12]}}",
     32, LQ_EFORMAT, "tensors 'big' [0, 32] and 'small' [8, 12] overlap"},
    {"same range twice",
     "{\"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]},"
     " \"b\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]}}",
     4, LQ_EFORMAT, "overlap"},
    {"duplicate names",
     "{\"w\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]},"
     " \"w\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [4, 8]}}",
     8, LQ_EFORMAT, "tensor 'w' appears twice"},
    {"metadata non-string", "{\"__metadata__\": {\"format\": \"pt\", \"k\": 1}}", 0, LQ_EFORMAT,
     "__metadata__ value for key 'k' is not a string"},
    {"metadata not object", "{\"__metadata__\": [\"pt\"]}", 0, LQ_EFORMAT,
     "__metadata__ is not a JSON object"},
    {"metadata twice", "{\"__metadata__\": {}, \"__metadata__\": {}}", 0, LQ_EFORMAT,
     "__metadata__ appears twice"},
    {"metadata key twice", "{\"__metadata__\": {\"k\": \"a\", \"k\": \"b\"}}", 0, LQ_EFORMAT,
     "key 'k' appears twice"},
    {"deep nesting", NULL, 0, LQ_EFORMAT, "not valid JSON"},
    /* Valid edge cases: the table also pins down what must keep opening. */
    {"empty object", "{}", 0, LQ_OK, NULL},
    {"padded with spaces", "{}      ", 0, LQ_OK, NULL},
    {"empty and scalar tensors",
     "{\"e\": {\"dtype\": \"F32\", \"shape\": [0, 5], \"data_offsets\": [4, 4]},"
     " \"s\": {\"dtype\": \"F32\", \"shape\": [], \"data_offsets\": [0, 4]}}",
     4, LQ_OK, NULL},
    {"gap between tensors",
     "{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [6, 8]},"
     " \"b\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]}}",
     8, LQ_OK, NULL},
};

/* Builds each table entry into an image, opens it, checks code, message and *out. */
static void test_malformed_headers(void) {
    for (size_t i = 0; i < sizeof malformed_cases / sizeof malformed_cases[0]; i++) {
        const struct malformed_case *c = &malformed_cases[i];
        char *deep = NULL;
        const char *header = c->header;
        if (!header) { /* 5000 nested arrays: cJSON's nesting limit must hold, not the stack */
            deep = calloc(1, 2 * 5000 + 1);
            for (int k = 0; k < 5000; k++) deep[k] = '[', deep[5000 + k] = ']';
            header = deep;
        }
        size_t size = 0;
        uint8_t *image = build_image(header, c->data_size, &size);
        struct lq_safetensors *file = (struct lq_safetensors *)image; /* must be overwritten */
        struct lq_error err = {0};
        int rc = lq_safetensors_open_buffer(image, size, "test.safetensors", &file, &err);
        CHECK_MSG(rc == c->expected, "%s: returned %d (%s), expected %d", c->what, rc, err.message,
                  c->expected);
        if (rc != LQ_OK) {
            CHECK_MSG(file == NULL, "%s", c->what);
            CHECK(err.code == rc);
            CHECK_MSG(strncmp(err.message, "test.safetensors: ", 18) == 0, "%s: %s", c->what,
                      err.message);
        }
        if (c->message)
            CHECK_MSG(strstr(err.message, c->message) != NULL, "%s: message '%s' lacks '%s'",
                      c->what, err.message, c->message);
        if (rc == LQ_OK) lq_safetensors_close(file);
        free(image);
        free(deep);
    }
}

/* Damage to the 8-byte length and the file's size, which JSON text cannot express. */
static void test_malformed_framing(void) {
    struct lq_error err = {0};
    struct lq_safetensors *file = NULL;
    uint8_t tiny[5] = {2, 0, 0, 0, 0};
    CHECK(lq_safetensors_open_buffer(tiny, sizeof tiny, "tiny", &file, &err) == LQ_EFORMAT);
    CHECK_MSG(strstr(err.message, "tiny: file is 5 bytes"), "%s", err.message);
    CHECK(lq_safetensors_open_buffer(NULL, 0, "none", &file, &err) == LQ_EFORMAT);
    CHECK(file == NULL);

    size_t size = 0;
    uint8_t *image = build_image("{}", 0, &size);
    image[0] = 100; /* header length beyond the file */
    CHECK(lq_safetensors_open_buffer(image, size, "long", &file, &err) == LQ_EFORMAT);
    CHECK_MSG(strstr(err.message, "header length 100 runs past the end of the 10-byte file"), "%s",
              err.message);
    memset(image, 0xff, 8); /* 2^64 - 1: must not wrap the bounds check */
    CHECK(lq_safetensors_open_buffer(image, size, "huge", &file, &err) == LQ_EFORMAT);
    CHECK_MSG(strstr(err.message, "exceeds"), "%s", err.message);
    memset(image, 0, 8);
    image[3] = 0x10; /* 256 MiB, over the 100 MB limit */
    CHECK(lq_safetensors_open_buffer(image, size, "huge", &file, &err) == LQ_EFORMAT);
    CHECK_MSG(strstr(err.message, "exceeds the 100000000-byte limit"), "%s", err.message);
    free(image);

    /* On disk: an empty file, a short one, a missing one, a directory. */
    char *directory = make_temporary_directory();
    char *empty = path_join(directory, "empty.safetensors");
    char *shorter = path_join(directory, "short.safetensors");
    char *missing = path_join(directory, "missing.safetensors");
    CHECK(write_bytes(empty, "", 0) == 0);
    CHECK(write_bytes(shorter, "\x02\0\0\0", 4) == 0);
    CHECK(lq_safetensors_open(empty, &file, &err) == LQ_EFORMAT && file == NULL);
    CHECK_MSG(strstr(err.message, "empty.safetensors: file is 0 bytes"), "%s", err.message);
    CHECK(lq_safetensors_open(shorter, &file, &err) == LQ_EFORMAT && file == NULL);
    CHECK(lq_safetensors_open(missing, &file, &err) == LQ_EIO && file == NULL);
    CHECK_MSG(strstr(err.message, "missing.safetensors") && strstr(err.message, strerror(ENOENT)),
              "%s", err.message);
    CHECK(lq_safetensors_open(directory, &file, &err) == LQ_EIO && file == NULL);
    CHECK(lq_safetensors_open(NULL, &file, &err) == LQ_EINVAL);
    free(empty);
    free(shorter);
    free(missing);
    remove_directory(directory);
}

/* ---- writer errors and atomic replacement ---- */

static void test_writer_rejects(void) {
    struct lq_safetensors_writer *writer = NULL;
    struct lq_error err = {0};
    float data[4] = {0};
    const int64_t shape[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, negative[1] = {-1}, four[1] = {4};
    CHECK_OK(lq_safetensors_writer_create(&writer, &err));
    CHECK(lq_safetensors_writer_add(writer, "x", LQ_DTYPE_F32, 9, shape, data, &err) == LQ_EINVAL);
    CHECK(lq_safetensors_writer_add(writer, "x", LQ_DTYPE_F32, 1, negative, data, &err) ==
          LQ_EINVAL);
    CHECK_MSG(strstr(err.message, "tensor 'x'"), "%s", err.message);
    CHECK(lq_safetensors_writer_add(writer, "__metadata__", LQ_DTYPE_F32, 1, four, data, &err) ==
          LQ_EINVAL);
    CHECK(lq_safetensors_writer_add(writer, "bad\xff", LQ_DTYPE_F32, 1, four, data, &err) ==
          LQ_EINVAL);
    CHECK(lq_safetensors_writer_add(writer, "x", (enum lq_dtype)99, 1, four, data, &err) ==
          LQ_EINVAL);
    CHECK(lq_safetensors_writer_add(writer, "x", LQ_DTYPE_F32, 1, four, NULL, &err) == LQ_EINVAL);
    CHECK_OK(lq_safetensors_writer_add(writer, "x", LQ_DTYPE_F32, 1, four, data, &err));
    CHECK_OK(lq_safetensors_writer_add(writer, "x", LQ_DTYPE_U8, 1, four, data, &err));
    char *directory = make_temporary_directory();
    char *path = path_join(directory, "dup.safetensors");
    CHECK(lq_safetensors_writer_write(writer, path, &err) == LQ_EINVAL);
    CHECK_MSG(strstr(err.message, "tensor 'x' was added twice"), "%s", err.message);
    CHECK(count_directory_entries(directory) == 0);
    lq_safetensors_writer_free(writer);
    free(path);
    remove_directory(directory);
}

static int write_one(const char *path, float value, struct lq_error *err) {
    struct lq_safetensors_writer *writer = NULL;
    const int64_t one[1] = {1};
    int rc = lq_safetensors_writer_create(&writer, err);
    if (rc == 0) rc = lq_safetensors_writer_add(writer, "v", LQ_DTYPE_F32, 1, one, &value, err);
    if (rc == 0) rc = lq_safetensors_writer_write(writer, path, err);
    lq_safetensors_writer_free(writer);
    return rc;
}

static float read_one(const char *path) {
    struct lq_safetensors *file = NULL;
    float *values = NULL, value = NAN;
    if (lq_safetensors_open(path, &file, NULL) == 0 &&
        lq_safetensors_read_f32(file, "v", &values, NULL, NULL) == 0)
        value = values[0];
    free(values);
    lq_safetensors_close(file);
    return value;
}

static void test_write_atomic(void) {
    struct lq_error err = {0};
    char *directory = make_temporary_directory();
    char *target = path_join(directory, "model.safetensors");

    /* Replacing an existing file: the new content, the old mode, no temporary left. */
    CHECK_OK(write_one(target, 1.0f, &err));
    CHECK(read_one(target) == 1.0f);
    CHECK(chmod(target, 0640) == 0);
    CHECK_OK(write_one(target, 2.0f, &err));
    CHECK(read_one(target) == 2.0f);
    struct stat info;
    CHECK(stat(target, &info) == 0 && (info.st_mode & 0777) == 0640);
    CHECK(count_directory_entries(directory) == 1);

    /* A directory that does not exist: LQ_EIO naming the cause, nothing created. */
    char *nowhere = path_join(directory, "no/such/dir/model.safetensors");
    CHECK(write_one(nowhere, 3.0f, &err) == LQ_EIO);
    CHECK_MSG(strstr(err.message, strerror(ENOENT)) && strstr(err.message, "no/such/dir"), "%s",
              err.message);
    CHECK(count_directory_entries(directory) == 1);

    /* The rename fails after the temporary was written (target is a directory): the
     * temporary is removed and the target stays as it was. */
    char *blocked = path_join(directory, "blocked");
    CHECK(mkdir(blocked, 0755) == 0);
    CHECK(write_one(blocked, 4.0f, &err) == LQ_EIO);
    CHECK_MSG(strstr(err.message, "rename"), "%s", err.message);
    CHECK(stat(blocked, &info) == 0 && S_ISDIR(info.st_mode));
    CHECK(count_directory_entries(directory) == 2); /* the target file and blocked/ only */
    CHECK(read_one(target) == 2.0f);

    free(blocked);
    free(nowhere);
    free(target);
    remove_directory(directory);
}

LQ_TEST_MAIN(LQ_TEST(test_round_trip), LQ_TEST(test_read_f32_chunks),
             LQ_TEST(test_writer_deterministic), LQ_TEST(test_read_f32_conversions),
             LQ_TEST(test_real_model), LQ_TEST(test_reference_writer_file),
             LQ_TEST(test_malformed_headers), LQ_TEST(test_malformed_framing),
             LQ_TEST(test_writer_rejects), LQ_TEST(test_write_atomic))
