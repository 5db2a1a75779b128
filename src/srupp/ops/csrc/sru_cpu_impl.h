/* One precision of the fused SRU recurrence; included once per `real` type and instruction set by
 * sru_cpu_isa.h.
 *
 * Work is split into items of (batch row, chunk of CHUNK features); each item runs the whole
 * time loop with its state in a local array, so items are independent and the inner loop over
 * features is contiguous in memory and vectorises. The *_items functions run a range of items;
 * the public entry points at the end share the items out over threads.
 */

struct SRUPP_FN(forward_args) {
    const real *u, *x, *v, *bias, *c0;
    const uint8_t *mask_pad;
    const real *mask_c;
    real *h, *c_all, *c_last;
    int64_t T, B, D, nchunk;
    int reverse;
};

static void SRUPP_FN(forward_items)(const void *args, int64_t begin, int64_t end) {
    const struct SRUPP_FN(forward_args) *a = args;
    const real *restrict u = a->u, *restrict x = a->x, *restrict v = a->v, *restrict bias = a->bias;
    const real *restrict c0 = a->c0, *restrict mask_c = a->mask_c;
    const uint8_t *restrict mask_pad = a->mask_pad;
    real *restrict h = a->h, *restrict c_all = a->c_all, *restrict c_last = a->c_last;
    const int64_t T = a->T, B = a->B, D = a->D, nchunk = a->nchunk;
    const int reverse = a->reverse;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t row = item / nchunk;
        const int64_t d0 = (item % nchunk) * CHUNK;
        const int64_t n = D - d0 < CHUNK ? D - d0 : CHUNK;
        real c[CHUNK], vf[CHUNK], vr[CHUNK], bf[CHUNK], br[CHUNK], m[CHUNK];
        for (int64_t j = 0; j < n; ++j) {
            c[j] = c0[row * D + d0 + j];
            vf[j] = v[d0 + j];
            vr[j] = v[D + d0 + j];
            bf[j] = bias[d0 + j];
            br[j] = bias[D + d0 + j];
            m[j] = mask_c ? mask_c[row * D + d0 + j] : (real)1;
        }
        for (int64_t s = 0; s < T; ++s) {
            const int64_t t = reverse ? T - 1 - s : s;
            const int64_t at = (t * B + row) * D + d0;
            const real *restrict uc = u + (t * B + row) * 3 * D + d0;
            const real *restrict uf = uc + D;
            const real *restrict ur = uc + 2 * D;
            const real *restrict xt = x + at;
            real *restrict ht = h + at;
            real *restrict ct = c_all ? c_all + at : 0;
            if (s + PREFETCH_STEPS < T) {
                const int64_t ta = reverse ? t - PREFETCH_STEPS : t + PREFETCH_STEPS;
                const int64_t bytes = n * (int64_t)sizeof(real);
                const real *ua = u + (ta * B + row) * 3 * D + d0;
                srupp_prefetch(ua, bytes, 0);
                srupp_prefetch(ua + D, bytes, 0);
                srupp_prefetch(ua + 2 * D, bytes, 0);
                srupp_prefetch(x + (ta * B + row) * D + d0, bytes, 0);
                srupp_prefetch(h + (ta * B + row) * D + d0, bytes, 1);
                if (c_all) srupp_prefetch(c_all + (ta * B + row) * D + d0, bytes, 1);
            }
            if (mask_pad && mask_pad[t * B + row]) {
                for (int64_t j = 0; j < n; ++j) ht[j] = 0;
                if (ct)
                    for (int64_t j = 0; j < n; ++j) ct[j] = c[j];
                continue;
            }
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const real cp = c[j];
                const real f = (real)1 / ((real)1 + EXP(-(uf[j] + vf[j] * cp + bf[j])));
                const real r = (real)1 / ((real)1 + EXP(-(ur[j] + vr[j] * cp + br[j])));
                /* the spec's form, not uc + f * (cp - uc): that loses cp when |uc| is huge */
                const real cn = f * cp + ((real)1 - f) * uc[j];
                const real xv = xt[j];
                ht[j] = xv + m[j] * r * (cn - xv);
                c[j] = cn;
            }
            if (ct)
                for (int64_t j = 0; j < n; ++j) ct[j] = c[j];
        }
        for (int64_t j = 0; j < n; ++j) c_last[row * D + d0 + j] = c[j];
    }
}

