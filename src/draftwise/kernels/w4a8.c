/* 4-bit weights x int8 activations, summed exactly in int32 per group of 32 inputs.

   y[r][n] = sum_g (scale[n][g] * sa[r][g] * dot_g(q[n], a[r]) + low[n][g] * (sa[r][g] * asum_g(a[r]))) + bias[n]

   where each group g of 32 inputs of row r is rounded to int8 with its own scale:
   a = round(x * 127 / max|x over the group|), sa[r][g] = max / 127; q[n] holds 4-bit values
   0..15 (w = scale * q + low per group); dot_g and asum_g are the exact integer dot product
   and sum of the int8 values over group g. The float sum over groups runs in the same
   order for every row and every number of rows, so a row's result never depends on the
   rows beside it.

   Weight layout, per block of 16 output channels, group after group, 320 bytes each:
   256 bytes of 4-bit values, then 16 fp16 scales and 16 fp16 lows. Within the 256 bytes,
   chunk j (64 bytes) covers inputs 8j..8j+7 of the group: byte 4c+i holds input 8j+i of
   channel c in its low nibble and input 8j+4+i in its high nibble, which is the operand
   order of VNNI's vpdpbusd (16 int32 lanes, each summing 4 byte products).

   Two kernels with the same arithmetic in the same order: AVX-512 VNNI and portable C
   (built with -ffp-contract=off and explicit fmaf, so both give the same bits). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define GROUP 32
#define BLOCK 16
#define GROUP_BYTES (GROUP * BLOCK / 2 + 4 * BLOCK)
#define MAX_ROWS 8

static float fp16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* One row of x (fp32 or bf16) -> int8 values; per group, the scale and the scaled sum.
   Rows are stored in tiles of MAX_ROWS, group-major within a tile (group g of tile row r
   at (g * stride + r) * GROUP, its scale and sum at g * stride + r, stride = the tile's
   rows), so the kernel walks one pointer per tile (one per row ran out of registers at
   7-8 rows and cost ~25%). */
static void quantize_row(const void *x, int bf16, int k, int8_t *a, float *gscale, float *gsum, int stride) {
    for (int g = 0; g < k / GROUP; g++) {
        float v[GROUP], top = 0.0f;
        for (int i = 0; i < GROUP; i++) {
            int64_t at = (int64_t)g * GROUP + i;
            v[i] = bf16 ? bf16_to_float(((const uint16_t *)x)[at]) : ((const float *)x)[at];
            top = fmaxf(top, fabsf(v[i]));
        }
        float inv = top > 0.0f ? 127.0f / top : 0.0f;
        int32_t s = 0;
        for (int i = 0; i < GROUP; i++) {
            int q = (int)nearbyintf(v[i] * inv);
            a[(int64_t)g * stride * GROUP + i] = (int8_t)q;
            s += q;
        }
        gscale[(int64_t)g * stride] = top / 127.0f;
        gsum[(int64_t)g * stride] = gscale[(int64_t)g * stride] * (float)s;
    }
}

static void store(void *y, int bf16, int64_t index, float v) {
    if (bf16) ((uint16_t *)y)[index] = float_to_bf16(v);
    else ((float *)y)[index] = v;
}

/* ---- portable kernel: one block of 16 channels, rows r0..r0+m ---- */

static void block_portable(const uint8_t *w, int groups, const int8_t *a, const float *gscale,
                           const float *gsum, int k, int m, float out[][BLOCK]) {
    for (int r = 0; r < m; r++) {
        float acc[BLOCK] = {0};
        for (int g = 0; g < groups; g++) {
            const int8_t *ag = a + ((int64_t)g * m + r) * GROUP;
            const uint8_t *gw = w + (int64_t)g * GROUP_BYTES;
            const uint16_t *scales = (const uint16_t *)(gw + GROUP * BLOCK / 2), *lows = scales + BLOCK;
            float gs = gscale[(int64_t)g * m + r], sum = gsum[(int64_t)g * m + r];
            for (int c = 0; c < BLOCK; c++) {
                int32_t dot = 0;
                for (int j = 0; j < 4; j++) {
                    for (int i = 0; i < 4; i++) {
                        uint8_t byte = gw[64 * j + 4 * c + i];
                        dot += (byte & 15) * ag[8 * j + i] + (byte >> 4) * ag[8 * j + 4 + i];
                    }
                }
                acc[c] = fmaf(fp16_to_float(scales[c]) * gs, (float)dot, acc[c]);
                acc[c] = fmaf(fp16_to_float(lows[c]), sum, acc[c]);
            }
        }
        for (int c = 0; c < BLOCK; c++) out[r][c] = acc[c];
    }
}

/* ---- AVX-512 VNNI kernel: the same sums, 16 channels per register ---- */

#if defined(__x86_64__)

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,f16c"))) static inline
#define ALWAYS __attribute__((always_inline))

