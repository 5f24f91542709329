/* NUMA primitives: pin OpenMP threads to CPUs, bind memory to a node, measure a node's
 * bandwidth. Raw syscalls for the memory policy, so numoe needs no libnuma at build or run. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"
#include "numoe.h"

/* <linux/mempolicy.h> values; defined here so no kernel or libnuma header is needed. */
#define NUMOE_MPOL_DEFAULT 0
#define NUMOE_MPOL_PREFERRED 1
#define NUMOE_MPOL_BIND 2
#define NUMOE_MAX_NODES 1024
#define NUMOE_MASK_WORDS (NUMOE_MAX_NODES / (8 * sizeof(unsigned long)))

static int valid_cpus(const int *cpus, int n_cpus) {
    if (cpus == NULL || n_cpus <= 0) return 0;
    for (int i = 0; i < n_cpus; i++)
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) return 0;
    return 1;
}

/* Every thread of one region sets its own mask; the first error wins. */
static int set_thread_masks(const int *cpus, int n_cpus, int one_per_thread) {
    if (!valid_cpus(cpus, n_cpus)) return -EINVAL;
    int status = 0;
#pragma omp parallel num_threads(numoe_get_threads())
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        if (one_per_thread) {
            CPU_SET(cpus[omp_get_thread_num() % n_cpus], &set);
        } else {
            for (int i = 0; i < n_cpus; i++) CPU_SET(cpus[i], &set);
        }
        int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
        if (rc != 0) {
#pragma omp critical(numoe_numa_status)
            if (status == 0) status = -rc;
        }
    }
    return status;
}

int numoe_pin_threads(const int *cpus, int n_cpus) { return set_thread_masks(cpus, n_cpus, 1); }

int numoe_allow_threads(const int *cpus, int n_cpus) { return set_thread_masks(cpus, n_cpus, 0); }

int numoe_thread_cpus(int *cpu_of_thread, int max_threads) {
    int n = numoe_get_threads();
#pragma omp parallel num_threads(n)
    {
        int t = omp_get_thread_num();
        if (t < max_threads) cpu_of_thread[t] = sched_getcpu();
    }
    return n;
}

static int set_policy(int mode, const unsigned long *mask, unsigned long max_node) {
    return syscall(SYS_set_mempolicy, mode, mask, max_node) == 0 ? 0 : -errno;
}

int numoe_bind_memory_node(int node, int strict) {
    if (node < 0 || node >= NUMOE_MAX_NODES) return -EINVAL;
    unsigned long mask[NUMOE_MASK_WORDS];
    memset(mask, 0, sizeof(mask));
    mask[node / (8 * sizeof(unsigned long))] = 1UL << (node % (8 * sizeof(unsigned long)));
    int mode = strict ? NUMOE_MPOL_BIND : NUMOE_MPOL_PREFERRED;
    /* The kernel reads max_node - 1 bits (libnuma passes size + 1 for the same reason). */
    unsigned long max_node = NUMOE_MAX_NODES + 1;
    int status = set_policy(mode, mask, max_node);
    if (status != 0) return status;
    /* The policy is per thread: the pool's threads, which first-touch the weights, need it. */
#pragma omp parallel num_threads(numoe_get_threads())
    {
        int rc = set_policy(mode, mask, max_node);
        if (rc != 0) {
#pragma omp critical(numoe_numa_status)
            if (status == 0) status = rc;
        }
    }
    return status;
}

int numoe_unbind_memory(void) {
    int status = set_policy(NUMOE_MPOL_DEFAULT, NULL, 0);
#pragma omp parallel num_threads(numoe_get_threads())
    {
        int rc = set_policy(NUMOE_MPOL_DEFAULT, NULL, 0);
        if (rc != 0) {
#pragma omp critical(numoe_numa_status)
            if (status == 0) status = rc;
        }
    }
    return status;
}

int numoe_memory_policy(int *mode, uint64_t *nodemask) {
    unsigned long mask[NUMOE_MASK_WORDS];
    memset(mask, 0, sizeof(mask));
    int got_mode = 0;
    if (syscall(SYS_get_mempolicy, &got_mode, mask, (unsigned long)NUMOE_MAX_NODES + 1, NULL, 0UL)
        != 0)
        return -errno;
    *mode = got_mode;
    *nodemask = (uint64_t)mask[0];
    return 0;
}

