/* GGUF files (ggml's single-file model format, versions 2 and 3, little-endian): a reader that
 * never trusts the file, and dequantization of the common ggml tensor types to float. */
#ifndef LQ_GGUF_H
#define LQ_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* Metadata value types, numbered as in the file. */
enum lq_gguf_value_type {
    LQ_GGUF_UINT8 = 0,
    LQ_GGUF_INT8 = 1,
    LQ_GGUF_UINT16 = 2,
    LQ_GGUF_INT16 = 3,
    LQ_GGUF_UINT32 = 4,
    LQ_GGUF_INT32 = 5,
    LQ_GGUF_FLOAT32 = 6,
    LQ_GGUF_BOOL = 7,
    LQ_GGUF_STRING = 8,
    LQ_GGUF_ARRAY = 9,
    LQ_GGUF_UINT64 = 10,
    LQ_GGUF_INT64 = 11,
    LQ_GGUF_FLOAT64 = 12,
};

/* ggml tensor types, numbered as in the file (gaps are types ggml has removed). */
enum lq_ggml_type {
    LQ_GGML_F32 = 0,
    LQ_GGML_F16 = 1,
    LQ_GGML_Q4_0 = 2,
    LQ_GGML_Q4_1 = 3,
    LQ_GGML_Q5_0 = 6,
    LQ_GGML_Q5_1 = 7,
    LQ_GGML_Q8_0 = 8,
    LQ_GGML_Q8_1 = 9,
    LQ_GGML_Q2_K = 10,
    LQ_GGML_Q3_K = 11,
    LQ_GGML_Q4_K = 12,
    LQ_GGML_Q5_K = 13,
    LQ_GGML_Q6_K = 14,
    LQ_GGML_Q8_K = 15,
    LQ_GGML_BF16 = 30,
};

#define LQ_GGUF_MAX_DIMS 4
#define LQ_GGUF_DEFAULT_ALIGNMENT 32

/* "Q4_K", "BF16", ...; "?" for a number ggml does not define. */
const char *lq_ggml_type_name(uint32_t type);
/* Elements per block and bytes per block; both 0 for an unknown type. */
uint32_t lq_ggml_type_block_size(uint32_t type);
uint32_t lq_ggml_type_block_bytes(uint32_t type);
/* True for the types lq_gguf_tensor_to_f32 converts: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K,
 * Q5_K, Q6_K. */
bool lq_ggml_type_is_readable(uint32_t type);
/* "uint8", ..., "array", "float64"; "?" for an unknown number. */
const char *lq_gguf_value_type_name(uint32_t type);

struct lq_gguf_tensor {
    const char *name; /* owned by the file object */
    uint32_t type;    /* enum lq_ggml_type (any type ggml defines) */
    int n_dims;       /* 0..LQ_GGUF_MAX_DIMS */
    /* ggml order: dims[0] is the row length (the fastest-varying index), the reverse of a
     * NumPy shape; dims past n_dims are 1. */
    uint64_t dims[LQ_GGUF_MAX_DIMS];
    uint64_t numel;
    uint64_t offset; /* from the start of the data section; a multiple of the alignment */
    uint64_t nbytes;
};

struct lq_gguf; /* an open file (memory-mapped read-only) */

/* Opens and validates path: magic "GGUF", version 2 or 3 (a byte-swapped version is reported
 * as a big-endian file), every count and length checked against the bytes left before
 * anything is allocated, metadata keys unique and of known types (arrays of arrays are
 * refused, as ggml refuses them), general.alignment (uint32, a power of two, default 32),
 * tensor names unique, 0..4 dims whose product does not overflow, a row length that is a
 * whole number of blocks, offsets aligned, each tensor's bytes inside the data section and
 * no two overlapping. LQ_EIO when the file cannot be read, LQ_EFORMAT for malformed content,
 * LQ_EUNSUPPORTED for a big-endian file, an unknown version or an array of arrays; messages
 * name the file and the key or tensor. *out is NULL on failure. Close with lq_gguf_close. */
int lq_gguf_open(const char *path, struct lq_gguf **out, struct lq_error *err);
/* The same on a buffer (borrowed: it must outlive the object); label names it in messages. */
int lq_gguf_open_buffer(const void *data, size_t size, const char *label, struct lq_gguf **out,
                        struct lq_error *err);
void lq_gguf_close(struct lq_gguf *gguf);

uint32_t lq_gguf_version(const struct lq_gguf *gguf);
uint32_t lq_gguf_alignment(const struct lq_gguf *gguf);
/* Absolute file offset of the data section (a multiple of the alignment). */
uint64_t lq_gguf_data_offset(const struct lq_gguf *gguf);

