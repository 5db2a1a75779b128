/* One token through one unidirectional SRU++ layer in eval mode, float32: the decoding fast path behind
 * srupp.nn.decode.token_step, which it replaces call for call (the torch ops there are its spec, and the
 * tests hold the two to each other). Included once per instruction set by sru_cpu_isa.h.
 *
 * Per batch row: x' = LayerNorm_in(x) (if the layer has one); q = x' Wq; an attention layer writes its key and
 * value (q Wkv) into the last position of its window and mixes q + alpha * softmax(q k^T / sqrt(head size)) v
 * over the positions `mask` allows; U = LayerNorm(mixed) Wo + (0, b_f, b_r, 0); then the recurrence's one
 * step. Weights are stored [in, out], so each product is a sum of scaled rows of W, which vectorises. */

/* out[b] = in[b] W (+ bias) for the batch's rows at once, a strip of TOKEN_TILE columns at a time: each row of
 * W is read once for all of them, and the batch's strips of out stay in the L1 cache meanwhile. */
/* Fused multiply-add where the instruction set has one (a float32 GEMM does the same); else two roundings. */
#if SRUPP_STREAM_WIDTH >= 32
#define SRUPP_MADD(a, b, c) __builtin_fmaf(a, b, c)
#else
#define SRUPP_MADD(a, b, c) ((a) * (b) + (c))
#endif
#ifndef TOKEN_TILE
#define TOKEN_TILE 512
#endif
static void SRUPP_ISA_FN(srupp_rows_)(float *restrict out, const float *restrict in, const float *restrict w,
                                       int64_t rows, int64_t cols, const float *restrict bias, int64_t batch) {
    for (int64_t c0 = 0; c0 < cols; c0 += TOKEN_TILE) {
        const int64_t n = cols - c0 < TOKEN_TILE ? cols - c0 : TOKEN_TILE;
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t c = 0; c < n; ++c) out[b * cols + c0 + c] = bias ? bias[c0 + c] : 0.0f;
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) { /* four rows of W per pass over out: a quarter of the stores */
            const float *restrict w0 = w + r * cols + c0, *restrict w1 = w0 + cols;
            const float *restrict w2 = w1 + cols, *restrict w3 = w2 + cols;
            for (int64_t b = 0; b < batch; ++b) {
                const float *a = in + b * rows + r;
                const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
                float *restrict ob = out + b * cols + c0;
#pragma omp simd
                for (int64_t c = 0; c < n; ++c) {
                    const float partial = SRUPP_MADD(a1, w1[c], SRUPP_MADD(a0, w0[c], ob[c]));
                    ob[c] = SRUPP_MADD(a3, w3[c], SRUPP_MADD(a2, w2[c], partial));
                }
            }
        }
        for (; r < rows; ++r) {
            const float *restrict wr = w + r * cols + c0;
            for (int64_t b = 0; b < batch; ++b) {
                const float a = in[b * rows + r];
                float *restrict ob = out + b * cols + c0;
#pragma omp simd
                for (int64_t c = 0; c < n; ++c) ob[c] = SRUPP_MADD(a, wr[c], ob[c]);
            }
        }
    }
}

static void SRUPP_ISA_FN(srupp_layer_norm_)(float *restrict out, const float *restrict in, int64_t n,
                                             const float *restrict weight, const float *restrict bias, float eps) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < n; ++i) mean += in[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; ++i) var += ((double)in[i] - mean) * ((double)in[i] - mean);
    const float scale = (float)(1.0 / sqrt(var / (double)n + (double)eps)), shift = (float)mean;
    for (int64_t i = 0; i < n; ++i) {
        const float y = (in[i] - shift) * scale;
        out[i] = (weight ? y * weight[i] : y) + (bias ? bias[i] : 0.0f);
    }
}

/* q . k with sixteen running sums (a single one would wait on each add in turn). */
static inline float SRUPP_ISA_FN(srupp_dot_)(const float *restrict q, const float *restrict k, int64_t n) {
    float sums[16] = {0};
    int64_t e = 0;
    for (; e + 16 <= n; e += 16)
        for (int j = 0; j < 16; ++j) sums[j] = SRUPP_MADD(q[e + j], k[e + j], sums[j]);
    float dot = 0;
    for (int j = 0; j < 16; ++j) dot += sums[j];
    for (; e < n; ++e) dot += q[e] * k[e];
    return dot;
}

