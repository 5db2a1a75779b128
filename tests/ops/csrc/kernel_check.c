/* Every kernel variant this CPU runs (the recurrence forward and backward in float32, and in bfloat16 and float16
 * storage; the 16-bit conversions; the one-token decoding step) against a straightforward scalar loop with libm's
 * exp, in C alone: for
 * architectures where torch is not at hand (built with a cross compiler, run under qemu-user), and for CPUs
 * this machine is not (qemu-user emulating an x86-64 without AVX-512, or without AVX).
 * Usage: kernel_check [EXPECTED_MASK]: also fails unless srupp_isa_supported() equals EXPECTED_MASK.
 * Prints the largest differences and exits non-zero if one is above tolerance. */
#define SRUPP_STREAM_MIN_BYTES 0 /* the non-temporal store path too, at these small sizes */
#include "../../../src/srupp/ops/csrc/sru_cpu.c"

#include <stdio.h>
#include <stdlib.h>

#define T 13
#define B 3
#define D 149 /* rows of several PREFETCH_LANES chunks and a ragged tail, at odd alignments */

static double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

/* Forward then backward of one run, in double, with the spec's equations written out. */
static void reference(const float *u, const float *x, const float *v, const float *bias, const float *c0,
                      const uint8_t *pad, const float *mask_c, const float *gh, const float *gc_last, double *h,
                      double *c_last, double *gu, double *gx, double *gv, double *gb, double *gc0, double *gv_mag,
                      double *gb_mag) {
    static double c_all[T + 1][B][D];
    for (int b = 0; b < B; ++b)
        for (int d = 0; d < D; ++d) c_all[0][b][d] = c0[b * D + d];
    for (int t = 0; t < T; ++t)
        for (int b = 0; b < B; ++b)
            for (int d = 0; d < D; ++d) {
                const double cp = c_all[t][b][d];
                const float *ut = u + (t * B + b) * 3 * D;
                const double f = sigmoid(ut[D + d] + v[d] * cp + bias[d]);
                const double r = sigmoid(ut[2 * D + d] + v[D + d] * cp + bias[D + d]);
                const double c = f * cp + (1 - f) * ut[d];
                const double xv = x[(t * B + b) * D + d];
                const int p = pad[t * B + b];
                c_all[t + 1][b][d] = p ? cp : c;
                h[(t * B + b) * D + d] = p ? 0 : xv + mask_c[b * D + d] * r * (c - xv);
            }
    for (int i = 0; i < 2 * D; ++i) gv[i] = gb[i] = gv_mag[i] = gb_mag[i] = 0;
    for (int b = 0; b < B; ++b)
        for (int d = 0; d < D; ++d) {
            c_last[b * D + d] = c_all[T][b][d];
            double gc = gc_last[b * D + d];
            for (int t = T - 1; t >= 0; --t) {
                const int at = (t * B + b) * D + d, ut = (t * B + b) * 3 * D + d;
                if (pad[t * B + b]) {
                    gu[ut] = gu[ut + D] = gu[ut + 2 * D] = gx[at] = 0;
                    continue;
                }
                const double cp = c_all[t][b][d], c = c_all[t + 1][b][d], m = mask_c[b * D + d];
                const double f = sigmoid(u[ut + D] + v[d] * cp + bias[d]);
                const double r = sigmoid(u[ut + 2 * D] + v[D + d] * cp + bias[D + d]);
                const double g = gh[at], total = gc + g * m * r;
                const double dr = g * m * (c - x[at]) * r * (1 - r), df = total * (cp - u[ut]) * f * (1 - f);
                gx[at] = g * (1 - m * r);
                gu[ut] = total * (1 - f);
                gu[ut + D] = df;
                gu[ut + 2 * D] = dr;
                gv[d] += df * cp;
                gv[D + d] += dr * cp;
                gb[d] += df;
                gb[D + d] += dr;
                gv_mag[d] += fabs(df * cp), gv_mag[D + d] += fabs(dr * cp);
                gb_mag[d] += fabs(df), gb_mag[D + d] += fabs(dr);
                gc = total * f + df * v[d] + dr * v[D + d];
            }
            gc0[b * D + d] = gc;
        }
}

static float uniform(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)(*state >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
}

/* The largest error relative to `scale` (|want| where null; for sums, the sum of their terms' magnitudes, which
 * bounds a sum's rounding error whatever cancels in it). */
