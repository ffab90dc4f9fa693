/* quantize-report's CPU scoring kernel: for each row of a block of matrices W [B, out, in] (bfloat16,
 * float16 or float32), in one pass over the row while it sits in the L1 cache:
 *   - the row's moments (kernels.row_moments: sum, max, min, and the sums of z..z^4 with
 *     z = W 2^k - m 2^k about the row's float32 mean m);
 *   - for each requested scheme, the sum of ((Q(W) - W) scale)^2 over the row, and optionally
 *     Q(W) - W itself (float32, for the activation-space error).
 *
 * The schemes are those of schemes.py, operation for operation: the same IEEE float32 divisions,
 * products and sums, round-to-nearest-even, clamps and selects, so Q(W) is bit for bit the Python
 * scheme's (tests/test_quant_native.py checks that against schemes.py, and schemes.py is checked
 * against bitsandbytes, torchao and torch in tests/test_quant_schemes.py). Built by native.py with
 * -O3 -ffp-contract=off (no fused multiply-adds: a*b - c must round twice, as torch does) and no
 * -ffast-math. Only the row sums differ from torch's: the order of their float32 additions, and
 * where the CPU has FMA some of them are fused (FMA below).
 *
 * Written with GCC / Clang vector extensions (vectors of 8 floats: one AVX register, two SSE / NEON
 * ones), no intrinsics: the same source on x86-64 and arm64. The row length must be a multiple
 * of 16; blocks (16, 32, 64, 128) are then whole vectors, a partial last block (a row not a multiple
 * of the block) included.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Vectors of 8 floats (one AVX register; vectors of 16 made GCC spill them through memory without
 * AVX-512). The row loops take two vectors per step into two accumulators: one chain of additions
 * was bound by their latency. */
#define L 8
typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));

enum { S_INT8 = 0, S_INT4_G128 = 1, S_NF4 = 2, S_FP8_CHANNEL = 3, S_FP8_BLOCK = 4, S_MXFP4 = 5, S_NVFP4 = 6 };
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
static inline vi splati(int32_t x) { return (vi){x, x, x, x, x, x, x, x}; }
static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
#if defined(__AVX2__)
/* the same operations as the generic versions below, one instruction each (vmaxps returns its second
 * operand when either is NaN: max(a, b) = a > b ? a : b exactly) */
#include <immintrin.h>
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static inline vi imax(vi a, vi b) { return (vi)_mm256_max_epi32((__m256i)a, (__m256i)b); }
#else
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return sel(a < b, a, b); }
static inline vi imax(vi a, vi b) { return (vi)sel(a > b, (vf)a, (vf)b); }
#endif
/* acc + a b for the row sums only (the moments' sums of z^3 and z^4, the weight-space error's sum of
 * squares), fused where the CPU has it: those loops had more additions than multiplies, and x86 CPUs
 * add on two ports and multiply or fuse on two others (measured on the kernel alone, alternating calls
 * on a [4, 1024, 1024] bf16 block: the moments 1.04-1.14x, a scheme with them 1.04-1.12x). Never in Q(W)
 * itself, which must round as torch does. */
#if defined(__FMA__)
#include <immintrin.h>
#define FMA(a, b, c) ((vf)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#else
#define FMA(a, b, c) ((a) * (b) + (c))
#endif
/* min(x, hi) with NaN staying NaN: hi < x ? hi : x */
static inline vf vupper(vf x, vf hi) { return vmin(hi, x); }
/* torch.clamp: NaN stays NaN (lo > x ? lo : x, then as vupper) */
static inline vf vclamp(vf x, float lo, float hi) { return vmin(splat(hi), vmax(splat(lo), x)); }
/* horizontal reductions in three shuffle steps (__builtin_shufflevector: GCC 12+, Clang) */
#define SWAP4(v) __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3)
#define SWAP2(v) __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5)
#define SWAP1(v) __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6)
static inline float hsum(vf v) { v += SWAP4(v); v += SWAP2(v); v += SWAP1(v); return v[0]; }
static inline float hmax(vf v) { v = vmax(v, SWAP4(v)); v = vmax(v, SWAP2(v)); v = vmax(v, SWAP1(v)); return v[0]; }
static inline float hmin(vf v) { v = vmin(v, SWAP4(v)); v = vmin(v, SWAP2(v)); v = vmin(v, SWAP1(v)); return v[0]; }
static inline float f_of(int32_t bits) { float f; memcpy(&f, &bits, 4); return f; }
static inline int32_t bits_of(float f) { int32_t b; memcpy(&b, &f, 4); return b; }

