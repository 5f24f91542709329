/* Kernel tables per ISA, chosen once at load from CPU flags; the prompt-path GEMM
 * micro-kernel of the ISA in use; thread count.
 *
 * Each ISA table starts empty, takes what its fill function registers, and inherits every
 * entry left NULL from the table below it, so every table is complete down to the scalar
 * reference. Fill functions of an ISA the CPU lacks are never called: the files that define
 * them are compiled with that ISA enabled, and even pointer stores there may use it. */
#include <omp.h>
#include <string.h>

#include "gemm.h"
#include "internal.h"
#include "numoe.h"

#define NUMOE_N_ISA 3

static numoe_kernel_table g_tables[NUMOE_N_ISA];
static int g_best_isa = NUMOE_ISA_SCALAR;
static int g_isa = NUMOE_ISA_SCALAR;
static int g_threads = 1;
static int g_initialised = 0;

static int detect_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return NUMOE_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return NUMOE_ISA_AVX2;
    return NUMOE_ISA_SCALAR;
}

static void inherit_missing(numoe_kernel_table *t, const numoe_kernel_table *lower) {
    for (int i = 0; i < NUMOE_MAX_TYPE; i++) {
        /* A tile is inherited only with the vec_dot it reproduces bit for bit. */
        if (t->vec_dot[i] == NULL) {
            t->vec_dot[i] = lower->vec_dot[i];
            t->vec_dot_tile[i] = lower->vec_dot_tile[i];
        }
        if (t->dequant[i] == NULL) t->dequant[i] = lower->dequant[i];
    }
    if (t->quantize_act == NULL) t->quantize_act = lower->quantize_act;
}

/* Runs when the shared library is loaded, before any entry point can be called. */
__attribute__((constructor)) static void numoe_init(void) {
    if (g_initialised) return;
    g_best_isa = detect_best_isa();
    memset(g_tables, 0, sizeof g_tables);
    numoe_fill_table_scalar(&g_tables[NUMOE_ISA_SCALAR]);
    if (g_best_isa >= NUMOE_ISA_AVX2) numoe_fill_table_avx2(&g_tables[NUMOE_ISA_AVX2]);
    inherit_missing(&g_tables[NUMOE_ISA_AVX2], &g_tables[NUMOE_ISA_SCALAR]);
    if (g_best_isa >= NUMOE_ISA_AVX512) numoe_fill_table_avx512(&g_tables[NUMOE_ISA_AVX512]);
    inherit_missing(&g_tables[NUMOE_ISA_AVX512], &g_tables[NUMOE_ISA_AVX2]);
    g_isa = g_best_isa;
    g_threads = omp_get_max_threads();
    if (g_threads < 1) g_threads = 1;
    g_initialised = 1;
}

const numoe_kernel_table *numoe_active_table(void) { return &g_tables[g_isa]; }

int numoe_active_threads(void) { return g_threads; }

/* Not in the kernel table (internal.h is shared): one micro-kernel per ISA, no per-type
 * entries, so a switch is all it takes. The kernel structs are plain data, safe to hand out
 * on any CPU; only calling a SIMD tile needs the ISA, and g_isa never exceeds the best. */
const numoe_gemm_kernel *numoe_active_gemm(void) {
    switch (g_isa) {
    case NUMOE_ISA_AVX512: return &numoe_gemm_avx512;
    case NUMOE_ISA_AVX2: return &numoe_gemm_avx2;
    default: return &numoe_gemm_scalar;
    }
}

int numoe_best_isa(void) { return g_best_isa; }

int numoe_set_isa(int isa) {
    if (isa < NUMOE_ISA_SCALAR) isa = NUMOE_ISA_SCALAR;
    if (isa > g_best_isa) isa = g_best_isa;
    g_isa = isa;
    return g_isa;
}

int numoe_get_isa(void) { return g_isa; }

void numoe_set_threads(int n_threads) {
    /* More threads than the OpenMP runtime offers only adds contention. */
    const int limit = omp_get_num_procs() * 4;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > limit) n_threads = limit;
    g_threads = n_threads;
}

int numoe_get_threads(void) { return g_threads; }
