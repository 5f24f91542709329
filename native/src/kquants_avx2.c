/* Placeholder until the K-quant kernels land: registers nothing, so lookups fall back. */
#include "internal.h"

void numoe_fill_kquants_avx2(numoe_kernel_table *t) { (void)t; }