/* Signs of zero: torch's rounding keeps x's sign on a zero result (-0.3 -> -0.0), the additions
 * below give +0.0. Only diff = Q(W) - W leaves this kernel, and a zero Q differs only in its sign:
 * (+-0 * s) - x is -x for x != 0, and +0.0 for x = +-0 either way (-0 - -0 = +0 - -0 = +0). So the
 * diffs are the same bits without the copysign, which would cost three operations per vector. */

/* round to the nearest integer, ties to even (torch.round but for the sign of zero): (x + 1.5 2^23) -
 * 1.5 2^23 is exact for |x| < 2^22, and every caller's |x| is at most 127, or 15 plus a zero point. */
static inline vf vround(vf x) {
    const vf M = splat(12582912.0f);
    return (x + M) - M;
}

/* schemes._round_minifloat: x (in range) to `mbits` mantissa bits, minimum normal exponent emin. */
static inline vf round_minifloat(vf x, int mbits, int emin) {
    vi m = (vi)x & splati(0x7F800000);
    vi lo = splati((emin + 127) << 23);
    m = imax(m, lo);
    m = m + splati(((23 - mbits) << 23) | 0x400000);
    vf magic = (vf)m;
    return (x + magic) - magic;  /* sign of zero: see vround */
}
/* schemes.e4m3 for |x| <= 448 (1 + 2^-23), as x / s is for |x| <= absmax and s = fl(absmax / 448): its
 * clamp to +-448 is a no-op there (anything below 448 + 16 rounds to 448 at most) */
static inline vf e4m3_in_range(vf x) { return round_minifloat(x, 3, -6); }
static inline vf e2m1(vf x) { return round_minifloat(vclamp(x, -6.0f, 6.0f), 1, 0); }
static inline float e4m3_scalar(float x) {  /* x within [2^-6, 448] */
    int32_t m = bits_of(x) & 0x7F800000;
    if (m < ((-6 + 127) << 23)) m = (-6 + 127) << 23;
    float magic = f_of(m + ((20 << 23) | 0x400000));
    float r = (x + magic) - magic;
    return r;
}

/* max |x| of the vectors [p, p + n): torch.maximum(amax, -amin).abs() */
static inline float absmax(const float *p, int64_t n) {
    vf hi = ld(p), lo = hi;
    for (int64_t j = L; j < n; j += L) { vf x = ld(p + j); hi = vmax(hi, x); lo = vmin(lo, x); }
    float h = hmax(hi), l = -hmin(lo);
    float a = h > l ? h : l;
    return fabsf(a);  /* +0 for an all-zero block, as abs_() */
}

static const float NF4_POINTS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

/* the NF4 code point nearest t = x / absmax: 15 comparisons with the float32 midpoints (as schemes.py) */
static inline vf nf4_point(vf t) {
#if defined(__AVX2__)
    /* the code point's index as the number of midpoints below t (comparisons give -1), then two
     * 8-entry table lookups: a chain of 15 blends was bound by the one port that blends */
    vi idx = splati(0);
    for (int c = 1; c < 16; c++) idx -= (vi)(t > splat((NF4_POINTS[c] + NF4_POINTS[c - 1]) / 2));
    __m256 lo = _mm256_loadu_ps(NF4_POINTS), hi = _mm256_loadu_ps(NF4_POINTS + 8);
    vf a = (vf)_mm256_permutevar8x32_ps(lo, (__m256i)idx), b = (vf)_mm256_permutevar8x32_ps(hi, (__m256i)idx);
    return sel(idx > splati(7), b, a);
#else
    vf q = splat(NF4_POINTS[0]);
    for (int c = 1; c < 16; c++) q = sel(t > splat((NF4_POINTS[c] + NF4_POINTS[c - 1]) / 2), splat(NF4_POINTS[c]), q);
    return q;
#endif
}