/* `window` holds `length` positions, the last one new; `pad`, when given, marks (nonzero) the positions of
 * row b no token may attend to, at pad[b * pad_stride + position]. Returns 0, or -1 when its scratch memory
 * cannot be had (nothing written then). */
int SRUPP_ISA_FN(srupp_token_step_f32_)(const struct srupp_token_layer *layer, const float *x, const float *c0,
                                        float *c_out, float *h_out, float *window, int64_t stride_b,
                                        int64_t stride_kv, int64_t stride_head, int64_t stride_pos, int64_t length,
                                        const uint8_t *pad, int64_t pad_stride, int64_t batch) {
    const int64_t in = layer->in, proj = layer->proj, out = layer->out, hidden = layer->hidden;
    const int64_t heads = layer->heads, head_size = proj / heads;
    const int attention = layer->wkv_t != 0;
    const size_t floats = (size_t)(batch * (in + 5 * proj + out) + (attention ? length : 0));
    float *scratch = calloc(floats, sizeof(float));
    if (!scratch) return -1;
    float *normed = scratch, *q = normed + batch * in, *kv = q + batch * proj, *mixed = kv + 2 * batch * proj;
    float *y = mixed + batch * proj, *u = y + batch * proj, *score = u + batch * out;
    const float *source = x;
    if (layer->has_in_norm) {
        for (int64_t b = 0; b < batch; ++b)
            SRUPP_ISA_FN(srupp_layer_norm_)(normed + b * in, x + b * in, in, layer->in_norm_w, layer->in_norm_b,
                                            layer->in_norm_eps);
        source = normed;
    }
    SRUPP_ISA_FN(srupp_rows_)(q, source, layer->wq_t, in, proj, 0, batch);
    if (attention) {
        const float scale = (float)(1.0 / sqrt((double)head_size)), alpha = *layer->alpha;
        SRUPP_ISA_FN(srupp_rows_)(kv, q, layer->wkv_t, proj, 2 * proj, 0, batch);
        for (int64_t b = 0; b < batch; ++b) {
            float *wb = window + b * stride_b;
            const float *kvb = kv + b * 2 * proj, *qb = q + b * proj;
            float *mb = mixed + b * proj;
            for (int64_t h = 0; h < heads; ++h) {
                float *keys = wb + h * stride_head, *values = keys + stride_kv;
                memcpy(keys + (length - 1) * stride_pos, kvb + h * head_size, (size_t)head_size * sizeof(float));
                memcpy(values + (length - 1) * stride_pos, kvb + proj + h * head_size,
                       (size_t)head_size * sizeof(float));
                const float *qh = qb + h * head_size;
                float top = -INFINITY;
                for (int64_t p = 0; p < length; ++p) {
                    if (pad && pad[b * pad_stride + p]) {
                        score[p] = -INFINITY;
                        continue;
                    }
                    score[p] = SRUPP_ISA_FN(srupp_dot_)(qh, keys + p * stride_pos, head_size) * scale;
                    top = score[p] > top ? score[p] : top;
                }
                float total = 0;
                for (int64_t p = 0; p < length; ++p) total += score[p] = expf(score[p] - top);
                float *mh = mb + h * head_size;
                for (int64_t e = 0; e < head_size; ++e) mh[e] = 0;
                for (int64_t p = 0; p < length; ++p) {
                    if (pad && pad[b * pad_stride + p]) continue;
                    const float weight = score[p] / total;
                    const float *v = values + p * stride_pos;
#pragma omp simd
                    for (int64_t e = 0; e < head_size; ++e) mh[e] += weight * v[e];
                }
            }
            for (int64_t i = 0; i < proj; ++i) mb[i] = qb[i] + alpha * mb[i];
        }
    } else {
        memcpy(mixed, q, (size_t)(batch * proj) * sizeof(float));
    }
    for (int64_t b = 0; b < batch; ++b)
        SRUPP_ISA_FN(srupp_layer_norm_)(y + b * proj, mixed + b * proj, proj, layer->norm_w, layer->norm_b,
                                        layer->norm_eps);
    SRUPP_ISA_FN(srupp_rows_)(u, y, layer->wo_t, proj, out, layer->u_bias, batch);
    const float *vf = layer->gate_v, *vr = layer->gate_v + hidden;
    for (int64_t b = 0; b < batch; ++b) {
        const float *ub = u + b * out, *cb = c0 + b * hidden, *xb = x + b * in;
        float *cn = c_out + b * hidden, *hb = h_out + b * hidden;
        const float *skip = layer->project_skip ? ub + 3 * hidden : xb;
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) {
            const float f = 1.0f / (1.0f + SRUPP_ISA_FN(srupp_expf_)(-(ub[hidden + j] + vf[j] * cb[j])));
            const float r = 1.0f / (1.0f + SRUPP_ISA_FN(srupp_expf_)(-(ub[2 * hidden + j] + vr[j] * cb[j])));
            const float c = ub[j] + f * (cb[j] - ub[j]);
            cn[j] = c;
            hb[j] = skip[j] + r * (c - skip[j]);
        }
    }
    free(scratch);
    return 0;
}