/* Values whose sums are exact in double (multiples of 1/4 below 2^20), so checks are exact. */
static inline double b_value(int64_t i) { return (double)(i & 1023) * 0.5; }
static inline double c_value(int64_t i) { return (double)(i & 511) * 0.25; }

int numoe_membw(const int *cpus, int n_cpus, int64_t bytes, int repeats,
                double *read_gbs, double *copy_gbs, double *triad_gbs) {
    if (!valid_cpus(cpus, n_cpus) || repeats < 1 || bytes < 64 * (int64_t)n_cpus) return -EINVAL;
    const int64_t n = bytes / (int64_t)sizeof(double);
    const size_t size = (size_t)n * sizeof(double);
    /* Pages are not touched here: each pinned thread touches its own share first. */
    double *a = NULL, *b = NULL, *c = NULL;
    if (posix_memalign((void **)&a, 4096, size) != 0) a = NULL;
    if (posix_memalign((void **)&b, 4096, size) != 0) b = NULL;
    if (posix_memalign((void **)&c, 4096, size) != 0) c = NULL;
    if (a == NULL || b == NULL || c == NULL) {
        free(a);
        free(b);
        free(c);
        return -ENOMEM;
    }
    const double scalar = 3.0;
    double best_read = INFINITY, best_copy = INFINITY, best_triad = INFINITY;
    double expected_sum = 0.0, measured_sum = 0.0;
    int status = 0, wrong = 0;
    for (int64_t i = 0; i < n; i++) expected_sum += b_value(i);  /* computed, touches no page */

    /* One region for everything: the same threads pin, touch, measure and restore. */
#pragma omp parallel num_threads(n_cpus) reduction(+ : wrong)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        cpu_set_t old_set, set;
        int have_old = pthread_getaffinity_np(pthread_self(), sizeof(old_set), &old_set) == 0;
        CPU_ZERO(&set);
        CPU_SET(cpus[t], &set);
        int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
        if (rc != 0) {
#pragma omp critical(numoe_numa_status)
            if (status == 0) status = -rc;
        }
        for (int64_t i = lo; i < hi; i++) {
            a[i] = 0.0;
            b[i] = b_value(i);
            c[i] = c_value(i);
        }
        for (int r = 0; r < repeats; r++) {
            double start = 0.0, partial = 0.0;
#pragma omp barrier
#pragma omp master
            {
                measured_sum = 0.0;
                start = omp_get_wtime();
            }
#pragma omp barrier
#pragma omp simd reduction(+ : partial)
            for (int64_t i = lo; i < hi; i++) partial += b[i];
#pragma omp atomic
            measured_sum += partial;
#pragma omp barrier
#pragma omp master
            {
                double seconds = omp_get_wtime() - start;
                if (seconds < best_read) best_read = seconds;
                if (measured_sum != expected_sum) wrong++;
                start = omp_get_wtime();
            }
#pragma omp barrier
            for (int64_t i = lo; i < hi; i++) a[i] = b[i];
#pragma omp barrier
#pragma omp master
            {
                double seconds = omp_get_wtime() - start;
                if (seconds < best_copy) best_copy = seconds;
            }
            for (int64_t i = lo; i < hi; i += 4093) wrong += a[i] != b_value(i);
#pragma omp barrier
#pragma omp master
            start = omp_get_wtime();
#pragma omp barrier
            for (int64_t i = lo; i < hi; i++) a[i] = b[i] + scalar * c[i];
#pragma omp barrier
#pragma omp master
            {
                double seconds = omp_get_wtime() - start;
                if (seconds < best_triad) best_triad = seconds;
            }
            for (int64_t i = lo; i < hi; i += 4093)
                wrong += a[i] != b_value(i) + scalar * c_value(i);
        }
        if (have_old) pthread_setaffinity_np(pthread_self(), sizeof(old_set), &old_set);
    }
    free(a);
    free(b);
    free(c);
    if (status != 0) return status;
    if (wrong != 0) return -EIO;
    const double gb = (double)size / 1e9;
    *read_gbs = gb / best_read;
    *copy_gbs = 2.0 * gb / best_copy;
    *triad_gbs = 3.0 * gb / best_triad;
    return 0;
}
