/* Attention of a pass's new queries over their row's KV cache, one fixed order per query.

   A query at position p reads the keys of positions 0..p: the row's committed slots
   0..len-1 in place, then the new tokens its mask allows (slot len + i for new token i,
   in pass order, which is position order: parents come before children). For each
   query head, in fp32:

     s_j = sum over the head dimension of (q * scale) * k_j     (16 lanes, then a fixed tree)
     e_j = exp(s_j - max_j s_j)                                  (one polynomial, lane-wise)
     out = (sum_j e_j v_j) / (sum_j e_j)                         (keys in order)

   Every number depends only on the query and its own keys, never on the other queries
   or rows of the pass, nor on whether its ancestors sit in a chain or a tree: decoding a
   token alone and verifying it among drafts give the same bits, which greedy speculation
   needs to be exact.

   The code uses GCC vector types of 16 floats and no fused multiply-add (built with
   -ffp-contract=off), so every operation rounds the same way at any vector width: the
   work per query is compiled twice, for AVX-512 (`item_avx512`) and for the machine's
   baseline (`item_base`), and both give the same bits (tests/test_kernels.py). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16
#define TILE 8           /* head-queries scored per sweep over a block of keys */
#define MAX_GROUP 16     /* query heads per KV head */
#define MAX_T 128        /* new tokens per pass */
#define HEAD_QUERIES 64  /* head-queries per work item (queries x heads of one KV head) */
_Static_assert(MAX_GROUP <= HEAD_QUERIES, "a work item holds at least one query's heads");

#pragma GCC diagnostic ignored "-Wpsabi" /* vector arguments of inlined helpers only */

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

#define INLINE static inline __attribute__((always_inline))