/* One token through a whole stack (SRUpp.step's one-token path): position `end` of every attention layer's
 * cache is written and positions start..end attended to; c_in and c_out are [layers, batch, hidden]. The run
 * (struct srupp_token_run) is set up by Python once per decoding run and again when its buffers grow, so a
 * token costs one call. `x` is [batch, in] floats, or [batch] int64 token ids when the run has an embedding;
 * `out` gets the last layer's output [batch, width], or the log-softmax [batch, vocab_out] of the run's output
 * layer. Returns 0; -1 when scratch memory cannot be had, -2 when a token id is out of range (nothing written
 * then). */
int SRUPP_ISA_FN(srupp_token_run_f32_)(const struct srupp_token_run *run, const void *x, const float *c_in,
                                       float *c_out, float *out, int64_t start, int64_t end) {
    const int64_t batch = run->batch, layers = run->num_layers, width = run->width;
    const int64_t in = run->layers[0].in;
    if (run->embedding) {
        const int64_t *ids = x;
        for (int64_t b = 0; b < batch; ++b)
            if (ids[b] < 0 || ids[b] >= run->vocab_in) return -2;
    }
    /* two [batch, width] buffers the layers' outputs alternate between, and the embedded input */
    float *scratch = malloc((size_t)(batch * (2 * width + in)) * sizeof(float));
    if (!scratch) return -1;
    const float *source = x;
    if (run->embedding) {
        const int64_t *ids = x;
        float *embedded = scratch + 2 * batch * width;
        for (int64_t b = 0; b < batch; ++b)
            memcpy(embedded + b * in, run->embedding + ids[b] * in, (size_t)in * sizeof(float));
        source = embedded;
    }
    if (run->pad)
        for (int64_t b = 0; b < batch; ++b) run->pad[b * run->pad_stride + end] = 0; /* the new position is real */
    const uint8_t *pad = run->pad ? run->pad + start : 0;
    int status = 0;
    for (int64_t l = 0; l < layers && status == 0; ++l) {
        const struct srupp_token_layer *layer = run->layers + l;
        const int64_t *stride = run->strides + 4 * l, hidden = layer->hidden;
        float *h = l == layers - 1 && !run->head_t ? out : scratch + (l % 2) * batch * width;
        float *window = run->windows[l] ? run->windows[l] + start * stride[3] : 0;
        status = SRUPP_ISA_FN(srupp_token_step_f32_)(layer, source, c_in + l * batch * hidden,
                                                     c_out + l * batch * hidden, h, window, stride[0], stride[1],
                                                     stride[2], stride[3], end + 1 - start, pad, run->pad_stride,
                                                     batch);
        source = h;
    }
    if (status == 0 && run->head_t) {
        const int64_t vocab = run->vocab_out;
        SRUPP_ISA_FN(srupp_rows_)(out, source, run->head_t, width, vocab, run->head_bias, batch);
        for (int64_t b = 0; b < batch; ++b) {
            float *row = out + b * vocab, top = -INFINITY, total = 0;
            for (int64_t v = 0; v < vocab; ++v) top = row[v] > top ? row[v] : top;
#pragma omp simd reduction(+ : total)
            for (int64_t v = 0; v < vocab; ++v) total += SRUPP_ISA_FN(srupp_expf_)(row[v] - top);
            const float shift = top + logf(total);
            for (int64_t v = 0; v < vocab; ++v) row[v] -= shift;
        }
    }
    free(scratch);
    return status;
}

#undef SRUPP_MADD