static double worst(const char *name, const float *got, const double *want, const double *scale, int n) {
    double err = 0;
    for (int i = 0; i < n; ++i) {
        const double e = fabs(got[i] - want[i]) / (1e-3 + fabs(scale ? scale[i] : want[i]));
        err = e > err ? e : err;
    }
    printf("%-7s max scaled error %.3g\n", name, err);
    return err;
}

/* The one-token layer step (sru_token_impl.h) in double, its equations written out: B2 rows, input TI, Q of TP
 * in TH heads, hidden TD (TI != TD: a fourth block of U is the skip), an input layer norm, TL cached positions
 * of which the mask hides some. */
#define B2 2
#define TI 6
#define TP 4
#define TH 2
#define TD 5
#define TL 5
#define TU (4 * TD)

static void layer_norm_ref(double *out, const double *in, int n, const float *w, const float *b, double eps) {
    double mean = 0, var = 0;
    for (int i = 0; i < n; ++i) mean += in[i];
    mean /= n;
    for (int i = 0; i < n; ++i) var += (in[i] - mean) * (in[i] - mean);
    for (int i = 0; i < n; ++i) out[i] = (in[i] - mean) / sqrt(var / n + eps) * w[i] + b[i];
}

typedef int (*token_fn)(const struct srupp_token_run *, const void *, const float *, float *, float *, int64_t,
                        int64_t);

/* Through srupp_token_run_f32_<isa> with one layer, whose padding marks have a row stride wider than the window
 * and the new position marked as padding beforehand (the run must clear it). */