/* the error of one output vector: d = Q(W) - W (into the row's diff when asked), acc += (d scale)^2;
 * `dp` and `vsc` are locals of scheme_row, `acc` one of its two accumulators (locals: through a pointer
 * that may alias the diff, the compiler would store and reload them every vector) */
#define EMIT(acc, j, q, x) do { vf d_ = (q) - (x); if (dp) st(dp + (j), d_); d_ = d_ * vsc; acc += d_ * d_; } while (0)
#define EMIT_PLAIN(acc, j, q, x) do { vf d_ = (q) - (x); acc = FMA(d_, d_, acc); } while (0)  /* no diff, scale 1 */
#define LOOP(start, end, Q, E) for (int64_t j = (start); j < (end); j += 2 * L) { \
        vf xa = ld(x + j), xb = ld(x + j + L); \
        E(acc0, j, Q(xa), xa); E(acc1, j + L, Q(xb), xb); }

/* x[start, end) (a multiple of 16 long), two vectors a step: q = Q(x) for each, errors into acc0 /
 * acc1; the common case (weight space only: no diff; no extreme weights: scale 1) without the store
 * and the multiply */
#define ROWLOOP(start, end, Q) if (plain) { LOOP(start, end, Q, EMIT_PLAIN) } else { LOOP(start, end, Q, EMIT) }

/* schemes._nonzero(absmax / qmax): a zero row or block gets scale 1 */
static inline float nonzero_scale(float absmax, float qmax) {
    float s = absmax / qmax;
    return s == 0 ? 1.0f : s;
}

/* one row x[0, n) (float32) with the row's max / min; blk: fp8_block's scales of this row's band
 * (n / 128 rounded up), amax_t: nvfp4's matrix max |W| */
