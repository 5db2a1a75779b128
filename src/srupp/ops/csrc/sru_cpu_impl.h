/* One precision of the fused SRU recurrence; included once per storage type and instruction set by
 * sru_cpu_isa.h. `elem` is the type u, x, h and their gradients are stored in, read through LOAD; `real` that of
 * the state c, the gates' parameters and every sum, and the type all arithmetic runs in. With SRUPP_HALF, elem
 * is a 16-bit format: each chunk of outputs is computed in real and written out by PACK.
 *
 * The B*D lanes (batch row, feature) are independent. They are cut into blocks of contiguous lanes, and
 * each block runs the whole time loop with its state in local arrays, so blocks are independent and are
 * shared out over threads. Within a block each time step reads and writes one contiguous span of every
 * [T, B, D] tensor (three spans of u per batch row, its rows being 3D wide): memory is walked in order,
 * which the hardware prefetchers follow, and the inner loop over a row's features is contiguous and
 * vectorises. (An earlier layout gave each thread a few features of one batch row and walked them through
 * time, a page apart per step: half the bandwidth.)
 */

/* Prefetch lanes [j0, j1) of each span, a cache line at a time (see PREFETCH_LANES). */
static inline void SRUPP_FN(fetch_lines)(const elem *const *spans, int count, int64_t j0, int64_t j1) {
    for (int64_t q = j0; q < j1; q += 64 / (int64_t)sizeof(elem))
        for (int i = 0; i < count; ++i) PREFETCH(spans[i] + q);
}

#if SRUPP_HALF
/* Round a chunk of n <= PREFETCH_LANES computed values to the storage format and write it (streamed when
 * `stream`). */
static inline void SRUPP_FN(put)(elem *dst, const real *src, int64_t n, int stream) {
    if (!stream) {
        PACK(dst, src, n);
        return;
    }
    elem packed[PREFETCH_LANES];
    PACK(packed, src, n);
    STREAM(dst, packed, n * (int64_t)sizeof(elem));
}
#endif

struct SRUPP_FN(forward_args) {
    const elem *u, *x;
    const real *v, *bias, *c0;
    const uint8_t *mask_pad;
    const real *mask_c;
    elem *h;
    real *c_all, *c_last;
    int64_t T, B, D, block;
    int reverse, stream;
};

static void SRUPP_FN(forward_items)(const void *args, int64_t begin, int64_t end) {
    const struct SRUPP_FN(forward_args) *a = args;
    const elem *restrict u = a->u, *restrict x = a->x;
    const real *restrict v = a->v, *restrict bias = a->bias;
    const real *restrict c0 = a->c0, *restrict mask_c = a->mask_c;
    const uint8_t *restrict mask_pad = a->mask_pad;
    elem *restrict h = a->h;
    real *restrict c_all = a->c_all, *restrict c_last = a->c_last;
    const int64_t T = a->T, B = a->B, D = a->D, lanes = B * D;
    const int reverse = a->reverse, stream = a->stream;
    real c[BLOCK], m[BLOCK], staged[PREFETCH_LANES]; /* a chunk of h, when streamed or packed */
    for (int64_t item = begin; item < end; ++item) {
        const int64_t lo = item * a->block;
        const int64_t hi = lo + a->block < lanes ? lo + a->block : lanes;
        for (int64_t k = lo; k < hi; ++k) {
            c[k - lo] = c0[k];
            m[k - lo] = mask_c ? mask_c[k] : (real)1;
        }
        for (int64_t s = 0; s < T; ++s) {
            const int64_t t = reverse ? T - 1 - s : s;
            for (int64_t k = lo; k < hi;) {
                const int64_t row = k / D, d0 = k - row * D;
                const int64_t n = (row + 1) * D < hi ? (row + 1) * D - k : hi - k;
                const int64_t at = (t * B + row) * D + d0;
                real *restrict cs = c + (k - lo);
                const real *restrict ms = m + (k - lo);
                elem *restrict ht = h + at;
                k += n;
                if (mask_pad && mask_pad[t * B + row]) {
                    for (int64_t j = 0; j < n; ++j) ht[j] = 0;
                    if (c_all) memcpy(c_all + at, cs, (size_t)n * sizeof(real));
                    continue;
                }
                const elem *restrict uc = u + (t * B + row) * 3 * D + d0;
                const elem *restrict uf = uc + D;
                const elem *restrict ur = uc + 2 * D;
                const elem *restrict xt = x + at;
                const real *restrict vf = v + d0, *restrict vr = v + D + d0;
                const real *restrict bf = bias + d0, *restrict br = bias + D + d0;
                /* this row's inputs at the next step (this step's again at the last), a line fetched per line
                 * computed (see PREFETCH_LANES) */
                const int64_t tn = s + 1 == T ? t : reverse ? t - 1 : t + 1;
                const elem *next_u = u + (tn * B + row) * 3 * D + d0;
                const elem *const next[] = {next_u, next_u + D, next_u + 2 * D, x + (tn * B + row) * D + d0};
                for (int64_t j0 = 0; j0 < n; j0 += PREFETCH_LANES) {
                    const int64_t j1 = j0 + PREFETCH_LANES < n ? j0 + PREFETCH_LANES : n;
                    SRUPP_FN(fetch_lines)(next, 4, j0, j1);
#if SRUPP_HALF
                    real *restrict out_h = staged;
#else
                    real *restrict out_h = stream ? staged : ht + j0;
#endif
#pragma omp simd
                    for (int64_t j = j0; j < j1; ++j) {
                        const real cp = cs[j];
                        const real f = (real)1 / ((real)1 + EXP(-(LOAD(uf[j]) + vf[j] * cp + bf[j])));
                        const real r = (real)1 / ((real)1 + EXP(-(LOAD(ur[j]) + vr[j] * cp + br[j])));
                        /* the spec's form, not uc + f * (cp - uc): that loses cp when |uc| is huge */
                        const real cn = f * cp + ((real)1 - f) * LOAD(uc[j]);
                        const real xv = LOAD(xt[j]);
                        out_h[j - j0] = xv + ms[j] * r * (cn - xv);
                        cs[j] = cn;
                    }
#if SRUPP_HALF
                    SRUPP_FN(put)(ht + j0, staged, j1 - j0, stream);
#endif
                    if (stream) {
                        const int64_t bytes = (j1 - j0) * (int64_t)sizeof(real);
#if !SRUPP_HALF
                        STREAM(ht + j0, staged, bytes);
#endif
                        if (c_all) STREAM(c_all + at + j0, cs + j0, bytes);
                    }
                }
                if (!stream && c_all) memcpy(c_all + at, cs, (size_t)n * sizeof(real));
            }
        }
        for (int64_t k = lo; k < hi; ++k) c_last[k] = c[k - lo];
    }
    if (stream) SRUPP_FENCE();
}