static double check_token_step(token_fn step) {
    static float nw_in[TI], nb_in[TI], wq[TI * TP], wkv[TP * 2 * TP], alpha = 0.7f, nw[TP], nb[TP], wo[TP * TU];
    static float ub[TU], gv[2 * TD], x[B2 * TI], c0[B2 * TD], c1[B2 * TD], h[B2 * TD];
    static float window[B2][2][TH][TL][TP / TH];
    static uint8_t mask[B2 * TL], pad[B2 * (TL + 3)];
    unsigned s = 7;
    for (int i = 0; i < TI; ++i) nw_in[i] = 1 + uniform(&s) / 4, nb_in[i] = uniform(&s) / 4;
    for (int i = 0; i < TI * TP; ++i) wq[i] = uniform(&s);
    for (int i = 0; i < TP * 2 * TP; ++i) wkv[i] = uniform(&s);
    for (int i = 0; i < TP; ++i) nw[i] = 1 + uniform(&s) / 4, nb[i] = uniform(&s) / 4;
    for (int i = 0; i < TP * TU; ++i) wo[i] = uniform(&s);
    for (int i = 0; i < TU; ++i) ub[i] = uniform(&s);
    for (int i = 0; i < 2 * TD; ++i) gv[i] = uniform(&s);
    for (int i = 0; i < B2 * TI; ++i) x[i] = uniform(&s);
    for (int i = 0; i < B2 * TD; ++i) c0[i] = uniform(&s);
    for (int b = 0; b < B2; ++b)
        for (int k = 0; k < 2; ++k)
            for (int hd = 0; hd < TH; ++hd)
                for (int p = 0; p < TL; ++p)
                    for (int e = 0; e < TP / TH; ++e) window[b][k][hd][p][e] = uniform(&s);
    for (int i = 0; i < B2 * TL; ++i) mask[i] = i % TL == TL - 1 || uniform(&s) > -0.3f; /* the new position: in */
    for (int b = 0; b < B2; ++b)
        for (int p = 0; p < TL + 3; ++p) pad[b * (TL + 3) + p] = p >= TL - 1 || !mask[b * TL + p];
    const struct srupp_token_layer layer = {nw_in, nb_in, wq, wkv, &alpha, nw, nb, wo, ub, gv, 1e-5f, 1e-5f,
                                            TI, TP, TU, TD, TH, 1, 1};
    const int64_t hs = TP / TH, sp = hs, sh = TL * sp, skv = TH * sh, sb = 2 * skv;
    double want_h[B2 * TD], want_c[B2 * TD], want_kv[B2 * 2 * TP];
    for (int b = 0; b < B2; ++b) {
        double xin[TI], xn[TI], q[TP], kv[2 * TP], mixed[TP], y[TP], u[TU];
        for (int i = 0; i < TI; ++i) xin[i] = x[b * TI + i];
        layer_norm_ref(xn, xin, TI, nw_in, nb_in, 1e-5);
        for (int j = 0; j < TP; ++j) {
            q[j] = 0;
            for (int i = 0; i < TI; ++i) q[j] += xn[i] * wq[i * TP + j];
        }
        for (int j = 0; j < 2 * TP; ++j) {
            kv[j] = 0;
            for (int i = 0; i < TP; ++i) kv[j] += q[i] * wkv[i * 2 * TP + j];
            want_kv[b * 2 * TP + j] = kv[j];
        }
        for (int hd = 0; hd < TH; ++hd) {
            double score[TL], top = -INFINITY, total = 0;
            for (int p = 0; p < TL; ++p) {
                double dot = 0;
                for (int e = 0; e < hs; ++e) {
                    const double k = p == TL - 1 ? kv[hd * hs + e] : window[b][0][hd][p][e];
                    dot += q[hd * hs + e] * k;
                }
                score[p] = mask[b * TL + p] ? dot / sqrt((double)hs) : -INFINITY;
                top = fmax(top, score[p]);
            }
            for (int p = 0; p < TL; ++p) total += score[p] = exp(score[p] - top);
            for (int e = 0; e < hs; ++e) {
                double a = 0;
                for (int p = 0; p < TL; ++p) {
                    if (!mask[b * TL + p]) continue;
                    a += score[p] / total * (p == TL - 1 ? kv[TP + hd * hs + e] : window[b][1][hd][p][e]);
                }
                mixed[hd * hs + e] = q[hd * hs + e] + alpha * a;
            }
        }
        layer_norm_ref(y, mixed, TP, nw, nb, 1e-5);
        for (int j = 0; j < TU; ++j) {
            u[j] = ub[j];
            for (int i = 0; i < TP; ++i) u[j] += y[i] * wo[i * TU + j];
        }
        for (int j = 0; j < TD; ++j) {
            const double cp = c0[b * TD + j];
            const double f = sigmoid(u[TD + j] + gv[j] * cp), r = sigmoid(u[2 * TD + j] + gv[TD + j] * cp);
            want_c[b * TD + j] = f * cp + (1 - f) * u[j];
            want_h[b * TD + j] = r * want_c[b * TD + j] + (1 - r) * u[3 * TD + j];
        }
    }
    float *const windows[1] = {&window[0][0][0][0][0]};
    const int64_t strides[4] = {sb, skv, sh, sp};
    const struct srupp_token_run run = {&layer, windows, strides, pad, TL + 3, 1, B2, TD, 0, 0, 0, 0, 0};
    if (step(&run, x, c0, c1, h, 0, TL - 1) != 0) return 1e9;
    double err = fmax(worst("token h", h, want_h, 0, B2 * TD), worst("token c", c1, want_c, 0, B2 * TD));
    float got_kv[B2 * 2 * TP]; /* the new key and value, read back from the last position of the window */
    for (int b = 0; b < B2; ++b)
        for (int k = 0; k < 2; ++k)
            for (int hd = 0; hd < TH; ++hd)
                for (int e = 0; e < hs; ++e) got_kv[b * 2 * TP + k * TP + hd * hs + e] = window[b][k][hd][TL - 1][e];
    return fmax(err, worst("token kv", got_kv, want_kv, 0, B2 * 2 * TP));
}

typedef void (*forward_fn)(const float *, const float *, const float *, const float *, const float *,
                           const uint8_t *, const float *, float *, float *, float *, int64_t, int64_t, int64_t, int,
                           int);
typedef void (*backward_fn)(const float *, const float *, const float *, const float *, const float *,
                            const uint8_t *, const float *, const float *, const float *, const float *, float *,
                            float *, float *, float *, int64_t, int64_t, int64_t, int, int);

typedef void (*forward16_fn)(const uint16_t *, const uint16_t *, const float *, const float *, const float *,
                             const uint8_t *, const float *, uint16_t *, float *, float *, int64_t, int64_t, int64_t,
                             int, int);
typedef void (*backward16_fn)(const uint16_t *, const uint16_t *, const float *, const float *, const float *,
                              const uint8_t *, const float *, const float *, const uint16_t *, const float *,
                              uint16_t *, uint16_t *, float *, float *, int64_t, int64_t, int64_t, int, int);
