/* Shared-memory all-reduce between the worker processes of one host (worker/shm_allreduce.py).
 *
 * Each rank owns a segment that every rank maps. A segment holds two slots; reduction number
 * seq (1, 2, 3, ...) uses slot seq % 2 of every segment:
 *
 *   writer (each rank, in its own segment)    reader (each rank, for every peer)
 *     copy values, n and key into the slot       spin until the peer's slot seq == seq
 *     store seq (release)                        (acquire), then read n, key and values
 *
 * The release store / acquire load pair is the only synchronisation: once a reader sees seq,
 * the values and key written before it are visible (C11 atomics, correct on any CPU, not only
 * x86's TSO). Two slots are enough without acknowledgements: a rank writes slot seq % 2 again
 * at seq + 2 only after finishing seq + 1, which needs every peer's seq + 1 contribution, and a
 * peer publishes seq + 1 only after it has finished reading everyone's seq.
 *
 * Every rank then sums all world_size contributions itself, element by element in rank order
 * ((v0 + v1) + v2) + ..., the same float32 operations numpy does, so all ranks get the same bits.
 */
#define _GNU_SOURCE
#include <assert.h>
#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "numoe.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "shared-memory seq needs lock-free 64-bit atomics");

typedef struct {
    _Atomic int64_t seq; /* reduction number whose data the slot holds; 0 = never written */
    int64_t n;           /* float32 values in the slot */
    int64_t key[NUMOE_SHM_KEY_LEN];
} shm_slot_header;
static_assert(sizeof(shm_slot_header) == NUMOE_SHM_HEADER_BYTES, "slot header is one line");

/* Waiting: spin (lowest latency while the peer is about to arrive), then yield, then sleep so
 * that a rank waiting for a slow peer does not starve it on an oversubscribed CPU. */
#define SPIN_NS 50000        /* 50 us */
#define YIELD_NS 1000000     /* then sched_yield until 1 ms */
#define SLEEP_NS 20000       /* then sleep 20 us between looks */
#define SUM_BLOCK 2048       /* floats summed per block: 8 KiB per source stays in L1 */

static int64_t slot_stride(int64_t capacity) {
    int64_t data_bytes = (capacity * (int64_t)sizeof(float) + 63) / 64 * 64;
    return NUMOE_SHM_HEADER_BYTES + data_bytes;
}

int64_t numoe_shm_segment_bytes(int64_t capacity) {
    if (capacity <= 0) return -EINVAL;
    return 2 * slot_stride(capacity);
}

static shm_slot_header *slot_of(void *segment, int64_t capacity, int64_t seq) {
    return (shm_slot_header *)((char *)segment + (seq % 2) * slot_stride(capacity));
}

static float *data_of(shm_slot_header *slot) {
    return (float *)((char *)slot + NUMOE_SHM_HEADER_BYTES);
}

static int64_t elapsed_ns(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)(now.tv_sec - since->tv_sec) * 1000000000 + (now.tv_nsec - since->tv_nsec);
}

/* Wait until every peer's slot holds seq. Returns 0, -ETIMEDOUT or -EPROTO (a peer is at a later
 * seq: the ranks disagree on how many reductions they did); *ranks = the ranks at fault. */
static int wait_for_peers(void *const *segments, int world_size, int rank, int64_t capacity,
                          int64_t seq, double timeout_s, uint64_t *ranks) {
    uint64_t pending = 0;
    for (int r = 0; r < world_size; r++)
        if (r != rank) pending |= UINT64_C(1) << r;
    const int64_t timeout_ns = (int64_t)(timeout_s * 1e9);
    struct timespec started;
    clock_gettime(CLOCK_MONOTONIC, &started);
    for (uint64_t look = 0;; look++) {
        for (int r = 0; r < world_size; r++) {
            if (!(pending & (UINT64_C(1) << r))) continue;
            shm_slot_header *slot = slot_of(segments[r], capacity, seq);
            int64_t seen = atomic_load_explicit(&slot->seq, memory_order_acquire);
            if (seen == seq) {
                pending &= ~(UINT64_C(1) << r);
            } else if (seen > seq) { /* the error path below reads its header unsynchronised */
                *ranks = UINT64_C(1) << r;
                return -EPROTO;
            }
        }
        if (pending == 0) return 0;
        if (look % 64 != 63) {
            cpu_relax();
            continue;
        }
        int64_t waited = elapsed_ns(&started);
        if (waited > timeout_ns) {
            *ranks = pending;
            return -ETIMEDOUT;
        }
        if (waited > YIELD_NS) {
            struct timespec pause = {0, SLEEP_NS};
            nanosleep(&pause, NULL);
        } else if (waited > SPIN_NS) {
            sched_yield();
        }
    }
}

int numoe_shm_all_reduce(void *const *segments, int world_size, int rank, int64_t capacity,
                         int64_t seq, const int64_t *key, const float *values, int64_t n,
                         double timeout_s, float *out, uint64_t *ranks, int64_t *peer_key) {
    if (segments == NULL || key == NULL || ranks == NULL || peer_key == NULL ||
        world_size < 1 || world_size > 64 || rank < 0 || rank >= world_size || seq < 1 ||
        n < 0 || n > capacity || (n > 0 && (values == NULL || out == NULL)) || !(timeout_s > 0))
        return -EINVAL;
    for (int r = 0; r < world_size; r++)
        if (segments[r] == NULL) return -EINVAL;
    *ranks = 0;

    shm_slot_header *own = slot_of(segments[rank], capacity, seq);
    if (n > 0) memcpy(data_of(own), values, (size_t)n * sizeof(float));
    own->n = n;
    memcpy(own->key, key, sizeof(own->key));
    atomic_store_explicit(&own->seq, seq, memory_order_release);

    int status = wait_for_peers(segments, world_size, rank, capacity, seq, timeout_s, ranks);
    if (status != 0) {
        if (status == -EPROTO) {
            int bad = __builtin_ctzll(*ranks);
            shm_slot_header *slot = slot_of(segments[bad], capacity, seq);
            memcpy(peer_key, slot->key, sizeof(slot->key));
            peer_key[NUMOE_SHM_KEY_LEN] = slot->n;
        }
        return status;
    }

    const float *sources[64];
    for (int r = 0; r < world_size; r++) {
        shm_slot_header *slot = slot_of(segments[r], capacity, seq);
        if (r != rank && (slot->n != n || memcmp(slot->key, key, sizeof(slot->key)) != 0)) {
            *ranks = UINT64_C(1) << r;
            memcpy(peer_key, slot->key, sizeof(slot->key));
            peer_key[NUMOE_SHM_KEY_LEN] = slot->n;
            return -EPROTO;
        }
        sources[r] = r == rank ? values : data_of(slot);
    }

    /* Rank order, one block at a time: out = v0 + v1, then out += v2, ... (no reassociation:
     * numoe builds without -ffast-math, so each += is one IEEE float32 addition). */
    for (int64_t start = 0; start < n; start += SUM_BLOCK) {
        int64_t count = n - start < SUM_BLOCK ? n - start : SUM_BLOCK;
        float *restrict dst = out + start;
        if (world_size == 1) {
            memcpy(dst, sources[0] + start, (size_t)count * sizeof(float));
            continue;
        }
        const float *restrict first = sources[0] + start;
        const float *restrict second = sources[1] + start;
        for (int64_t i = 0; i < count; i++) dst[i] = first[i] + second[i];
        for (int r = 2; r < world_size; r++) {
            const float *restrict next = sources[r] + start;
            for (int64_t i = 0; i < count; i++) dst[i] += next[i];
        }
    }
    return 0;
}