struct SRUPP_FN(backward_args) {
    const elem *u, *x;
    const real *v, *bias, *c0;
    const uint8_t *mask_pad;
    const real *mask_c, *c_all;
    const elem *gh;
    const real *gc_last;
    elem *gu, *gx;
    real *gvb, *gc0;
    int64_t T, B, D, block;
    int reverse, stream;
};

static void SRUPP_FN(backward_items)(const void *args, int64_t begin, int64_t end) {
    const struct SRUPP_FN(backward_args) *a = args;
    const elem *restrict u = a->u, *restrict x = a->x, *restrict gh = a->gh;
    const real *restrict v = a->v, *restrict bias = a->bias;
    const real *restrict c0 = a->c0, *restrict mask_c = a->mask_c, *restrict c_all = a->c_all;
    const real *restrict gc_last = a->gc_last;
    const uint8_t *restrict mask_pad = a->mask_pad;
    elem *restrict gu = a->gu, *restrict gx = a->gx;
    real *restrict gvb = a->gvb, *restrict gc0 = a->gc0;
    const int64_t T = a->T, B = a->B, D = a->D, lanes = B * D;
    const int reverse = a->reverse, stream = a->stream;
    real gc[BLOCK], m[BLOCK], gvf[BLOCK], gvr[BLOCK], gbf[BLOCK], gbr[BLOCK];
    real staged[4][PREFETCH_LANES]; /* a chunk of grad_u's three spans and grad_x's, when streamed or packed */
#if SRUPP_SPLIT_GATES
    real gate[2 * PREFETCH_LANES]; /* a chunk's forget and reset gates */
#endif
    for (int64_t item = begin; item < end; ++item) {
        const int64_t lo = item * a->block;
        const int64_t hi = lo + a->block < lanes ? lo + a->block : lanes;
        for (int64_t k = lo; k < hi; ++k) {
            gc[k - lo] = gc_last[k];
            m[k - lo] = mask_c ? mask_c[k] : (real)1;
            gvf[k - lo] = gvr[k - lo] = gbf[k - lo] = gbr[k - lo] = 0;
        }
        /* Walk the forward order backwards; the state before step t is c_all at the step the
         * forward pass ran just before t, or c0 at the forward's first step. */
        for (int64_t s = 0; s < T; ++s) {
            const int64_t t = reverse ? s : T - 1 - s;
            const int first = s == T - 1;
            for (int64_t k = lo; k < hi;) {
                const int64_t row = k / D, d0 = k - row * D;
                const int64_t n = (row + 1) * D < hi ? (row + 1) * D - k : hi - k;
                const int64_t at = (t * B + row) * D + d0;
                const int64_t uat = (t * B + row) * 3 * D + d0;
                const int64_t i = k - lo;
                elem *restrict guc = gu + uat;
                elem *restrict guf = guc + D;
                elem *restrict gur = guc + 2 * D;
                elem *restrict gxt = gx + at;
                k += n;
                if (mask_pad && mask_pad[t * B + row]) {
                    for (int64_t j = 0; j < n; ++j) guc[j] = guf[j] = gur[j] = gxt[j] = 0;
                    continue;
                }
                const elem *restrict uc = u + uat;
                const elem *restrict uf = uc + D;
                const elem *restrict ur = uc + 2 * D;
                const elem *restrict xt = x + at;
                const real *restrict ct = c_all + at;
                const elem *restrict ghtt = gh + at;
                const real *restrict cprev =
                    first ? c0 + row * D + d0 : c_all + ((reverse ? t + 1 : t - 1) * B + row) * D + d0;
                const real *restrict vf = v + d0, *restrict vr = v + D + d0;
                const real *restrict bf = bias + d0, *restrict br = bias + D + d0;
                real *restrict gcs = gc + i, *restrict gvfs = gvf + i, *restrict gvrs = gvr + i;
                real *restrict gbfs = gbf + i, *restrict gbrs = gbr + i;
                const real *restrict ms = m + i;
                /* this row's inputs at the next step (this step's again at the last); the next step's c_all
                 * is this step's cprev, already read */
                const int64_t tn = first ? t : reverse ? t + 1 : t - 1;
                const elem *next_u = u + (tn * B + row) * 3 * D + d0;
                const elem *const next[] = {next_u, next_u + D, next_u + 2 * D, x + (tn * B + row) * D + d0,
                                            gh + (tn * B + row) * D + d0};
                const real *next_c = s + 2 >= T ? cprev : c_all + ((reverse ? tn + 1 : tn - 1) * B + row) * D + d0;
                for (int64_t j0 = 0; j0 < n; j0 += PREFETCH_LANES) {
                    const int64_t j1 = j0 + PREFETCH_LANES < n ? j0 + PREFETCH_LANES : n;
                    SRUPP_FN(fetch_lines)(next, 5, j0, j1);
                    for (int64_t q = j0; q < j1; q += LINE_LANES) PREFETCH(next_c + q);
#if SRUPP_HALF
                    real *restrict out_c = staged[0], *restrict out_f = staged[1];
                    real *restrict out_r = staged[2], *restrict out_x = staged[3];
#else
                    real *restrict out_c = stream ? staged[0] : guc + j0;
                    real *restrict out_f = stream ? staged[1] : guf + j0;
                    real *restrict out_r = stream ? staged[2] : gur + j0;
                    real *restrict out_x = stream ? staged[3] : gxt + j0;
#endif
#if SRUPP_SPLIT_GATES
                    /* the gates first, in loops of their own (see SRUPP_SPLIT_GATES) */
                    const int64_t len = j1 - j0;
#pragma omp simd
                    for (int64_t j = j0; j < j1; ++j) {
                        const real cp = cprev[j];
                        gate[j - j0] = -(LOAD(uf[j]) + vf[j] * cp + bf[j]);
                        gate[len + j - j0] = -(LOAD(ur[j]) + vr[j] * cp + br[j]);
                    }
#pragma omp simd
                    for (int64_t q = 0; q < 2 * len; ++q) gate[q] = (real)1 / ((real)1 + EXP(gate[q]));
#endif
#pragma omp simd
                    for (int64_t j = j0; j < j1; ++j) {
                        const real cp = cprev[j];
#if SRUPP_SPLIT_GATES
                        const real f = gate[j - j0];
                        const real r = gate[len + j - j0];
#else
                        const real f = (real)1 / ((real)1 + EXP(-(LOAD(uf[j]) + vf[j] * cp + bf[j])));
                        const real r = (real)1 / ((real)1 + EXP(-(LOAD(ur[j]) + vr[j] * cp + br[j])));
#endif
                        const real g = LOAD(ghtt[j]);
                        const real xv = LOAD(xt[j]);
                        const real gct = gcs[j] + g * ms[j] * r;
                        const real dr = g * ms[j] * (ct[j] - xv) * r * ((real)1 - r);
                        const real df = gct * (cp - LOAD(uc[j])) * f * ((real)1 - f);
                        out_x[j - j0] = g * ((real)1 - ms[j] * r);
                        out_c[j - j0] = gct * ((real)1 - f);
                        out_f[j - j0] = df;
                        out_r[j - j0] = dr;
                        gbfs[j] += df;
                        gbrs[j] += dr;
                        gvfs[j] += df * cp;
                        gvrs[j] += dr * cp;
                        gcs[j] = gct * f + df * vf[j] + dr * vr[j];
                    }
#if SRUPP_HALF
                    SRUPP_FN(put)(guc + j0, staged[0], j1 - j0, stream);
                    SRUPP_FN(put)(guf + j0, staged[1], j1 - j0, stream);
                    SRUPP_FN(put)(gur + j0, staged[2], j1 - j0, stream);
                    SRUPP_FN(put)(gxt + j0, staged[3], j1 - j0, stream);
#else
                    if (stream) {
                        const int64_t bytes = (j1 - j0) * (int64_t)sizeof(real);
                        STREAM(guc + j0, staged[0], bytes);
                        STREAM(guf + j0, staged[1], bytes);
                        STREAM(gur + j0, staged[2], bytes);
                        STREAM(gxt + j0, staged[3], bytes);
                    }
#endif
                }
            }
        }
        for (int64_t k = lo; k < hi;) {
            const int64_t row = k / D, d0 = k - row * D;
            const int64_t n = (row + 1) * D < hi ? (row + 1) * D - k : hi - k;
            real *out = gvb + row * 4 * D + d0;
            for (int64_t j = 0; j < n; ++j) {
                const int64_t i = k - lo + j;
                gc0[k + j] = gc[i];
                out[j] = gvf[i];
                out[D + j] = gvr[i];
                out[2 * D + j] = gbf[i];
                out[3 * D + j] = gbr[i];
            }
            k += n;
        }
    }
    if (stream) SRUPP_FENCE();
}