typedef float (*load_fn)(uint16_t);
typedef void (*pack_fn)(uint16_t *, const float *, int64_t);

/* A 16-bit storage format: its kernels, conversions, significant bits, smallest normal exponent and largest
 * exponent. */
struct format {
    const char *name;
    forward16_fn forward;
    backward16_fn backward;
    load_fn load;
    pack_fn pack;
    int digits, emin, emax;
};

struct variant {
    const char *name;
    int bit;
    forward_fn forward;
    backward_fn backward;
    token_fn token;
    struct format half[2];
};

#define FORMATS(isa)                                                                                                \
    {{"bf16", srupp_sru_forward_bf16_##isa, srupp_sru_backward_bf16_##isa, srupp_from_bf16_##isa,                    \
      srupp_pack_bf16_##isa, 8, -126, 127},                                                                         \
     {"f16", srupp_sru_forward_f16_##isa, srupp_sru_backward_f16_##isa, srupp_from_f16_##isa, srupp_pack_f16_##isa, \
      11, -14, 15}}
#define VARIANT(isa, bit) \
    {#isa, bit, srupp_sru_forward_f32_##isa, srupp_sru_backward_f32_##isa, srupp_token_run_f32_##isa, FORMATS(isa)}

static const struct variant VARIANTS[] = {
    VARIANT(baseline, SRUPP_ISA_BASELINE),
#ifdef SRUPP_X86_VARIANTS
    VARIANT(avx2, SRUPP_ISA_AVX2),
    VARIANT(avx512, SRUPP_ISA_AVX512),
    VARIANT(avx512bf16, SRUPP_ISA_AVX512BF16),
#endif
};

/* `value` rounded to nearest even in a binary format of `digits` significant bits, exponents emin..emax and
 * subnormals, in double: the conversions' reference. */
static double round_to(double value, const struct format *fmt) {
    if (isnan(value) || isinf(value)) return value;
    int e;
    frexp(fabs(value), &e); /* |value| = m 2^e, m in [0.5, 1) */
    const int lead = e - 1 > fmt->emin ? e - 1 : fmt->emin;
    const double quantum = ldexp(1.0, lead - (fmt->digits - 1));
    const double rounded = rint(value / quantum) * quantum;
    return fabs(rounded) >= ldexp(1.0, fmt->emax + 1) ? copysign(INFINITY, value) : rounded;
}

/* Equal values of equal sign, or both NaN. */
static int same(double got, double want) {
    return isnan(want) ? isnan(got) : got == want && !signbit(got) == !signbit(want);
}

/* Every 16-bit pattern read against its value, and floats (every exponent, random mantissas, ties, the edges of
 * overflow and of the subnormals, infinities, NaN) written against round_to. Returns the number of failures. */
static int check_conversions(const struct format *fmt, int hardware_bf16) {
    int bad = 0;
    const int shift = fmt->digits - 1; /* mantissa bits */
    for (uint32_t bits = 0; bits < 65536; ++bits) {
        const int exponent = (int)(bits >> shift) & ((1 << (15 - shift)) - 1), mantissa = bits & ((1u << shift) - 1);
        const int bias = fmt->emax, top = (1 << (15 - shift)) - 1;
        double want = exponent == 0 ? ldexp(mantissa, fmt->emin - shift)
                                    : ldexp((double)(mantissa | (1u << shift)), exponent - bias - shift);
        if (exponent == top) want = mantissa ? NAN : INFINITY;
        want = bits & 0x8000u ? -want : want;
        const float got = fmt->load((uint16_t)bits);
        bad += !same(got, want);
    }
    enum { N = 4096 };
    static float values[N];
    static uint16_t packed[N];
    unsigned s = 3;
    for (int i = 0; i < N; ++i) {
        uint32_t bits = (uint32_t)(uniform(&s) * 8388608.0f) * 512u ^ (uint32_t)(uniform(&s) * 8388608.0f);
        memcpy(&values[i], &bits, sizeof bits);
    }
    const float edges[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 65504.0f, 65519.0f, 65520.0f, -65520.0f,
                           6.1035156e-05f, 6.1035153e-05f, 5.9604645e-08f, 2.9802322e-08f, 2.9802326e-08f,
                           1.0f + 0x1p-8f, 1.0f + 0x1p-9f, 1.0f + 3 * 0x1p-9f, 1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f,
                           3.3895314e38f, 3.4028235e38f, 1e-40f, -1e-45f};
    memcpy(values, edges, sizeof edges);
    fmt->pack(packed, values, N - 3); /* an odd count: the vector loops' tails */
    for (int i = 0; i < N - 3; ++i) {
        const double want = round_to(values[i], fmt), got = fmt->load(packed[i]);
        const int flushed = hardware_bf16 && fabsf(values[i]) < 0x1p-126f && got == 0; /* see srupp_pack_bf16_ */
        bad += !flushed && !same(got, want);
    }
    if (bad) printf("%s conversions: %d wrong\n", fmt->name, bad);
    return bad;
}

static void widen(float *out, const uint16_t *in, int n, load_fn load) {
    for (int i = 0; i < n; ++i) out[i] = load(in[i]);
}

static void sum_gvb(float *gv, float *gb, const float *gvb) {
    for (int i = 0; i < D; ++i) {
        gv[i] = gv[D + i] = gb[i] = gb[D + i] = 0;
        for (int b = 0; b < B; ++b) {
            gv[i] += gvb[b * 4 * D + i], gv[D + i] += gvb[b * 4 * D + D + i];
            gb[i] += gvb[b * 4 * D + 2 * D + i], gb[D + i] += gvb[b * 4 * D + 3 * D + i];
        }
    }
}

/* One format's kernels on u, x and grad_h rounded to it, against the reference on those rounded values: h,
 * grad_u and grad_x are rounded once more when stored (within 2^-digits of the reference, relative), the rest
 * is float32. Returns the largest error as a multiple of what each output may be off by. */
static double check_half(const struct format *fmt, const float *u, const float *x, const float *v,
                         const float *bias, const float *c0, const uint8_t *pad, const float *mask_c, const float *gh,
                         const float *gc_last) {
    static uint16_t u16[T * B * 3 * D], x16[T * B * D], gh16[T * B * D], h16[T * B * D], gu16[T * B * 3 * D];
    static uint16_t gx16[T * B * D];
    static float ur[T * B * 3 * D], xr[T * B * D], ghr[T * B * D], h[T * B * D], gu[T * B * 3 * D], gx[T * B * D];
    static float c_all[T * B * D], c_last[B * D], gvb[B * 4 * D], gc0[B * D], gv[2 * D], gb[2 * D];
    static double rh[T * B * D], rc_last[B * D], rgu[T * B * 3 * D], rgx[T * B * D], rgv[2 * D], rgb[2 * D];
    static double rgc0[B * D], rgv_mag[2 * D], rgb_mag[2 * D];
    for (int i = 0; i < T * B * 3 * D; i += 64) fmt->pack(u16 + i, u + i, T * B * 3 * D - i < 64 ? T * B * 3 * D - i : 64);
    for (int i = 0; i < T * B * D; i += 64) {
        const int n = T * B * D - i < 64 ? T * B * D - i : 64;
        fmt->pack(x16 + i, x + i, n), fmt->pack(gh16 + i, gh + i, n);
    }
    widen(ur, u16, T * B * 3 * D, fmt->load), widen(xr, x16, T * B * D, fmt->load);
    widen(ghr, gh16, T * B * D, fmt->load);
    reference(ur, xr, v, bias, c0, pad, mask_c, ghr, gc_last, rh, rc_last, rgu, rgx, rgv, rgb, rgc0, rgv_mag,
              rgb_mag);
    fmt->forward(u16, x16, v, bias, c0, pad, mask_c, h16, c_all, c_last, T, B, D, 0, 2);
    fmt->backward(u16, x16, v, bias, c0, pad, mask_c, c_all, gh16, gc_last, gu16, gx16, gvb, gc0, T, B, D, 0, 2);
    widen(h, h16, T * B * D, fmt->load), widen(gu, gu16, T * B * 3 * D, fmt->load);
    widen(gx, gx16, T * B * D, fmt->load);
    sum_gvb(gv, gb, gvb);
    printf("%s storage:\n", fmt->name);
    /* 16-bit outputs: half a unit in the last place of rounding, 2^-digits relative, plus float32's error */
    const double stored = 2.0 * ldexp(1.0, -fmt->digits) / 1e-4;
    double err = worst("h", h, rh, 0, T * B * D) / stored;
    err = fmax(err, worst("grad_u", gu, rgu, 0, T * B * 3 * D) / stored);
    err = fmax(err, worst("grad_x", gx, rgx, 0, T * B * D) / stored);
    err = fmax(err, worst("c_last", c_last, rc_last, 0, B * D));
    err = fmax(err, worst("grad_v", gv, rgv, rgv_mag, 2 * D));
    err = fmax(err, worst("grad_b", gb, rgb, rgb_mag, 2 * D));
    return fmax(err, worst("grad_c0", gc0, rgc0, 0, B * D));
}

int main(int argc, char **argv) {
    static float u[T * B * 3 * D], x[T * B * D], gh[T * B * D], v[2 * D], bias[2 * D], c0[B * D], mask_c[B * D];
    static float gc_last[B * D], h[T * B * D], c_all[T * B * D], c_last[B * D], gu[T * B * 3 * D], gx[T * B * D];
    static float gvb[B * 4 * D], gc0[B * D], gv[2 * D], gb[2 * D];
    static double rh[T * B * D], rc_last[B * D], rgu[T * B * 3 * D], rgx[T * B * D], rgv[2 * D], rgb[2 * D];
    static double rgc0[B * D], rgv_mag[2 * D], rgb_mag[2 * D];
    static uint8_t pad[T * B];
    unsigned s = 1;
    for (int i = 0; i < T * B * 3 * D; ++i) u[i] = 3 * uniform(&s);
    for (int i = 0; i < T * B * D; ++i) x[i] = uniform(&s), gh[i] = uniform(&s);
    for (int i = 0; i < 2 * D; ++i) v[i] = uniform(&s), bias[i] = uniform(&s);
    for (int i = 0; i < B * D; ++i) c0[i] = uniform(&s), gc_last[i] = uniform(&s), mask_c[i] = uniform(&s) > -0.4f;
    for (int t = 0; t < T; ++t) pad[t * B + 1] = t >= T - 4, pad[t * B + 2] = uniform(&s) > 0.3f;
    reference(u, x, v, bias, c0, pad, mask_c, gh, gc_last, rh, rc_last, rgu, rgx, rgv, rgb, rgc0, rgv_mag, rgb_mag);
    const int supported = srupp_isa_supported();
    printf("compiled variants %d, runnable %d\n", srupp_isa_compiled(), supported);
    double err = 0;
    for (size_t k = 0; k < sizeof VARIANTS / sizeof VARIANTS[0]; ++k) {
        const struct variant *var = &VARIANTS[k];
        if (!(supported & var->bit)) continue;
        printf("variant %s\n", var->name);
        var->forward(u, x, v, bias, c0, pad, mask_c, h, c_all, c_last, T, B, D, 0, 2);
        var->backward(u, x, v, bias, c0, pad, mask_c, c_all, gh, gc_last, gu, gx, gvb, gc0, T, B, D, 0, 2);
        sum_gvb(gv, gb, gvb);
        err = fmax(err, worst("h", h, rh, 0, T * B * D));
        err = fmax(err, worst("c_last", c_last, rc_last, 0, B * D));
        err = fmax(err, worst("grad_u", gu, rgu, 0, T * B * 3 * D));
        err = fmax(err, worst("grad_x", gx, rgx, 0, T * B * D));
        err = fmax(err, worst("grad_v", gv, rgv, rgv_mag, 2 * D));
        err = fmax(err, worst("grad_b", gb, rgb, rgb_mag, 2 * D));
        err = fmax(err, worst("grad_c0", gc0, rgc0, 0, B * D));
        err = fmax(err, check_token_step(var->token));
        for (int f = 0; f < 2; ++f) {
            const struct format *fmt = &var->half[f];
            if (check_conversions(fmt, f == 0 && var->bit == SRUPP_ISA_AVX512BF16)) err = 1e9;
            err = fmax(err, check_half(fmt, u, x, v, bias, c0, pad, mask_c, gh, gc_last));
        }
    }
    if (argc > 1 && atoi(argv[1]) != supported) {
        printf("expected runnable variants %s, got %d\n", argv[1], supported);
        return 2;
    }
    return err < 1e-4 ? 0 : 1;
}
