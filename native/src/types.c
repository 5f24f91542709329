/* Per-type sizes: the facts of the GGUF block formats, independent of any kernel. */
#include "internal.h"
#include "numoe.h"

typedef struct {
    int64_t block_size;   /* elements per block */
    int64_t block_bytes;  /* bytes per block */
    int uses_q8a;         /* 1: vec_dot takes block_q8a activations; 0: f32 activations */
} type_traits;

static type_traits traits_of(int type) {
    switch (type) {
    case NUMOE_TYPE_F32:  return (type_traits){1, 4, 0};
    case NUMOE_TYPE_F16:  return (type_traits){1, 2, 0};
    case NUMOE_TYPE_BF16: return (type_traits){1, 2, 0};
    case NUMOE_TYPE_Q4_0: return (type_traits){QK4_0, sizeof(block_q4_0), 1};
    case NUMOE_TYPE_Q5_0: return (type_traits){QK5_0, sizeof(block_q5_0), 1};
    case NUMOE_TYPE_Q8_0: return (type_traits){QK8_0, sizeof(block_q8_0), 1};
    case NUMOE_TYPE_Q4_K: return (type_traits){QK_K, sizeof(block_q4_K), 1};
    case NUMOE_TYPE_Q5_K: return (type_traits){QK_K, sizeof(block_q5_K), 1};
    case NUMOE_TYPE_Q6_K: return (type_traits){QK_K, sizeof(block_q6_K), 1};
    default:              return (type_traits){0, 0, 0};
    }
}

int64_t numoe_block_size(int type) { return traits_of(type).block_size; }

int64_t numoe_block_bytes(int type) { return traits_of(type).block_bytes; }

int64_t numoe_row_bytes(int type, int64_t n) {
    const type_traits tr = traits_of(type);
    if (tr.block_size <= 0) return NUMOE_EBADTYPE;
    if (n <= 0 || n % tr.block_size != 0) return NUMOE_EBADSHAPE;
    return n / tr.block_size * tr.block_bytes;
}

int numoe_type_uses_q8a(int type) { return traits_of(type).uses_q8a; }

int numoe_type_supported(int type) {
    if (type < 0 || type >= NUMOE_MAX_TYPE || traits_of(type).block_size <= 0) return 0;
    const numoe_kernel_table *t = numoe_active_table();
    return t->vec_dot[type] != NULL && t->dequant[type] != NULL;
}
