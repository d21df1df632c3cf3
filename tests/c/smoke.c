/* A C program built against include/shmprom.h: opens a zone, defines a
 * counter, updates it, renders, checks the line is there, prefaults
 * (and keeps pages ahead of the frontiers). */
#include "shmprom.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "failed: %s (%s)\n", #c, err); return 1; } } while (0)

int main(void) {
    char err[256] = "";
    shmprom_zone *z = NULL;
    CHECK(shmprom_abi_version() == SHMPROM_ABI_VERSION);
    CHECK(shmprom_zone_open("c-smoke", 7, 1 << 20, 3, 0, NULL, &z, err, sizeof err) == SHMPROM_OK);
    const char *labels[] = {"op"};
    size_t label_lens[] = {2};
    int64_t fam = shmprom_family_define(z, "c_ops_total", 11, "Ops from C", 10, 0, 0,
                                        1, labels, label_lens, 0, NULL, err, sizeof err);
    CHECK(fam >= 0);
    const char *vals[] = {"read"};
    size_t val_lens[] = {4};
    int64_t cell = shmprom_series_get(z, (uint32_t)fam, 1, vals, val_lens, err, sizeof err);
    CHECK(cell >= 0);
    for (int i = 0; i < 42; i++) shmprom_cell_add(z, 0, (uint64_t)cell, 1.0);
    CHECK(shmprom_cell_get(z, (uint32_t)fam, (uint64_t)cell, 0) == 42.0);
    /* a wrong label count is an error with a message, not a crash */
    CHECK(shmprom_series_get(z, (uint32_t)fam, 0, NULL, NULL, err, sizeof err) == SHMPROM_EINVAL);
    CHECK(strstr(err, "expected 1 label values") != NULL);
    CHECK(shmprom_zone_open(NULL, 0, 0, 0, 0, NULL, &z, err, sizeof err) == SHMPROM_EINVAL);
    /* a share for fewer than one cell per series is refused, with a message */
    shmprom_zone *z2 = NULL;
    CHECK(shmprom_zone_open("c-smoke-cells", 13, 1 << 20, 3, 0.5, NULL, &z2, err, sizeof err) == SHMPROM_EINVAL);
    CHECK(strstr(err, "cells per series") != NULL);
    uint8_t *buf = NULL;
    size_t len = 0;
    CHECK(shmprom_render(z, 0, &buf, &len, err, sizeof err) == SHMPROM_OK);
    const char *want = "c_ops_total{op=\"read\"} 42\n";
    int found = memmem(buf, len, want, strlen(want)) != NULL;
    shmprom_buf_free(buf, len);
    CHECK(found);
    CHECK(shmprom_check(z, err, sizeof err) == SHMPROM_OK);
    /* prefault: 0 (madvise) or 1 (page by page); the values stay */
    CHECK(shmprom_zone_prefault(z, SHMPROM_PREFAULT_ALLOCATE, err, sizeof err) >= 0);
    CHECK(shmprom_zone_prefault(z, SHMPROM_PREFAULT_MAP, err, sizeof err) >= 0);
    CHECK(shmprom_zone_prefault(z, 7, err, sizeof err) == SHMPROM_EINVAL);
    CHECK(strstr(err, "prefault") != NULL);
    CHECK(shmprom_zone_prefault(NULL, 0, err, sizeof err) == SHMPROM_EINVAL);
    /* pages ahead of the frontiers: some the first time, none again */
    uint64_t marks[2] = { 0, 0 };
    CHECK(shmprom_zone_populate_ahead(z, 1, 65536, 1000, marks, err, sizeof err) >= 0);
    CHECK(marks[0] > 0 && marks[1] > 0);
    CHECK(shmprom_zone_populate_ahead(z, 1, 65536, 1000, marks, err, sizeof err) == 0);
    CHECK(shmprom_zone_populate_ahead(z, 1, 65536, 1000, NULL, err, sizeof err) == SHMPROM_EINVAL);
    CHECK(strstr(err, "marks") != NULL);
    CHECK(shmprom_cell_get(z, (uint32_t)fam, (uint64_t)cell, 0) == 42.0);
    printf("ok\n");
    return 0;
}
