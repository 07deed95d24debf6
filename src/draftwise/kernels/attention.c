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
   -ffp-contract=off), so every operation rounds the same way at any vector width: it is
   compiled twice, for AVX-512 (`attention_avx512`) and for the machine's baseline
   (`attention_base`), and both give the same bits (tests/test_kernels.py). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16

#pragma GCC diagnostic ignored "-Wpsabi" /* vector arguments of inlined helpers only */

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

#define INLINE static inline __attribute__((always_inline))

INLINE vf load(const void *p, int bf16) {
    if (bf16) {
        vh h;
        memcpy(&h, p, sizeof h);
        return (vf)(__builtin_convertvector(h, vu) << 16);
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

/* exp(x) for x <= 0, lane-wise: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
   polynomial, times 2^n; below -87 it gives exp(-87) (~2e-38), never a denormal. */
INLINE vf exp_neg(vf x) {
    const vf lo = (vf){} - 87.0f;
    vi below = x < lo;
    x = (vf)(((vi)lo & below) | ((vi)x & ~below));
    vf n = x * 1.44269504088896341f + 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    n = n - 12582912.0f;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = r * 1.3981999507e-3f + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

/* One query (row r, new token t) and the g query heads of KV head kh: writes out
   [g][hd]. keys: slots 0..len-1, then len + i for the new tokens i this query sees. */
INLINE void one_query(const void *q, int q_bf16, const void *k, const void *v, int kv_bf16, int64_t len,
                      const uint8_t *sees, int t_new, int g, int hd, float scale, float *scores, int64_t *slots,
                      void *out, int out_bf16, int64_t q_head_stride, int64_t out_head_stride) {
    const int chunks = hd / LANES, esize = kv_bf16 ? 2 : 4;
    const char *kb = k, *vb = v;
    int64_t n = 0;
    for (int64_t j = 0; j < len; j++) slots[n++] = j;
    for (int i = 0; i < t_new; i++)
        if (sees[i]) slots[n++] = len + i;
    const int64_t padded = (n + LANES - 1) / LANES * LANES;
    float qs[16 * 256 / LANES * LANES];
    for (int h = 0; h < g; h++)
        for (int c = 0; c < chunks; c++) {
            vf x = load((const char *)q + (h * q_head_stride + c * LANES) * (q_bf16 ? 2 : 4), q_bf16) * scale;
            memcpy(&qs[(h * chunks + c) * LANES], &x, sizeof x);
        }
    /* scores: per key, 16-lane products summed over the chunks, then reduce16 per 16 keys */
    for (int64_t j0 = 0; j0 < padded; j0 += LANES) {
        vf part[16][LANES];
        for (int jj = 0; jj < LANES; jj++) {
            if (j0 + jj >= n) {
                for (int h = 0; h < g; h++) part[h][jj] = (vf){};
                continue;
            }
            const char *key = kb + slots[j0 + jj] * hd * esize;
            vf kc[256 / LANES];
            for (int c = 0; c < chunks; c++) kc[c] = load(key + c * LANES * esize, kv_bf16);
            for (int h = 0; h < g; h++) {
                vf acc, qc;
                memcpy(&qc, &qs[h * chunks * LANES], sizeof qc);
                acc = qc * kc[0];
                for (int c = 1; c < chunks; c++) {
                    memcpy(&qc, &qs[(h * chunks + c) * LANES], sizeof qc);
                    acc = acc + qc * kc[c];
                }
                part[h][jj] = acc;
            }
        }
        for (int h = 0; h < g; h++) {
            vf s = reduce16(part[h]);
            memcpy(&scores[h * padded + j0], &s, sizeof s);
        }
    }
    for (int h = 0; h < g; h++) {
        float *s = scores + h * padded, top = -INFINITY;
        for (int64_t j = 0; j < n; j++) top = s[j] > top ? s[j] : top;
        vf den = (vf){};
        for (int64_t j0 = 0; j0 < padded; j0 += LANES) {
            vf x;
            memcpy(&x, &s[j0], sizeof x);
            vf e = exp_neg(x - top);
            for (int jj = 0; jj < LANES; jj++) /* padding keys weigh exactly 0 */
                if (j0 + jj >= n) e[jj] = 0.0f;
            den = den + e;
            memcpy(&s[j0], &e, sizeof e);
        }
        const float total = sum16(den);
        vf acc[256 / LANES];
        for (int c = 0; c < chunks; c++) acc[c] = (vf){};
        for (int64_t j = 0; j < n; j++) {
            const char *val = vb + slots[j] * hd * esize;
            for (int c = 0; c < chunks; c++) acc[c] = acc[c] + load(val + c * LANES * esize, kv_bf16) * s[j];
        }
        float row[256];
        for (int c = 0; c < chunks; c++) {
            vf o = acc[c] / total;
            memcpy(&row[c * LANES], &o, sizeof o);
        }
        store_row((char *)out + h * out_head_stride * (out_bf16 ? 2 : 4), out_bf16, row, hd);
    }
}

/* q [b, heads, T, hd] (fp32 or bf16, contiguous); k and v one layer of the cache
   [rows, kv_heads, capacity, hd]; cache_rows [b] the cache row of each batch row;
   lengths [b] their committed slots; sees [b, T, T] (1: new token i sees new token j);
   out [b, heads, T, hd] in q's dtype. Returns 0, or -1 (bad shape or no memory). */
#define QUERY_ARGS const void *q, int q_bf16, const void *k, const void *v, int kv_bf16, int64_t len, \
    const uint8_t *sees, int t_new, int g, int hd, float scale, float *scores, int64_t *slots, void *out, \
    int out_bf16, int64_t q_head_stride, int64_t out_head_stride
#define QUERY_PASS q, q_bf16, k, v, kv_bf16, len, sees, t_new, g, hd, scale, scores, slots, out, out_bf16, \
    q_head_stride, out_head_stride

/* one_query compiled for each instruction set; the threads below call one of them */
static void query_base(QUERY_ARGS) { one_query(QUERY_PASS); }
#if defined(__x86_64__)
__attribute__((target("avx512f"))) static void query_avx512(QUERY_ARGS) { one_query(QUERY_PASS); }
#endif

/* q [b, heads, T, hd] (fp32 or bf16, contiguous); k and v one layer of the cache
   [rows, kv_heads, capacity, hd]; cache_rows [b] the cache row of each batch row;
   lengths [b] their committed slots; sees [b, T, T] (1: new token i sees new token j);
   out [b, heads, T, hd] in q's dtype; avx512: use that build. Returns 0, or -1 (a shape
   the kernel does not take, or no memory). */
int attention_forward(const void *q, int q_bf16, const void *k, const void *v, int kv_bf16, int64_t capacity,
                      int kv_heads, const int64_t *cache_rows, const int64_t *lengths, const uint8_t *sees, int b,
                      int heads, int t, int hd, float scale, void *out, int avx512, int threads) {
    if (hd % LANES || hd > 256 || heads % kv_heads || heads / kv_heads > 16) return -1;
    void (*query)(QUERY_ARGS) = query_base;
#if defined(__x86_64__)
    if (avx512) query = query_avx512;
#endif
    const int g = heads / kv_heads, esize = kv_bf16 ? 2 : 4, qsize = q_bf16 ? 2 : 4;
    int64_t most = 0;
    for (int r = 0; r < b; r++) {
        if (lengths[r] < 0 || lengths[r] + t > capacity) return -1;
        most = lengths[r] > most ? lengths[r] : most;
    }
    const int64_t keys = most + t + LANES; /* the most keys a query reads, padded */
    float *scores_all = malloc((size_t)threads * keys * g * sizeof(float));
    int64_t *slots_all = malloc((size_t)threads * keys * sizeof(int64_t));
    if (!scores_all || !slots_all) {
        free(scores_all); free(slots_all);
        return -1;
    }
    #pragma omp parallel num_threads(threads)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *scores = scores_all + (int64_t)me * keys * g;
        int64_t *slots = slots_all + (int64_t)me * keys;
        #pragma omp for schedule(static) collapse(3)
        for (int r = 0; r < b; r++)
            for (int kh = 0; kh < kv_heads; kh++)
                for (int i = 0; i < t; i++) {
                    const int64_t kv_at = ((cache_rows[r] * kv_heads + kh) * capacity) * hd * esize;
                    const int64_t q_at = (((int64_t)r * heads + kh * g) * t + i) * hd;
                    query((const char *)q + q_at * qsize, q_bf16, (const char *)k + kv_at, (const char *)v + kv_at,
                          kv_bf16, lengths[r], sees + ((int64_t)r * t + i) * t, t, g, hd, scale, scores, slots,
                          (char *)out + q_at * qsize, q_bf16, (int64_t)t * hd, (int64_t)t * hd);
                }
    }
    free(scores_all); free(slots_all);
    return 0;
}

int attention_has_avx512(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}