INLINE vf load(const void *p, int bf16) {
    if (bf16) { /* each bf16 as the high half of an fp32 (one permute at 512 bits) */
        vh h, zero = {0};
        memcpy(&h, p, sizeof h);
        return (vf)__builtin_shufflevector(zero, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9,
                                           25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    }
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void store_row(void *out, int bf16, const float *x, int n) {
    if (!bf16) {
        memcpy(out, x, (size_t)n * sizeof(float));
        return;
    }
    for (int i = 0; i < n; i++) { /* round to nearest even, as torch does */
        uint32_t bits;
        memcpy(&bits, &x[i], 4);
        ((uint16_t *)out)[i] = (bits & 0x7fffffff) > 0x7f800000 ? (uint16_t)((bits >> 16) | 0x40)
                                                                : (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
    }
}

/* Sums of 16 vectors, one per lane: lane j of the result is the tree
   ((p_j[i] + p_j[i+8]) over i<8, then + [i+4], + [i+2], + [i+1]) of p[j]. */
INLINE vf reduce16(const vf p[LANES]) {
    vf a[8], b[4], c[2];
    for (int k = 0; k < 8; k++)
        a[k] = __builtin_shufflevector(p[2 * k], p[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(p[2 * k], p[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int k = 0; k < 4; k++)
        b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int k = 0; k < 2; k++)
        c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* The same tree over the lanes of one vector. */
INLINE float sum16(vf x) {
    float a[8], b[4];
    for (int i = 0; i < 8; i++) a[i] = x[i] + x[i + 8];
    for (int i = 0; i < 4; i++) b[i] = a[i] + a[i + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* exp(x) for x <= 0, lane-wise: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7
   polynomial (Cephes' expf coefficients), times 2^n; below -87 it gives exp(-87)
   (~1.6e-38), never a denormal. */
INLINE vf exp_neg(vf x) {
    const vf lo = (vf){} - 87.0f;
    vi below = x < lo;
    x = (vf)(((vi)lo & below) | ((vi)x & ~below));
    vf n = x * 1.44269504088896341f + 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    n = n - 12582912.0f;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

/* Partial dot products of one key with head-queries qs[0..nh): part[h * LANES + jj]. */
INLINE void key_dots(const float *qs, int nh, int chunks, const char *key, int kv_bf16, vf *part, int jj) {
    vf kc[256 / LANES];
    for (int c = 0; c < chunks; c++) kc[c] = load(key + c * LANES * (kv_bf16 ? 2 : 4), kv_bf16);
    for (int h = 0; h < nh; h++) {
        const float *qh = qs + h * chunks * LANES;
        vf qc;
        memcpy(&qc, qh, sizeof qc);
        vf acc = qc * kc[0];
        for (int c = 1; c < chunks; c++) {
            memcpy(&qc, qh + c * LANES, sizeof qc);
            acc = acc + qc * kc[c];
        }
        part[h * LANES + jj] = acc;
    }
}

/* Scores of n keys (slots[j], or slot j when slots is NULL) for head-queries
   qs[0..nh): scores[h * stride + at + j]. Each key's score is its own 16-lane partial
   reduced by reduce16, so it does not depend on the keys or head-queries beside it. */
INLINE void score_keys(const float *qs, int nh, int hd, const char *kb, int kv_bf16, const int64_t *slots,
                       int64_t n, float *scores, int64_t stride, int64_t at) {
    const int chunks = hd / LANES, esize = kv_bf16 ? 2 : 4;
    vf part[TILE * LANES];
    for (int h0 = 0; h0 < nh; h0 += TILE) {
        const int th = nh - h0 < TILE ? nh - h0 : TILE;
        for (int64_t j0 = 0; j0 < n; j0 += LANES) {
            for (int jj = 0; jj < LANES; jj++) {
                if (j0 + jj < n) {
                    const int64_t slot = slots ? slots[j0 + jj] : j0 + jj;
                    key_dots(qs + h0 * hd, th, chunks, kb + slot * hd * esize, kv_bf16, part, jj);
                } else {
                    for (int h = 0; h < th; h++) part[h * LANES + jj] = (vf){};
                }
            }
            const int64_t valid = n - j0 < LANES ? n - j0 : LANES;
            for (int h = 0; h < th; h++) {
                vf sum = reduce16(&part[h * LANES]);
                memcpy(&scores[(h0 + h) * stride + at + j0], &sum, valid * sizeof(float));
            }
        }
    }
}

/* Softmax weights in place over scores[0..n): exp(s - max); returns their sum. */
INLINE float softmax_weights(float *s, int64_t n) {
    vf most = (vf){} - INFINITY; /* the max is exact, so its order does not matter */
    for (int64_t j0 = 0; j0 < n; j0 += LANES) {
        vf x = most;
        memcpy(&x, &s[j0], (n - j0 < LANES ? n - j0 : LANES) * sizeof(float));
        vi more = x > most;
        most = (vf)(((vi)x & more) | ((vi)most & ~more));
    }
    float top = most[0];
    for (int i = 1; i < LANES; i++) top = most[i] > top ? most[i] : top;
    vf den = (vf){};
    for (int64_t j0 = 0; j0 < n; j0 += LANES) {
        vf x = (vf){};
        const int64_t valid = n - j0 < LANES ? n - j0 : LANES;
        memcpy(&x, &s[j0], valid * sizeof(float));
        vf e = exp_neg(x - top);
        for (int jj = valid; jj < LANES; jj++) e[jj] = 0.0f; /* past the keys: exactly 0 */
        den = den + e;
        memcpy(&s[j0], &e, valid * sizeof(float));
    }
    return sum16(den);
}

/* Queries i0..i0+nq-1 of one row and the g query heads of one KV head (head-query
   hq = i * g + h): q and out point at the row's [heads, T, hd], k and v at the KV
   head's [capacity, hd] cache. The prefix 0..len-1 is read once for all head-queries;
   then each query's own new tokens. Scratch: qs [nq * g * hd], scores [nq * g * stride],
   slots [nq * T], stride >= len + T. */
INLINE void one_item(const char *q, int q_bf16, const char *k, const char *v, int kv_bf16, int64_t len,
                     const uint8_t *sees, int t, int i0, int nq, int h0, int g, int hd, float scale, float *qs,
                     float *scores, int64_t stride, int64_t *slots, char *out) {
    const int chunks = hd / LANES, esize = kv_bf16 ? 2 : 4, qsize = q_bf16 ? 2 : 4, nh = nq * g;
    for (int i = 0; i < nq; i++)
        for (int h = 0; h < g; h++)
            for (int c = 0; c < chunks; c++) {
                vf x = load(q + (((int64_t)(h0 + h) * t + i0 + i) * hd + c * LANES) * qsize, q_bf16) * scale;
                memcpy(&qs[((i * g + h) * chunks + c) * LANES], &x, sizeof x);
            }
    int ntail[HEAD_QUERIES]; /* nq <= nh <= HEAD_QUERIES (MAX_GROUP <= HEAD_QUERIES) */
    score_keys(qs, nh, hd, k, kv_bf16, NULL, len, scores, stride, 0);
    for (int i = 0; i < nq; i++) {
        int64_t *own = slots + (int64_t)i * t;
        ntail[i] = 0;
        for (int j = 0; j < t; j++)
            if (sees[(int64_t)(i0 + i) * t + j]) own[ntail[i]++] = len + j;
        score_keys(qs + (int64_t)i * g * hd, g, hd, k, kv_bf16, own, ntail[i], scores + (int64_t)i * g * stride,
                   stride, len);
    }
    float total[HEAD_QUERIES];
    for (int hq = 0; hq < nh; hq++) total[hq] = softmax_weights(scores + hq * stride, len + ntail[hq / g]);
    for (int hq0 = 0; hq0 < nh; hq0 += 2) { /* two head-queries per sweep over the values */
        const int pair = hq0 + 1 < nh ? 2 : 1;
        vf acc[2][256 / LANES];
        for (int p = 0; p < 2; p++)
            for (int c = 0; c < chunks; c++) acc[p][c] = (vf){};
        const float *e0 = scores + hq0 * stride, *e1 = scores + (hq0 + pair - 1) * stride;
        for (int64_t j = 0; j < len; j++) {
            const char *val = v + j * hd * esize;
            for (int c = 0; c < chunks; c++) {
                vf x = load(val + c * LANES * esize, kv_bf16);
                acc[0][c] = acc[0][c] + x * e0[j];
                acc[1][c] = acc[1][c] + x * e1[j];
            }
        }
        for (int p = 0; p < pair; p++) {
            const int hq = hq0 + p, i = hq / g, h = hq % g;
            const float *e = scores + hq * stride + len;
            const int64_t *own = slots + (int64_t)i * t;
            for (int j = 0; j < ntail[i]; j++) {
                const char *val = v + own[j] * hd * esize;
                for (int c = 0; c < chunks; c++) acc[p][c] = acc[p][c] + load(val + c * LANES * esize, kv_bf16) * e[j];
            }
            float row[256];
            for (int c = 0; c < chunks; c++) {
                vf o = acc[p][c] / total[hq];
                memcpy(&row[c * LANES], &o, sizeof o);
            }
            store_row(out + ((int64_t)(h0 + h) * t + i0 + i) * hd * qsize, q_bf16, row, hd);
        }
    }
}

#define ITEM_ARGS const char *q, int q_bf16, const char *k, const char *v, int kv_bf16, int64_t len, \
    const uint8_t *sees, int t, int i0, int nq, int h0, int g, int hd, float scale, float *qs, float *scores, \
    int64_t stride, int64_t *slots, char *out
#define ITEM_PASS q, q_bf16, k, v, kv_bf16, len, sees, t, i0, nq, h0, g, hd, scale, qs, scores, stride, slots, out

/* one_item compiled for each instruction set, with the common head sizes as constants
   (their loops then unroll into registers); the threads below call one of them */
#define SIZED(NAME, ATTR)                                                                           \
    ATTR static void NAME(ITEM_ARGS) {                                                              \
        if (hd == 64) one_item(q, q_bf16, k, v, kv_bf16, len, sees, t, i0, nq, h0, g, 64, scale, qs,    \
                               scores, stride, slots, out);                                         \
        else if (hd == 128) one_item(q, q_bf16, k, v, kv_bf16, len, sees, t, i0, nq, h0, g, 128, scale, \
                                     qs, scores, stride, slots, out);                               \
        else one_item(ITEM_PASS);                                                                   \
    }
SIZED(item_base, )
#if defined(__x86_64__)
SIZED(item_avx512, __attribute__((target("avx512f,avx512bw,prefer-vector-width=512"))))
#endif

/* q [b, heads, T, hd] (fp32 or bf16, contiguous); k and v one layer of the cache
   [rows, kv_heads, capacity, hd]; cache_rows [b] the cache row of each batch row;
   lengths [b] their committed slots; sees [b, T, T] (1: new token i sees new token j);
   out [b, heads, T, hd] in q's dtype; avx512: use that build. Returns 0, or -1 (a shape
   the kernel does not take, or no memory). */
int attention_forward(const void *q, int q_bf16, const void *k, const void *v, int kv_bf16, int64_t capacity,
                      int kv_heads, const int64_t *cache_rows, const int64_t *lengths, const uint8_t *sees, int b,
                      int heads, int t, int hd, float scale, void *out, int avx512, int threads) {
    if (hd % LANES || hd > 256 || heads % kv_heads || heads / kv_heads > MAX_GROUP || t < 1 || t > MAX_T) return -1;
    void (*item)(ITEM_ARGS) = item_base;
#if defined(__x86_64__)
    if (avx512) item = item_avx512;
#endif
    const int g = heads / kv_heads, esize = kv_bf16 ? 2 : 4, qsize = q_bf16 ? 2 : 4;
    const int per = HEAD_QUERIES / g > 0 ? HEAD_QUERIES / g : 1; /* queries per work item */
    const int nq_max = per < t ? per : t, spans = (t + nq_max - 1) / nq_max;
    int64_t most = 0;
    for (int r = 0; r < b; r++) {
        if (lengths[r] < 0 || lengths[r] + t > capacity) return -1;
        most = lengths[r] > most ? lengths[r] : most;
    }
    const int64_t stride = most + t + LANES, nh = (int64_t)nq_max * g;
    float *qs_all = malloc((size_t)threads * nh * hd * sizeof(float));
    float *scores_all = malloc((size_t)threads * nh * stride * sizeof(float));
    int64_t *slots_all = malloc((size_t)threads * nq_max * t * sizeof(int64_t));
    if (!qs_all || !scores_all || !slots_all) {
        free(qs_all); free(scores_all); free(slots_all);
        return -1;
    }
    #pragma omp parallel num_threads(threads)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        #pragma omp for schedule(static) collapse(3)
        for (int r = 0; r < b; r++)
            for (int kh = 0; kh < kv_heads; kh++)
                for (int span = 0; span < spans; span++) {
                    const int i0 = span * nq_max, nq = t - i0 < nq_max ? t - i0 : nq_max;
                    const int64_t kv_at = ((cache_rows[r] * kv_heads + kh) * capacity) * hd * esize;
                    const int64_t q_at = (int64_t)r * heads * t * hd * qsize;
                    item((const char *)q + q_at, q_bf16, (const char *)k + kv_at, (const char *)v + kv_at, kv_bf16,
                         lengths[r], sees + (int64_t)r * t * t, t, i0, nq, kh * g, g, hd, scale,
                         qs_all + me * nh * hd, scores_all + me * nh * stride, stride,
                         slots_all + (int64_t)me * nq_max * t, (char *)out + q_at);
                }
    }
    free(qs_all); free(scores_all); free(slots_all);
    return 0;
}

int attention_has_avx512(void) {
#if defined(__x86_64__)
    __builtin_cpu_init(); /* the build below may use AVX-512BW's word permutes */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}
