/* safetensors files (https://huggingface.co/docs/safetensors): a reader that never trusts
 * the file, and a writer that replaces files atomically. */
#ifndef LQ_SAFETENSORS_H
#define LQ_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

enum lq_dtype {
    LQ_DTYPE_F32,
    LQ_DTYPE_F16,
    LQ_DTYPE_BF16,
    LQ_DTYPE_F64,
    LQ_DTYPE_U8,
    LQ_DTYPE_I8,
    LQ_DTYPE_U16,
    LQ_DTYPE_I16,
    LQ_DTYPE_U32,
    LQ_DTYPE_I32,
    LQ_DTYPE_U64,
    LQ_DTYPE_I64,
    LQ_DTYPE_BOOL,
};

#define LQ_SAFETENSORS_MAX_DIMS 8

/* Name as written in safetensors headers ("F32", "BF16", ...). */
const char *lq_dtype_name(enum lq_dtype dtype);
/* Bytes per element. */
size_t lq_dtype_size(enum lq_dtype dtype);
/* Parses a safetensors dtype name; returns 0 or LQ_EUNSUPPORTED. */
int lq_dtype_parse(const char *name, enum lq_dtype *out);

struct lq_safetensors_tensor {
    const char *name; /* owned by the file object */
    enum lq_dtype dtype;
    int ndim;
    int64_t shape[LQ_SAFETENSORS_MAX_DIMS];
    size_t numel;
    uint64_t offset; /* from the start of the data section */
    uint64_t nbytes;
};

struct lq_safetensors; /* an open file (memory-mapped read-only) */

/* Opens and validates path: header length within limits (100 MB) and the file, UTF-8 JSON
 * object, every entry exactly {dtype, shape, data_offsets}, every dtype known, at most
 * LQ_SAFETENSORS_MAX_DIMS integer dims, shape products without overflow, each tensor's byte
 * range equal to numel * dtype size and inside the data section, no two ranges overlapping
 * (gaps are allowed), no name twice, string-only __metadata__. Returns LQ_EIO when the file
 * cannot be opened or mapped, LQ_EFORMAT for malformed content, LQ_EUNSUPPORTED for an
 * unknown dtype or too many dims; errors name the file and the tensor, and *out is NULL.
 * The file is memory-mapped read-only; replace it by rename, never truncate it in place.
 * The caller closes the result with lq_safetensors_close. */
int lq_safetensors_open(const char *path, struct lq_safetensors **out, struct lq_error *err);

/* Same validation on a buffer already in memory (borrowed: it must outlive the object).
 * `label` names the buffer in messages. */
int lq_safetensors_open_buffer(const void *data, size_t size, const char *label,
                               struct lq_safetensors **out, struct lq_error *err);

void lq_safetensors_close(struct lq_safetensors *file);

size_t lq_safetensors_count(const struct lq_safetensors *file);
/* Tensors in header order; NULL past the end. Borrowed from file. Offsets and nbytes have
 * been validated: data + offset .. + nbytes lies inside the data section. */
const struct lq_safetensors_tensor *lq_safetensors_tensor_at(const struct lq_safetensors *file,
                                                             size_t index);
/* NULL when absent. Borrowed from file. */
const struct lq_safetensors_tensor *lq_safetensors_find(const struct lq_safetensors *file,
                                                        const char *name);
/* The tensor's raw little-endian bytes, borrowed from file. Not necessarily aligned to the
 * element size: copy (memcpy) rather than cast. */
const void *lq_safetensors_data(const struct lq_safetensors *file,
                                const struct lq_safetensors_tensor *tensor);
/* Drops the resident pages of the tensor's bytes in a mapped file (no-op for a buffer): call
 * after copying a tensor out, so loading a model does not hold the whole file and the copies at
 * once (the 3-bit SmolLM2's serve peaked at 339 MiB that way). Reading the bytes again later is
 * still correct: the pages fault back in from the file. */
void lq_safetensors_drop_pages(const struct lq_safetensors *file,
                               const struct lq_safetensors_tensor *tensor);
/* Value of a "__metadata__" string entry, or NULL. Borrowed from file. */
const char *lq_safetensors_metadata(const struct lq_safetensors *file, const char *key);

/* Reads tensor `name` (F32, F16 or BF16) converted to a newly malloc'ed float array the
 * caller frees (never NULL on success, even for an empty tensor). *tensor_out (optional)
 * receives the tensor's description. LQ_ENOTFOUND when there is no such tensor,
 * LQ_EUNSUPPORTED for other dtypes; *out is NULL on failure. */
int lq_safetensors_read_f32(const struct lq_safetensors *file, const char *name, float **out,
                            const struct lq_safetensors_tensor **tensor_out, struct lq_error *err);

struct lq_safetensors_writer;

int lq_safetensors_writer_create(struct lq_safetensors_writer **out, struct lq_error *err);
/* Adds a tensor; data (numel * dtype size bytes, host order = little-endian) is copied.
 * LQ_EINVAL for a bad dtype, shape (ndim 0..8, dims 0..2^53) or a name that is not UTF-8 or
 * is "__metadata__". Names must be unique: lq_safetensors_writer_write checks. */
int lq_safetensors_writer_add(struct lq_safetensors_writer *writer, const char *name,
                              enum lq_dtype dtype, int ndim, const int64_t *shape, const void *data,
                              struct lq_error *err);
/* Adds a "__metadata__" string entry (copied); setting a key again replaces its value. */
int lq_safetensors_writer_set_metadata(struct lq_safetensors_writer *writer, const char *key,
                                       const char *value, struct lq_error *err);
/* Writes the file atomically: a temporary file beside path, fsync, rename over path, fsync
 * of the directory. The header is padded with spaces to a multiple of 8 bytes and tensors
 * lie back to back, widest dtype first then by name (the reference writer's layout), so each
 * starts at a multiple of its element size; the same tensors always give the same bytes.
 * A replaced file keeps its mode (new files get 0644). LQ_EINVAL for a name added twice;
 * LQ_EIO (with strerror) when any step fails, leaving no temporary file and path untouched
 * unless the rename happened (then only the directory fsync failed). */
int lq_safetensors_writer_write(const struct lq_safetensors_writer *writer, const char *path,
                                struct lq_error *err);
void lq_safetensors_writer_free(struct lq_safetensors_writer *writer);

#endif