/* grp: scratch for per-block values, n / 8 floats */
/* gmm: int4_g128's group maxima then minima (n / 128 rounded up each), from the first pass */
static float scheme_row(int scheme, const float *restrict x, int64_t n, float hi, float lo, const float *restrict blk,
                        float amax_t, float *restrict dp, float scale, float *restrict grp, const float *restrict gmm) {
    vf acc0 = splat(0), acc1 = acc0, vsc = splat(scale);
    int plain = !dp && scale == 1.0f;
    float a = -lo > hi ? -lo : hi;
    a = fabsf(a);
    switch (scheme) {
    case S_INT8: {
        vf vs = splat(nonzero_scale(a, 127.0f));
        /* clamp(-127, 127) is a no-op: |x| <= absmax and s = fl(absmax / 127), so |x / s| <= 127 (1 + 2^-23)
         * rounds to at most 127 (NaN stays NaN either way) */
#define Q(x8) (vround((x8) / vs) * vs)
        ROWLOOP(0, n, Q)
#undef Q
        break;
    }
    case S_FP8_CHANNEL: {
        vf vs = splat(nonzero_scale(a, 448.0f));
#define Q(x8) (e4m3_in_range((x8) / vs) * vs)
        ROWLOOP(0, n, Q)
        break;
    }
    case S_FP8_BLOCK:
        for (int64_t g = 0; g < n; g += 128) {
            vf vs = splat(nonzero_scale(blk[g / 128], 448.0f));
            ROWLOOP(g, g + 128 < n ? g + 128 : n, Q)
#undef Q
        }
        break;
    case S_INT4_G128: {  /* first every group's scale and zero point, then the elements (no chain of
                          * reduction -> divisions -> elements per group for the CPU to wait on) */
        int64_t ng = (n + 127) / 128;
        float *sc = grp, *zr = grp + ng, *gmax = grp + 2 * ng;
        for (int64_t g = 0; g < ng; g++) {
            float xmax = gmm[g], xmin = gmm[ng + g];  /* the first pass's group max and min */
            gmax[g] = xmax;
            xmin = xmin < 0.0f ? xmin : 0.0f;  /* torch.minimum(amin, 0) */
            xmax = xmax > 0.0f ? xmax : 0.0f;
            if (xmin == 0 && xmax == 0) { xmin = -1.0f; xmax = 1.0f; }
            sc[g] = (xmax - xmin) / 15.0f;
            zr[g] = xmin;
        }
        for (int64_t g = 0; g < ng; g++) zr[g] = vround(splat(-zr[g] / sc[g]))[0];
        /* (clamp(round(x / s) + z, 0, 15) - z) s as clamp(round(x / s), -z, 15 - z) s: r + z and its - z are
         * exact (small integers). The lower bound is a no-op: x >= xmin, division and rounding are
         * monotonic and round(-y) = -round(y), so round(x / s) >= round(xmin / s) = -z. */
        for (int64_t g = 0; g < ng; g++) {
            int64_t len = (g + 1) * 128 < n ? 128 : n - g * 128;
            vf top = splat(15.0f - zr[g]), vs = splat(sc[g]);
            /* the upper bound too is a no-op where round(xmax / s) <= 15 - z (x <= xmax, by the same
             * monotonicity); it binds only when both xmax / s and -xmin / s round up (ties, 7.5 + 7.5) */
            if (vround(splat(gmax[g]) / vs)[0] <= 15.0f - zr[g]) {
#define Q(x8) (vround((x8) / vs) * vs)
                ROWLOOP(g * 128, g * 128 + len, Q)
#undef Q
            } else {
#define Q(x8) (vupper(vround((x8) / vs), top) * vs)
                ROWLOOP(g * 128, g * 128 + len, Q)
#undef Q
            }
        }
        break;
    }
    case S_NF4: {  /* n % 64 == 0 (the caller checks): blocks of 64 within the row */
        int64_t ng = n / 64;
        for (int64_t g = 0; g < ng; g++) grp[g] = absmax(x + g * 64, 64);
        for (int64_t g = 0; g < ng; g++) {
            float am = grp[g];
            vf d = splat(am == 0 ? 1.0f : am), vam = splat(am);
#define Q(x8) (nf4_point((x8) / d) * vam)
            ROWLOOP(g * 64, g * 64 + 64, Q)
#undef Q
        }
        break;
    }
    case S_MXFP4: {
        int64_t ng = (n + 31) / 32;
        for (int64_t g = 0; g < ng; g++) {
            float am = absmax(x + g * 32, (g + 1) * 32 < n ? 32 : n - g * 32);
            int32_t e = am == 0 ? -127 : ((bits_of(am) >> 23) & 0xff) - 127;  /* torchao's FLOOR: exponent bits */
            e -= 2;
            if (e < -126) e = -126;  /* exp2(clamp(e, -127, 128)).clamp(min=tiny) */
            grp[g] = f_of((e + 127) << 23);
        }
        for (int64_t g = 0; g < ng; g++) {
            vf vs = splat(grp[g]);
#define Q(x8) (e2m1((x8) / vs) * vs)
            ROWLOOP(g * 32, (g + 1) * 32 < n ? (g + 1) * 32 : n, Q)
#undef Q
        }
        break;
    }
    case S_NVFP4: {
        float ts = amax_t > 0 ? amax_t / 2688.0f : 1.0f, inv = 1.0f / ts;
        int64_t ng = n / 16;
        float *s8 = grp, *fac = grp + ng;
        for (int64_t g = 0; g < ng; g++) {
            float r = (absmax(x + g * 16, 16) / 6.0f) / ts;
            r = r > 0.015625f ? r : 0.015625f;  /* clamp(min=tiny(e4m3), max=448) */
            r = r < 448.0f ? r : 448.0f;
            s8[g] = e4m3_scalar(r);
            fac[g] = inv / s8[g];
            if (ts == 0) { s8[g] = 0; fac[g] = 0; }
        }
        vf vt = splat(ts);
        for (int64_t g = 0; g < ng; g++) {
            vf vfac = splat(fac[g]), vs8 = splat(s8[g]);
#define Q(x8) (e2m1((x8) * vfac) * vs8 * vt)
            ROWLOOP(g * 16, g * 16 + 16, Q)
#undef Q
        }
        break;
    }
    }
    return hsum(acc0 + acc1);
}