struct SRUPP_FN(backward_args) {
    const real *u, *x, *v, *bias, *c0;
    const uint8_t *mask_pad;
    const real *mask_c, *c_all, *gh, *gc_last;
    real *gu, *gx, *gvb, *gc0;
    int64_t T, B, D, nchunk;
    int reverse;
};

static void SRUPP_FN(backward_items)(const void *args, int64_t begin, int64_t end) {
    const struct SRUPP_FN(backward_args) *a = args;
    const real *restrict u = a->u, *restrict x = a->x, *restrict v = a->v, *restrict bias = a->bias;
    const real *restrict c0 = a->c0, *restrict mask_c = a->mask_c, *restrict c_all = a->c_all;
    const real *restrict gh = a->gh, *restrict gc_last = a->gc_last;
    const uint8_t *restrict mask_pad = a->mask_pad;
    real *restrict gu = a->gu, *restrict gx = a->gx, *restrict gvb = a->gvb, *restrict gc0 = a->gc0;
    const int64_t T = a->T, B = a->B, D = a->D, nchunk = a->nchunk;
    const int reverse = a->reverse;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t row = item / nchunk;
        const int64_t d0 = (item % nchunk) * CHUNK;
        const int64_t n = D - d0 < CHUNK ? D - d0 : CHUNK;
        real gc[CHUNK], vf[CHUNK], vr[CHUNK], bf[CHUNK], br[CHUNK], m[CHUNK];
        real gvf[CHUNK], gvr[CHUNK], gbf[CHUNK], gbr[CHUNK];
        for (int64_t j = 0; j < n; ++j) {
            gc[j] = gc_last[row * D + d0 + j];
            vf[j] = v[d0 + j];
            vr[j] = v[D + d0 + j];
            bf[j] = bias[d0 + j];
            br[j] = bias[D + d0 + j];
            m[j] = mask_c ? mask_c[row * D + d0 + j] : (real)1;
            gvf[j] = gvr[j] = gbf[j] = gbr[j] = 0;
        }
        /* Walk the forward order backwards; the state before step t is c_all at the step the
         * forward pass ran just before t, or c0 at the forward's first step. */
        for (int64_t s = 0; s < T; ++s) {
            const int64_t t = reverse ? s : T - 1 - s;
            const int first = s == T - 1;
            const int64_t at = (t * B + row) * D + d0;
            const int64_t uat = (t * B + row) * 3 * D + d0;
            real *restrict guc = gu + uat;
            real *restrict guf = guc + D;
            real *restrict gur = guc + 2 * D;
            real *restrict gxt = gx + at;
            if (s + PREFETCH_STEPS < T) {
                const int64_t ta = reverse ? t + PREFETCH_STEPS : t - PREFETCH_STEPS;
                const int64_t bytes = n * (int64_t)sizeof(real);
                const int64_t a = (ta * B + row) * D + d0, ua = (ta * B + row) * 3 * D + d0;
                for (int k = 0; k < 3; ++k) srupp_prefetch(u + ua + k * D, bytes, 0);
                srupp_prefetch(x + a, bytes, 0);
                srupp_prefetch(c_all + a, bytes, 0);
                srupp_prefetch(gh + a, bytes, 0);
                for (int k = 0; k < 3; ++k) srupp_prefetch(gu + ua + k * D, bytes, 1);
                srupp_prefetch(gx + a, bytes, 1);
            }
            if (mask_pad && mask_pad[t * B + row]) {
                for (int64_t j = 0; j < n; ++j) guc[j] = guf[j] = gur[j] = gxt[j] = 0;
                continue;
            }
            const real *restrict uc = u + uat;
            const real *restrict uf = uc + D;
            const real *restrict ur = uc + 2 * D;
            const real *restrict xt = x + at;
            const real *restrict ct = c_all + at;
            const real *restrict ghtt = gh + at;
            const real *restrict cprev = first ? c0 + row * D + d0 : c_all + ((reverse ? t + 1 : t - 1) * B + row) * D + d0;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const real cp = cprev[j];
                const real f = (real)1 / ((real)1 + EXP(-(uf[j] + vf[j] * cp + bf[j])));
                const real r = (real)1 / ((real)1 + EXP(-(ur[j] + vr[j] * cp + br[j])));
                const real g = ghtt[j];
                const real xv = xt[j];
                const real gct = gc[j] + g * m[j] * r;
                const real dr = g * m[j] * (ct[j] - xv) * r * ((real)1 - r);
                const real df = gct * (cp - uc[j]) * f * ((real)1 - f);
                gxt[j] = g * ((real)1 - m[j] * r);
                guc[j] = gct * ((real)1 - f);
                guf[j] = df;
                gur[j] = dr;
                gbf[j] += df;
                gbr[j] += dr;
                gvf[j] += df * cp;
                gvr[j] += dr * cp;
                gc[j] = gct * f + df * vf[j] + dr * vr[j];
            }
        }
        real *out = gvb + row * 4 * D + d0;
        for (int64_t j = 0; j < n; ++j) {
            gc0[row * D + d0 + j] = gc[j];
            out[j] = gvf[j];
            out[D + j] = gvr[j];
            out[2 * D + j] = gbf[j];
            out[3 * D + j] = gbr[j];
        }
    }
}

