/* numoe_read_probe: read bandwidth measured with the same threads and the same process as
 * the kernels, so a kernel's GB/s can be reported as a fraction of what the memory gives.
 * Each thread streams one contiguous share with the widest loads the CPU has and folds the
 * data into integer sums (cheap, exact, and the compiler cannot drop the loads). */
/* Included before any target pragma: intrinsics defined inside one would carry that
 * target, and a function with another target could not inline them. */
#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

#pragma GCC push_options
#pragma GCC target("avx512f")

static uint64_t sum_avx512(const uint8_t *p, int64_t bytes) {
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    __m512i acc2 = _mm512_setzero_si512(), acc3 = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 256 <= bytes; i += 256) {
        acc0 = _mm512_add_epi64(acc0, _mm512_loadu_si512(p + i));
        acc1 = _mm512_add_epi64(acc1, _mm512_loadu_si512(p + i + 64));
        acc2 = _mm512_add_epi64(acc2, _mm512_loadu_si512(p + i + 128));
        acc3 = _mm512_add_epi64(acc3, _mm512_loadu_si512(p + i + 192));
    }
    uint64_t sum = (uint64_t)_mm512_reduce_add_epi64(
        _mm512_add_epi64(_mm512_add_epi64(acc0, acc1), _mm512_add_epi64(acc2, acc3)));
    for (; i < bytes; i++) sum += p[i];
    return sum;
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")
static uint64_t sum_avx2(const uint8_t *p, int64_t bytes) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    __m256i acc2 = _mm256_setzero_si256(), acc3 = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 128 <= bytes; i += 128) {
        acc0 = _mm256_add_epi64(acc0, _mm256_loadu_si256((const __m256i *)(p + i)));
        acc1 = _mm256_add_epi64(acc1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        acc2 = _mm256_add_epi64(acc2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        acc3 = _mm256_add_epi64(acc3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    const __m256i acc = _mm256_add_epi64(_mm256_add_epi64(acc0, acc1), _mm256_add_epi64(acc2, acc3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, acc);
    uint64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    for (; i < bytes; i++) sum += p[i];
    return sum;
}
#pragma GCC pop_options

static uint64_t sum_scalar(const uint8_t *p, int64_t bytes) {
    uint64_t sum = 0;
    int64_t i = 0;
    for (; i + 8 <= bytes; i += 8) {
        uint64_t word;
        memcpy(&word, p + i, sizeof word);
        sum += word;
    }
    for (; i < bytes; i++) sum += p[i];
    return sum;
}

double numoe_read_probe(const void *buf, int64_t bytes, int repeats) {
    if (buf == NULL || bytes <= 0 || repeats <= 0) return 0.0;
    const int isa = numoe_get_isa();
    const uint8_t *data = buf;
    const int n_threads = numoe_active_threads();
    /* Page-aligned shares, one contiguous range per thread, as the matvec split does. */
    int64_t share = (bytes + n_threads - 1) / n_threads;
    share = (share + 4095) / 4096 * 4096;
    double total = 0.0;
    for (int rep = 0; rep < repeats; rep++) {
        uint64_t sum = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static, 1) reduction(+ : sum)
        for (int part = 0; part < n_threads; part++) {
            const int64_t begin = part * share;
            if (begin >= bytes) continue;
            const int64_t len = begin + share <= bytes ? share : bytes - begin;
            if (isa == NUMOE_ISA_AVX512) sum += sum_avx512(data + begin, len);
            else if (isa == NUMOE_ISA_AVX2) sum += sum_avx2(data + begin, len);
            else sum += sum_scalar(data + begin, len);
        }
        total += (double)sum;
    }
    return total;
}