VNNI ALWAYS void block_vnni_rows(const uint8_t *w, int groups, const int8_t *a, const float *gscale,
                                 const float *gsum, int k, const int m, float out[][BLOCK]) {
    __m512 acc[MAX_ROWS];
    #pragma GCC unroll 8
    for (int r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
    const __m512i nibble = _mm512_set1_epi8(15);
    for (int g = 0; g < groups; g++) {
        const uint8_t *gw = w + (int64_t)g * GROUP_BYTES;
        __m512i lo[4], hi[4];
        for (int j = 0; j < 4; j++) {
            __m512i v = _mm512_loadu_si512((const void *)(gw + 64 * j));
            lo[j] = _mm512_and_si512(v, nibble);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gw + GROUP * BLOCK / 2)));
        __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gw + GROUP * BLOCK / 2 + 2 * BLOCK)));
        #pragma GCC unroll 8
        for (int r = 0; r < m; r++) {
            const int8_t *ag = a + ((int64_t)g * m + r) * GROUP;
            __m512i d[4]; /* four independent sums: shorter dependency chains */
            for (int j = 0; j < 4; j++) {
                int32_t a0, a1;
                memcpy(&a0, ag + 8 * j, 4);
                memcpy(&a1, ag + 8 * j + 4, 4);
                d[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], _mm512_set1_epi32(a0));
                d[j] = _mm512_dpbusd_epi32(d[j], hi[j], _mm512_set1_epi32(a1));
            }
            __m512i dot = _mm512_add_epi32(_mm512_add_epi32(d[0], d[1]), _mm512_add_epi32(d[2], d[3]));
            __m512 gs = _mm512_mul_ps(scale, _mm512_set1_ps(gscale[(int64_t)g * m + r]));
            acc[r] = _mm512_fmadd_ps(gs, _mm512_cvtepi32_ps(dot), acc[r]);
            acc[r] = _mm512_fmadd_ps(low, _mm512_set1_ps(gsum[(int64_t)g * m + r]), acc[r]);
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < m; r++) _mm512_storeu_ps(out[r], acc[r]);
}

VNNI void block_vnni(const uint8_t *w, int groups, const int8_t *a, const float *gscale, const float *gsum,
                     int k, int m, float out[][BLOCK]) {
    switch (m) { /* a constant row count lets the compiler keep every accumulator in a register */
    case 1: block_vnni_rows(w, groups, a, gscale, gsum, k, 1, out); break;
    case 2: block_vnni_rows(w, groups, a, gscale, gsum, k, 2, out); break;
    case 3: block_vnni_rows(w, groups, a, gscale, gsum, k, 3, out); break;
    case 4: block_vnni_rows(w, groups, a, gscale, gsum, k, 4, out); break;
    case 5: block_vnni_rows(w, groups, a, gscale, gsum, k, 5, out); break;
    case 6: block_vnni_rows(w, groups, a, gscale, gsum, k, 6, out); break;
    case 7: block_vnni_rows(w, groups, a, gscale, gsum, k, 7, out); break;
    default: block_vnni_rows(w, groups, a, gscale, gsum, k, 8, out); break;
    }
}

int w4a8_has_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
}
#else
int w4a8_has_vnni(void) { return 0; }
static void block_vnni(const uint8_t *w, int groups, const int8_t *a, const float *gscale, const float *gsum,
                       int k, int m, float out[][BLOCK]) {
    block_portable(w, groups, a, gscale, gsum, k, m, out);
}
#endif

/* ---- entry point ---- */

/* y [m, n] = the product described above for x [m, k] (fp32, or bf16 when x_bf16) and
   packed weights w of n channels (n a multiple of 16) by k inputs (a multiple of 32);
   bias (fp32, or NULL) added; y fp32, or bf16 when y_bf16; on `threads` threads.
   Returns 0, or -1 when out of memory. */
int w4a8_linear(const uint8_t *w, int n, int k, const void *x, int x_bf16, int m, const float *bias,
                void *y, int y_bf16, int vnni, int threads) {
    const int blocks = n / BLOCK, groups = k / GROUP;
    int8_t *a = malloc((size_t)m * k);
    float *gscale = malloc((size_t)m * groups * sizeof(float)), *gsum = malloc((size_t)m * groups * sizeof(float));
    if (!a || !gscale || !gsum) {
        free(a); free(gscale); free(gsum);
        return -1;
    }
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < m; r++) { /* rows in tiles of MAX_ROWS, each tile group-major */
            const int r0 = r / MAX_ROWS * MAX_ROWS, rows = m - r0 < MAX_ROWS ? m - r0 : MAX_ROWS;
            quantize_row((const char *)x + (int64_t)r * k * (x_bf16 ? 2 : 4), x_bf16, k,
                         a + (int64_t)r0 * k + (int64_t)(r - r0) * GROUP, gscale + (int64_t)r0 * groups + (r - r0),
                         gsum + (int64_t)r0 * groups + (r - r0), rows);
        }
        #pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            const uint8_t *wb = w + (int64_t)b * groups * GROUP_BYTES;
            float out[MAX_ROWS][BLOCK];
            for (int r0 = 0; r0 < m; r0 += MAX_ROWS) {
                int rows = m - r0 < MAX_ROWS ? m - r0 : MAX_ROWS;
                const int8_t *ar = a + (int64_t)r0 * k;
                const float *gs = gscale + (int64_t)r0 * groups, *su = gsum + (int64_t)r0 * groups;
                if (vnni) block_vnni(wb, groups, ar, gs, su, k, rows, out);
                else block_portable(wb, groups, ar, gs, su, k, rows, out);
                for (int r = 0; r < rows; r++)
                    for (int c = 0; c < BLOCK; c++) {
                        float v = out[r][c];
                        if (bias) v += bias[b * BLOCK + c];
                        store(y, y_bf16, (int64_t)(r0 + r) * n + b * BLOCK + c, v);
                    }
            }
        }
    }
    free(a); free(gscale); free(gsum);
    return 0;
}