void SRUPP_FN(forward)(const real *u, const real *x, const real *v, const real *bias, const real *c0,
                       const uint8_t *mask_pad, const real *mask_c, real *h, real *c_all, real *c_last, int64_t T,
                       int64_t B, int64_t D, int reverse, int nthreads) {
    const int64_t nchunk = (D + CHUNK - 1) / CHUNK;
    const int64_t bytes = T * B * D * (int64_t)sizeof(real);
    hint_huge_pages(h, bytes);
    if (c_all) hint_huge_pages(c_all, bytes);
    const struct SRUPP_FN(forward_args) args = {u, x, v, bias, c0, mask_pad, mask_c, h, c_all, c_last,
                                                T, B, D, nchunk, reverse};
    srupp_parallel_for(B * nchunk, T * B * D, nthreads, SRUPP_FN(forward_items), &args);
}

/* gvb is [B, 4, D]: per batch row the partial sums of (grad v_f, grad v_r, grad b_f, grad b_r);
 * the caller sums over B, so no two threads ever write the same address. */
void SRUPP_FN(backward)(const real *u, const real *x, const real *v, const real *bias, const real *c0,
                        const uint8_t *mask_pad, const real *mask_c, const real *c_all, const real *gh,
                        const real *gc_last, real *gu, real *gx, real *gvb, real *gc0, int64_t T, int64_t B,
                        int64_t D, int reverse, int nthreads) {
    const int64_t nchunk = (D + CHUNK - 1) / CHUNK;
    const int64_t bytes = T * B * D * (int64_t)sizeof(real);
    hint_huge_pages(gu, 3 * bytes);
    hint_huge_pages(gx, bytes);
    const struct SRUPP_FN(backward_args) args = {u, x, v, bias, c0, mask_pad, mask_c, c_all, gh, gc_last,
                                                 gu, gx, gvb, gc0, T, B, D, nchunk, reverse};
    srupp_parallel_for(B * nchunk, T * B * D, nthreads, SRUPP_FN(backward_items), &args);
}
