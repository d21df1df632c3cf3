/* shmprom: lock-free shared-memory Prometheus metrics (C ABI).
 *
 * This file is the single source of the LuaJIT ffi.cdef text: the part
 * between the SHMPROM_CDEF_BEGIN and SHMPROM_CDEF_END lines is read by
 * lua/resty/shmprom/cdefs.lua's generator check (t/ and tests/abi.rs).
 *
 * Conventions: functions return 0 (or a non-negative result) on success and
 * a negative SHMPROM_E* code on failure, with a NUL-terminated message in
 * the caller's `err` buffer of `errlen` bytes. Nothing unwinds across this
 * boundary. */
#ifndef SHMPROM_H
#define SHMPROM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHMPROM_ABI_VERSION 8

#define SHMPROM_OK 0
#define SHMPROM_EINVAL (-1)
#define SHMPROM_EFULL (-2)
#define SHMPROM_ENOENT (-3)
#define SHMPROM_EOS (-4)
#define SHMPROM_EPANIC (-5)
#define SHMPROM_ESTUCK (-6)
#define SHMPROM_ETOOLONG (-7)

/* `how` of shmprom_zone_prefault */
#define SHMPROM_PREFAULT_ALLOCATE 0
#define SHMPROM_PREFAULT_MAP 1
#define SHMPROM_PREFAULT_ALLOCATE_TABLE 2
#define SHMPROM_PREFAULT_MAP_TABLE 3

/* SHMPROM_CDEF_BEGIN */
typedef struct shmprom_zone shmprom_zone;

typedef struct shmprom_zone_info {
    double *cells;
    uint64_t plane_stride;
    const uint32_t *epoch;
    uint32_t planes;
    uint32_t abi;
} shmprom_zone_info;

uint32_t shmprom_abi_version(void);
const char *shmprom_version(void);
int shmprom_zone_open(const char *name, size_t name_len, uint64_t size,
                      uint32_t planes, double cells_per_series,
                      const char *path, shmprom_zone **out, char *err,
                      size_t errlen);
int shmprom_zone_get_info(const shmprom_zone *z, shmprom_zone_info *out);
int shmprom_plane_claim(shmprom_zone *z, uint32_t pid);
int shmprom_spare_claim(shmprom_zone *z, uint32_t pid);
int shmprom_spare_held(const shmprom_zone *z, uint32_t spare, uint32_t pid);
int64_t shmprom_family_define(shmprom_zone *z, const char *name,
                              size_t name_len, const char *help,
                              size_t help_len, uint32_t kind, uint32_t mode,
                              uint32_t nlabels, const char *const *labels,
                              const size_t *label_lens, uint32_t nbuckets,
                              const double *buckets, char *err, size_t errlen);
int64_t shmprom_series_get(shmprom_zone *z, uint32_t family, uint32_t nvalues,
                           const char *const *values, const size_t *value_lens,
                           char *err, size_t errlen);
int shmprom_series_del(shmprom_zone *z, uint32_t family, uint32_t nvalues,
                       const char *const *values, const size_t *value_lens,
                       char *err, size_t errlen);
int shmprom_family_reset(shmprom_zone *z, uint32_t family, char *err,
                         size_t errlen);
void shmprom_cell_add(shmprom_zone *z, uint32_t plane, uint64_t cell, double v);
void shmprom_cell_set(shmprom_zone *z, uint32_t plane, uint64_t cell, double v);
double shmprom_cell_get(const shmprom_zone *z, uint32_t family, uint64_t cell,
                        uint32_t k);
void shmprom_error_count(shmprom_zone *z, uint32_t kind);
int shmprom_render(shmprom_zone *z, uint32_t format, uint8_t **out,
                   size_t *len, char *err, size_t errlen);
void shmprom_buf_free(uint8_t *buf, size_t len);
int shmprom_render_poll(shmprom_zone *z, uint32_t format, uint64_t not_before_ns,
                        const uint8_t **out, size_t *len, const void **handle,
                        char *err, size_t errlen);
int shmprom_render_poll_enc(shmprom_zone *z, uint32_t format, uint32_t encoding,
                            uint64_t not_before_ns, const uint8_t **out,
                            size_t *len, const void **handle, char *err,
                            size_t errlen);