/* ---- metadata ---- */

size_t lq_gguf_metadata_count(const struct lq_gguf *gguf);
/* Keys in file order; NULL past the end. Borrowed. */
const char *lq_gguf_metadata_key_at(const struct lq_gguf *gguf, size_t index);
/* The value type of key (and for arrays the element type and count; count is 1 otherwise).
 * Returns 0 or LQ_ENOTFOUND; out pointers may be NULL. */
int lq_gguf_metadata_type(const struct lq_gguf *gguf, const char *key,
                          enum lq_gguf_value_type *type, enum lq_gguf_value_type *element_type,
                          uint64_t *count);

/* Typed getters: 0, LQ_ENOTFOUND when the key is absent, LQ_EFORMAT (naming the key) when the
 * value has another type or does not fit. The integer getters accept any integer type whose
 * value fits the result; lq_gguf_get_f32 accepts float32 and float64 (rounded to float). */
int lq_gguf_get_u32(const struct lq_gguf *gguf, const char *key, uint32_t *out,
                    struct lq_error *err);
int lq_gguf_get_i32(const struct lq_gguf *gguf, const char *key, int32_t *out,
                    struct lq_error *err);
int lq_gguf_get_u64(const struct lq_gguf *gguf, const char *key, uint64_t *out,
                    struct lq_error *err);
int lq_gguf_get_i64(const struct lq_gguf *gguf, const char *key, int64_t *out,
                    struct lq_error *err);
int lq_gguf_get_f32(const struct lq_gguf *gguf, const char *key, float *out, struct lq_error *err);
int lq_gguf_get_f64(const struct lq_gguf *gguf, const char *key, double *out, struct lq_error *err);
int lq_gguf_get_bool(const struct lq_gguf *gguf, const char *key, bool *out, struct lq_error *err);
/* A NUL-terminated copy of the string (borrowed from gguf); *length (optional) receives its
 * byte count, which differs from strlen when the string holds NUL bytes. */
int lq_gguf_get_string(const struct lq_gguf *gguf, const char *key, const char **out,
                       size_t *length, struct lq_error *err);
/* An array of strings: *strings[i] NUL-terminated, *lengths (optional) their byte counts; all
 * borrowed from gguf. */
int lq_gguf_get_string_array(const struct lq_gguf *gguf, const char *key,
                             const char *const **strings, const size_t **lengths, size_t *count,
                             struct lq_error *err);
/* An array of numbers (any numeric element type, bool included) converted to a newly
 * malloc'ed array the caller frees (never NULL on success). The f64 form is exact for every
 * element type but (u)int64 beyond 2^53; the i64 form refuses float elements and uint64
 * values above INT64_MAX; the f32 form accepts float32 elements only. */
int lq_gguf_get_f64_array(const struct lq_gguf *gguf, const char *key, double **out, size_t *count,
                          struct lq_error *err);
int lq_gguf_get_i64_array(const struct lq_gguf *gguf, const char *key, int64_t **out, size_t *count,
                          struct lq_error *err);
int lq_gguf_get_f32_array(const struct lq_gguf *gguf, const char *key, float **out, size_t *count,
                          struct lq_error *err);
/* The raw little-endian elements of a numeric array as they lie in the file (borrowed, not
 * aligned: memcpy rather than cast). */
int lq_gguf_get_array_raw(const struct lq_gguf *gguf, const char *key,
                          enum lq_gguf_value_type *element_type, const void **elements,
                          size_t *count, struct lq_error *err);

/* ---- tensors ---- */

size_t lq_gguf_tensor_count(const struct lq_gguf *gguf);
/* Tensors in file order; NULL past the end. Borrowed. */
const struct lq_gguf_tensor *lq_gguf_tensor_at(const struct lq_gguf *gguf, size_t index);
/* NULL when absent. Borrowed. */
const struct lq_gguf_tensor *lq_gguf_find_tensor(const struct lq_gguf *gguf, const char *name);
/* The tensor's nbytes raw bytes, borrowed from gguf (validated to lie inside the file). */
const void *lq_gguf_tensor_data(const struct lq_gguf *gguf, const struct lq_gguf_tensor *tensor);

/* Dequantizes tensor (of gguf) into out, which holds tensor->numel floats, exactly as ggml's
 * reference dequantization does (same operations in the same order, so the same floats).
 * LQ_EUNSUPPORTED, naming the tensor and its type, for types other than those
 * lq_ggml_type_is_readable accepts. */
int lq_gguf_tensor_to_f32(const struct lq_gguf *gguf, const struct lq_gguf_tensor *tensor,
                          float *out, struct lq_error *err);

#endif
