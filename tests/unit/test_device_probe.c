#include "kernels/device_probe.h"
#include "tests/unit/lq_test.h"

/* On a machine without a GPU the probe must report 0 devices cleanly (CI); with one, every
 * device must run the probe kernel and open cuBLAS and cuSOLVER. */
static void test_probe(void) {
    int count = -1;
    struct lq_error err = {0};
    int rc = lq_cuda_device_count(&count, &err);
    if (!lq_cuda_compiled()) {
        CHECK(rc == LQ_EUNSUPPORTED && count == 0);
        printf("CUDA backend not built: skipped\n");
        return;
    }
    CHECK_MSG(rc == 0, "%s", err.message);
    CHECK(count >= 0);
    if (count == 0) printf("CUDA built, no device present: device checks skipped\n");
    for (int i = 0; i < count; i++) {
        char description[256];
        rc = lq_cuda_device_describe(i, description, sizeof description, &err);
        CHECK_MSG(rc == 0, "device %d: %s", i, err.message);
        if (rc == 0) printf("device %d: %s\n", i, description);
    }
    char description[64];
    CHECK(lq_cuda_device_describe(count + 7, description, sizeof description, &err) != 0);
}

LQ_TEST_MAIN(LQ_TEST(test_probe))