void shmprom_render_set_nice(shmprom_zone *z, int32_t nice);
void shmprom_render_release(const void *handle);
uint64_t shmprom_clock_ns(void);
int64_t shmprom_sweep(shmprom_zone *z, uint32_t ttl_secs);
void shmprom_zone_set_grace(shmprom_zone *z, uint32_t secs);
int shmprom_zone_prefault(shmprom_zone *z, uint32_t how, char *err,
                          size_t errlen);
int64_t shmprom_zone_populate_ahead(shmprom_zone *z, uint32_t plane,
                                    uint64_t ahead, uint64_t max_pages,
                                    uint64_t *marks, char *err, size_t errlen);
int shmprom_check(shmprom_zone *z, char *err, size_t errlen);
/* The gateway preset's recorder, for the nginx module (nginx-module/). */
typedef struct shmprom_gw shmprom_gw;

typedef struct shmprom_gw_attempt {
    const char *node;
    size_t node_len;
    uint32_t status;
    uint32_t retried;
    double time;
} shmprom_gw_attempt;

typedef struct shmprom_gw_request {
    const char *method;
    size_t method_len;
    const char *depth;
    size_t depth_len;
    uint32_t status;
    uint32_t complete;
    double duration;
    uint64_t received;
    uint64_t sent;
    uint64_t body_sent;
    int64_t content_length;
    uint32_t nattempts;
    const shmprom_gw_attempt *attempts;
} shmprom_gw_request;

typedef void (*shmprom_gw_fn)(shmprom_gw *gw);
typedef void (*shmprom_gw_record_fn)(shmprom_gw *gw,
                                     const shmprom_gw_request *r);

typedef struct shmprom_gw_hooks {
    uint32_t abi;
    shmprom_gw *gw;
    shmprom_gw_fn begin;
    shmprom_gw_fn end;
    shmprom_gw_record_fn record;
} shmprom_gw_hooks;

shmprom_gw *shmprom_gw_open(shmprom_zone *z, const uint32_t *families,
                            uint32_t n, char *err, size_t errlen);
int shmprom_gw_get_hooks(shmprom_gw *gw, shmprom_gw_hooks *out);
void shmprom_gw_begin(shmprom_gw *gw);
void shmprom_gw_end(shmprom_gw *gw);
void shmprom_gw_record(shmprom_gw *gw, const shmprom_gw_request *r);
/* The recorder of the nginx module's shmprom_inc / shmprom_observe
 * directives, one per zone. */
typedef struct shmprom_rec shmprom_rec;

typedef struct shmprom_str {
    const char *data;
    size_t len;
} shmprom_str;

typedef struct shmprom_rec_family {
    uint32_t id;
    uint32_t kind;
    uint32_t nlabels;
} shmprom_rec_family;

typedef int (*shmprom_rec_find_fn)(shmprom_rec *rec, const char *name,
                                   size_t len, shmprom_rec_family *out);
typedef int (*shmprom_rec_label_fn)(shmprom_rec *rec, uint32_t family,
                                    uint32_t i, shmprom_str *out);
typedef int (*shmprom_rec_record_fn)(shmprom_rec *rec, uint32_t family,
                                     double value, uint32_t n,
                                     const shmprom_str *values);

typedef struct shmprom_rec_hooks {
    uint32_t abi;
    shmprom_rec *rec;
    const char *zone;
    size_t zone_len;
    shmprom_rec_find_fn find;
    shmprom_rec_label_fn label;
    shmprom_rec_record_fn record;
} shmprom_rec_hooks;

shmprom_rec *shmprom_rec_open(shmprom_zone *z, char *err, size_t errlen);
int shmprom_rec_get_hooks(shmprom_rec *rec, shmprom_rec_hooks *out);
int shmprom_rec_find(shmprom_rec *rec, const char *name, size_t len,
                     shmprom_rec_family *out);
int shmprom_rec_label(shmprom_rec *rec, uint32_t family, uint32_t i,
                      shmprom_str *out);
int shmprom_rec_record(shmprom_rec *rec, uint32_t family, double value,
                       uint32_t n, const shmprom_str *values);
/* SHMPROM_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* SHMPROM_H */