/* bfloat16 / float16 / float32 row -> float32 */
static void to_f32(const void *src, int dtype, int64_t n, float *dst) {
    if (dtype == DT_F32) { memcpy(dst, src, n * 4); return; }
    if (dtype == DT_BF16) {
        const uint16_t *s = src;
        uint32_t *d = (uint32_t *)dst;
        for (int64_t j = 0; j < n; j++) d[j] = (uint32_t)s[j] << 16;
        return;
    }
#ifdef __FLT16_MAX__
    const _Float16 *s = src;
    for (int64_t j = 0; j < n; j++) dst[j] = (float)s[j];
#endif
}

/* A row's sum, max and min (two chains each), and the row as float32: bfloat16 converted while it is
 * summed (into buf), float16 converted first, float32 read in place. */
typedef uint16_t vh __attribute__((vector_size(2 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));
#define PASS1(LOAD) \
    vf xa = LOAD(0), xb = LOAD(L), sa = splat(0), sb = sa, ha = xa, hb = xb, la = xa, lb = xb; \
    for (int64_t j = 0; j < n; j += 2 * L) { \
        if (j) { xa = LOAD(j); xb = LOAD(j + L); } \
        sa += xa; sb += xb; ha = vmax(ha, xa); hb = vmax(hb, xb); la = vmin(la, xa); lb = vmin(lb, xb); \
    } \
    *s = hsum(sa + sb); *hi = hmax(vmax(ha, hb)); *lo = hmin(vmin(la, lb));

static inline vf bf16_at(const uint16_t *p, float *buf, int64_t j) {
    vh h;
    memcpy(&h, p + j, sizeof h);
    vf x = (vf)(__builtin_convertvector(h, vu) << 16);
    st(buf + j, x);
    return x;
}

/* With int4_g128: the sum as PASS1, and each 128-wide group's max and min (gmax, gmin) in chains of the
 * group's own, started from its first two vectors (as a group's separate pass started them); the row's
 * max and min are then the groups' (equal for any row without NaN, where max and min are exact and
 * associative; a row whose sum is NaN takes PASS1's chains again, so NaN goes where it went). Two chains
 * fewer per vector than PASS1 plus a pass per group: int4_g128's kernel 1.09-1.12x (alternating calls on a
 * [4, 1024, 1024] bf16 block, medians of 80, twice); folding the groups in beside PASS1's own max / min
 * chains had measured nothing (the same operations, two loads fewer). */
#define PASS1G(LOAD) \
    vf sa = splat(0), sb = sa; \
    for (int64_t g0 = 0; g0 < n; g0 += 128) { \
        int64_t g1 = g0 + 128 < n ? g0 + 128 : n; \
        vf xa = LOAD(g0), xb = LOAD(g0 + L), ga = xa, gb = xb, gc = xa, gd = xb; \
        sa += xa; sb += xb; \
        for (int64_t j = g0 + 2 * L; j < g1; j += 2 * L) { \
            xa = LOAD(j); xb = LOAD(j + L); \
            sa += xa; sb += xb; ga = vmax(ga, xa); gb = vmax(gb, xb); gc = vmin(gc, xa); gd = vmin(gd, xb); \
        } \
        gmax[g0 / 128] = hmax(vmax(ga, gb)); gmin[g0 / 128] = hmin(vmin(gc, gd)); \
    } \
    *s = hsum(sa + sb);

static void groups_to_row(const float *x, int64_t n, const float *gmax, const float *gmin, float s, float *hi, float *lo) {
    if (s != s) {  /* NaN: PASS1's max and min */
        vf ha = ld(x), hb = ld(x + L), la = ha, lb = hb;
        for (int64_t j = 0; j < n; j += 2 * L) {
            vf xa = ld(x + j), xb = ld(x + j + L);
            ha = vmax(ha, xa); hb = vmax(hb, xb); la = vmin(la, xa); lb = vmin(lb, xb);
        }
        *hi = hmax(vmax(ha, hb)); *lo = hmin(vmin(la, lb));
        return;
    }
    float h = gmax[0], l = gmin[0];
    for (int64_t g = 1; g < (n + 127) / 128; g++) { h = gmax[g] > h ? gmax[g] : h; l = gmin[g] < l ? gmin[g] : l; }
    *hi = h; *lo = l;
}

static const float *first_pass(const void *src, int dtype, int64_t n, float *buf, float *s, float *hi, float *lo,
                               float *gmax, float *gmin) {
    const float *x = src;
    if (dtype == DT_BF16) {
        const uint16_t *p = src;
#define LOAD(j) bf16_at(p, buf, (j))
        if (!gmax) { PASS1(LOAD) return buf; }
        PASS1G(LOAD)
#undef LOAD
        x = buf;
    } else {
        if (dtype != DT_F32) { to_f32(src, dtype, n, buf); x = buf; }
#define LOAD(j) ld(x + (j))
        if (!gmax) { PASS1(LOAD) return x; }
        PASS1G(LOAD)
#undef LOAD
    }
    groups_to_row(x, n, gmax, gmin, *s, hi, lo);
    return x;
}

int moetool_has_f16(void) {
#ifdef __FLT16_MAX__
    return 1;
#else
    return 0;
#endif
}

/* kernels.combine_moments for one matrix: its rows' moments (s, hi, lo, s1..s4 at m[i * R + r]) moved
 * to the matrix mean in float64; into st[0..3] (stride S): ||W||^2, kurtosis, max|W| / std, max|W|. */
static void combine(const float *m7, int64_t R, int64_t rows, int64_t n, double *st, int64_t S) {
    double N = (double)n * rows, sum = 0, c2 = 0, c4 = 0, norm2 = 0;
    float him = m7[R], lom = m7[2 * R];
    for (int pass = 0; pass < 2; pass++) {
        double mu = sum / N;
        for (int64_t r = 0; r < rows; r++) {
            float s = m7[r], hi = m7[R + r], lo = m7[2 * R + r], mf = s / (float)n;
            float spread = hi - mf > mf - lo ? hi - mf : mf - lo;
            int32_t k = 0;
            if (spread > 0) { k = -1 - ((bits_of(spread) >> 23) - 127); k = k < -126 ? -126 : k > 126 ? 126 : k; }
            double inv = ldexp(1.0, -k), m = mf;
            double t1 = m7[3 * R + r] * inv, t2 = m7[4 * R + r] * inv * inv, t3 = m7[5 * R + r] * inv * inv * inv,
                   t4 = m7[6 * R + r] * (inv * inv) * (inv * inv);
            if (pass == 0) { sum += n * m + t1; him = hi > him ? hi : him; lom = lo < lom ? lo : lom; continue; }
            double d = m - mu;
            c2 += t2 + 2 * d * t1 + n * d * d;
            c4 += t4 + 4 * d * t3 + 6 * d * d * t2 + 4 * d * d * d * t1 + n * d * d * d * d;
            norm2 += t2 + 2 * m * t1 + n * m * m;
        }
    }
    double absmax = him > -lom ? him : -lom, sd = sqrt(c2 / N > 0 ? c2 / N : 0);
    int ok = c2 > 0 && him > lom;
    st[0] = norm2;
    st[S] = ok ? N * c4 / (c2 * c2) : NAN;
    st[2 * S] = ok ? absmax / sd : NAN;
    st[3 * S] = absmax;
}

/* Work comes in chunks: rows [r0, r0 + chunk) of one matrix (the last chunk of a matrix may be
 * shorter), numbered matrix by matrix, chunks_per_matrix = ceil(out / chunk). The threads of a call
 * take the next chunk from a shared counter (`next`, atomic; NULL: one thread, every chunk in turn), so
 * a thread the machine takes away for a while (the report's read-ahead thread on a busy core) holds
 * up one chunk, not a fixed share of the block. */
static int64_t take(int64_t *next, int64_t *mine) {
    if (!next) return (*mine)++;
    return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
}

/* nvfp4's first phase: part[c] = max |W| over chunk c's rows (a matrix's tensor scale is the max over
 * its chunks, read by moetool_score once every chunk is done). */
int moetool_amax(const void *w, int dtype, int64_t B, int64_t out, int64_t n, int64_t chunk, int64_t *next,
                 float *part) {
    size_t isz = dtype == DT_F32 ? 4 : 2;
    int64_t cpm = (out + chunk - 1) / chunk, mine = 0;
    float *tmp = aligned_alloc(64, ((n * 4 + 63) / 64) * 64);
    if (!tmp) return -1;
    for (int64_t c; (c = take(next, &mine)) < B * cpm;) {
        int64_t b = c / cpm, r0 = (c % cpm) * chunk, r1 = r0 + chunk < out ? r0 + chunk : out;
        const char *mat = (const char *)w + (size_t)b * out * n * isz;
        float amax = 0;
        for (int64_t r = r0; r < r1; r++) {
            to_f32(mat + (size_t)r * n * isz, dtype, n, tmp);
            float a = absmax(tmp, n);
            amax = a > amax ? a : amax;
        }
        part[c] = amax;
    }
    free(tmp);
    return 0;
}

/* W [B, out, n]: `moments` (NULL or [7][R]: s, hi, lo, s1, s2, s3, s4), `errs` ([nschemes][R]), R = B * out
 * rows, `diff` (NULL or [B, out, n], only with one scheme), `scales` (NULL or [B]: the error scale per
 * matrix), `part` (with nvfp4: moetool_amax's chunk maxima, the same chunks). `chunk`: any number of
 * rows; with fp8_block a multiple of 128 (its bands whole) or `out`. Returns 0, or -1 when memory for a
 * row could not be allocated (the chunks this thread took are then left unscored). */
int moetool_score(const void *w, int dtype, int64_t B, int64_t out, int64_t n, const float *scales,
                  int nschemes, const int32_t *schemes, float *moments, float *errs, float *diff,
                  int64_t chunk, int64_t *next, const float *part) {
    size_t isz = dtype == DT_F32 ? 4 : 2;
    int need_block = 0, need_amax = 0, need_groups = 0;
    for (int i = 0; i < nschemes; i++) {
        need_block |= schemes[i] == S_FP8_BLOCK; need_amax |= schemes[i] == S_NVFP4; need_groups |= schemes[i] == S_INT4_G128;
    }
    int64_t nblk = (n + 127) / 128, cpm = (out + chunk - 1) / chunk, mine = 0, R = B * out;
    float *xbuf = aligned_alloc(64, ((n * 4 + 63) / 64) * 64);
    float *blk = need_block ? malloc(nblk * sizeof(float)) : NULL;
    float *tmp = need_block ? aligned_alloc(64, ((n * 4 + 63) / 64) * 64) : NULL;
    float *grp = malloc((n / 8 + 2) * sizeof(float));
    float *gmm = need_groups ? malloc(2 * nblk * sizeof(float)) : NULL;
    if (!xbuf || !grp || (need_block && (!blk || !tmp)) || (need_groups && !gmm)) {
        free(xbuf); free(blk); free(tmp); free(grp); free(gmm);
        return -1;
    }
    for (int64_t c; (c = take(next, &mine)) < B * cpm;) {
        int64_t b = c / cpm, r0 = (c % cpm) * chunk, r1 = r0 + chunk < out ? r0 + chunk : out;
        const char *mat = (const char *)w + (size_t)b * out * n * isz;
        float amax_t = 0;
        if (need_amax)  /* nvfp4's tensor scale: the matrix's max |W| */
            for (int64_t k = 0; k < cpm; k++) amax_t = part[b * cpm + k] > amax_t ? part[b * cpm + k] : amax_t;
        float scale = scales ? scales[b] : 1.0f;
        for (int64_t r = r0; r < r1; r++) {
            if (need_block && r % 128 == 0) {  /* fp8_block: the band's 128 x 128 block scales */
                int64_t rend = r + 128 < out ? r + 128 : out;
                for (int64_t c2 = 0; c2 < nblk; c2++) blk[c2] = 0;
                for (int64_t rr = r; rr < rend; rr++) {
                    to_f32(mat + (size_t)rr * n * isz, dtype, n, tmp);
                    for (int64_t c2 = 0; c2 < nblk; c2++) {
                        int64_t len = (c2 + 1) * 128 < n ? 128 : n - c2 * 128;
                        float a = absmax(tmp + c2 * 128, len);
                        blk[c2] = a > blk[c2] ? a : blk[c2];
                    }
                }
            }
            int64_t row = b * out + r;
            float s, hi, lo;
            const float *x = first_pass(mat + (size_t)r * n * isz, dtype, n, xbuf, &s, &hi, &lo, gmm, gmm ? gmm + nblk : NULL);
            if (moments) {  /* kernels.row_moments */
                float m = s / (float)n;
                float spread = hi - m > m - lo ? hi - m : m - lo;
                int32_t k = 0;
                if (spread > 0) {
                    k = -1 - ((bits_of(spread) >> 23) - 127);
                    k = k < -126 ? -126 : k > 126 ? 126 : k;
                }
                vf sc = splat(f_of((k + 127) << 23)), msc = splat(m * f_of((k + 127) << 23));
                vf a1 = splat(0), a2 = a1, a3 = a1, a4 = a1, b1 = a1, b2 = a1, b3 = a1, b4 = a1;
                for (int64_t j = 0; j < n; j += 2 * L) {
                    vf z = ld(x + j) * sc - msc, z2 = z * z, y = ld(x + j + L) * sc - msc, y2 = y * y;
                    a1 += z; a2 += z2; a3 = FMA(z2, z, a3); a4 = FMA(z2, z2, a4);
                    b1 += y; b2 += y2; b3 = FMA(y2, y, b3); b4 = FMA(y2, y2, b4);
                }
                float vals[7] = {s, hi, lo, hsum(a1 + b1), hsum(a2 + b2), hsum(a3 + b3), hsum(a4 + b4)};
                for (int i = 0; i < 7; i++) moments[i * R + row] = vals[i];
            }
            for (int i = 0; i < nschemes; i++) {
                errs[i * R + row] = scheme_row(schemes[i], x, n, hi, lo, blk, amax_t,
                                               diff ? diff + (size_t)row * n : NULL, scale, grp, gmm);
            }
        }
    }
    free(xbuf); free(blk); free(tmp); free(grp); free(gmm);
    return 0;
}

/* after moetool_score: every matrix's statistics from its rows' moments (`stats` [4][B], see combine; NULL:
 * none) and each scheme's error summed over the matrix's rows in float64 (`sums` [nschemes][B]) */
void moetool_combine(const float *moments, const float *errs, int nschemes, int64_t B, int64_t out, int64_t n,
                     double *stats, double *sums) {
    int64_t R = B * out;
    for (int64_t b = 0; b < B; b++) {
        if (stats) combine(moments + b * out, R, out, n, stats + b, B);
        for (int i = 0; i < nschemes; i++) {
            double acc = 0;
            for (int64_t r = 0; r < out; r++) acc += errs[i * R + b * out + r];
            sums[i * B + b] = acc;
        }
    }
}