/* Lanes per block: the state arrays' length, at most BLOCK, and small enough that every thread gets work. */
static int64_t SRUPP_FN(block_lanes)(int64_t lanes, int nthreads) {
    int64_t block = (lanes + nthreads - 1) / (nthreads > 0 ? nthreads : 1);
    block = (block + 63) / 64 * 64;
    return block > BLOCK ? BLOCK : block < 64 ? 64 : block;
}

void SRUPP_FN(forward)(const elem *u, const elem *x, const real *v, const real *bias, const real *c0,
                       const uint8_t *mask_pad, const real *mask_c, elem *h, real *c_all, real *c_last, int64_t T,
                       int64_t B, int64_t D, int reverse, int nthreads) {
    const int64_t block = SRUPP_FN(block_lanes)(B * D, nthreads);
    const int64_t bytes = T * B * D * (int64_t)sizeof(real);
    hint_huge_pages(h, T * B * D * (int64_t)sizeof(elem));
    if (c_all) hint_huge_pages(c_all, bytes);
    const struct SRUPP_FN(forward_args) args = {u, x, v, bias, c0, mask_pad, mask_c, h, c_all, c_last,
                                                T, B, D, block, reverse, bytes >= SRUPP_STREAM_MIN_BYTES};
    srupp_parallel_for((B * D + block - 1) / block, T * B * D, nthreads, SRUPP_FN(forward_items), &args);
}

/* gvb is [B, 4, D]: per batch row the partial sums of (grad v_f, grad v_r, grad b_f, grad b_r);
 * the caller sums over B, so no two threads ever write the same address. */
void SRUPP_FN(backward)(const elem *u, const elem *x, const real *v, const real *bias, const real *c0,
                        const uint8_t *mask_pad, const real *mask_c, const real *c_all, const elem *gh,
                        const real *gc_last, elem *gu, elem *gx, real *gvb, real *gc0, int64_t T, int64_t B,
                        int64_t D, int reverse, int nthreads) {
    const int64_t block = SRUPP_FN(block_lanes)(B * D, nthreads);
    const int64_t bytes = T * B * D * (int64_t)sizeof(elem);
    hint_huge_pages(gu, 3 * bytes);
    hint_huge_pages(gx, bytes);
    const struct SRUPP_FN(backward_args) args = {u, x, v, bias, c0, mask_pad, mask_c, c_all, gh, gc_last,
                                                 gu, gx, gvb, gc0, T, B, D, block, reverse,
                                                 bytes >= SRUPP_STREAM_MIN_BYTES};
    srupp_parallel_for((B * D + block - 1) / block, T * B * D, nthreads, SRUPP_FN(backward_items), &args);
}
