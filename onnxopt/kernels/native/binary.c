/* Bit-packed binary convolution in C: kernels/bitconv.py's algorithm (layouts, padding correction, jobs of one
 * output row x 64 channels, register tiles of 8 pixels x 8 or 4 channels), with the same float32 arithmetic in the
 * same order, so outputs equal the numba kernels' bit for bit. Why C and not the numba kernels compiled ahead of
 * time: numba has no supported way to emit a library without Python (numba.pycc and PIXIE build CPython
 * extensions), and its parallel loops need its own thread pool, where onnxruntime's must run them.
 *
 * The register tile is the only part written per instruction set: AVX-512 with VPOPCNTQ (8 channels, one popcount
 * per 64-bit lane), AVX2 (4 channels, byte-table popcounts summed per lane every 31 steps) and portable C. The
 * variant is picked once, from the CPU, by onnxopt_select_isa (ONNXOPT_NATIVE_ISA names one, for tests).
 * Compile with -ffp-contract=off: a fused multiply-add would round differently from the reference.
 */
#include "binary.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#endif

#define BYTE_STEPS 31 /* byte counts of at most 8 a step stay below 256 */

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- geometry (kernels/geometry.py) ---- */

void resolve_axis(int64_t size, int64_t k, int64_t s, int64_t d, int64_t begin, int64_t end, int64_t auto_pad,
                  int64_t *pad_before, int64_t *out) {
    int64_t span = (k - 1) * d + 1;
    if (auto_pad == 1 || auto_pad == 2) {
        int64_t o = (size + s - 1) / s;
        int64_t total = max64((o - 1) * s + span - size, 0);
        begin = auto_pad == 1 ? total / 2 : total - total / 2;
        end = total - begin;
    } else if (auto_pad == 3) {
        begin = end = 0;
    }
    int64_t num = size + begin + end - span;
    *pad_before = begin;
    *out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1; /* floor division, as Python's // */
}

void placement(int64_t h, int64_t w, int64_t kh, int64_t kw, const int64_t *g, int64_t *pt, int64_t *pl,
               int64_t *oh, int64_t *ow) {
    resolve_axis(h, kh, g[G_SH], g[G_DH], g[G_PT], g[G_PB], g[G_AUTO], pt, oh);
    resolve_axis(w, kw, g[G_SW], g[G_DW], g[G_PL], g[G_PR], g[G_AUTO], pl, ow);
}

int64_t padded_extent(int64_t size, int64_t k, int64_t s, int64_t d, int64_t begin, int64_t out, int64_t lanes) {
    int64_t out_lanes = (out + lanes - 1) / lanes * lanes;
    return max64(begin + size, (out_lanes - 1) * s + (k - 1) * d + 1);
}

double work_bytes(int64_t n, int64_t h, int64_t w, int64_t channels, int64_t kh, int64_t kw, const int64_t *g,
                  int64_t levels) {
    int64_t pt, pl, oh, ow;
    placement(h, w, kh, kw, g, &pt, &pl, &oh, &ow);
    int64_t rows = padded_extent(h, kh, g[G_SH], g[G_DH], pt, max64(oh, 1), 1);
    int64_t cols = padded_extent(w, kw, g[G_SW], g[G_DW], pl, max64(ow, 1), TILE_PIXELS);
    return (double)levels * (double)n * (double)rows * (double)((channels + 63) / 64) * (double)cols * 8.0;
}

void pooled_shape(int64_t h, int64_t w, const int64_t *pool, int64_t *oh, int64_t *ow) {
    int64_t a = h + pool[6] + pool[8] - ((pool[0] - 1) * pool[4] + 1);
    int64_t b = w + pool[7] + pool[9] - ((pool[1] - 1) * pool[5] + 1);
    *oh = (a >= 0 ? a / pool[2] : -((-a + pool[2] - 1) / pool[2])) + 1;
    *ow = (b >= 0 ? b / pool[3] : -((-b + pool[3] - 1) / pool[3])) + 1;
}

/* ---- what the weights and the input size fix (bitconv.tap_popcounts, padding_terms) ---- */

void tap_popcounts(Weights *wt) {
    for (int64_t t = 0; t < wt->kh * wt->kw; t++)
        for (int64_t k = 0; k < wt->columns; k++) {
            int32_t count = 0;
            for (int64_t c = 0; c < wt->cw; c++) count += __builtin_popcountll(wt->wp[(t * wt->cw + c) * wt->columns + k]);
            wt->taps_pop[t * wt->columns + k] = count;
        }
}

int fusable(const Weights *wt, int64_t channels) { return wt->cw == 1 && wt->kw > 1 && wt->kw * channels <= 64; }

void fuse_weights(const Weights *wt, int64_t channels, uint64_t *out) {
    for (int64_t a = 0; a < wt->kh; a++)
        for (int64_t k = 0; k < wt->columns; k++) {
            uint64_t word = 0;
            for (int64_t b = 0; b < wt->kw; b++) word |= wt->wp[(a * wt->kw + b) * wt->columns + k] << (b * channels);
            out[a * wt->columns + k] = word;
        }
}

void fuse_row(uint64_t *row, int64_t cols, int64_t kw, int64_t dw, int64_t channels) {
    for (int64_t c0 = 0; c0 < cols; c0++) { /* ascending: the words read at c0 + b*dw are not rewritten yet */
        uint64_t word = row[c0];
        for (int64_t b = 1; b < kw && c0 + b * dw < cols; b++) word |= row[c0 + b * dw] << (b * channels);
        row[c0] = word;
    }
}

/* per output position along one axis, the index of its padded-tap pattern (0: none padded) among `count`
 * distinct ones, each a byte per tap in patterns (bitconv._pattern_ids) */
static int64_t pattern_ids(int64_t k, int64_t d, int64_t stride, int64_t pad, int64_t size, int64_t out_size,
                           int64_t *ids, uint8_t *patterns) {
    int64_t count = 1;
    memset(patterns, 0, (size_t)k);
    for (int64_t p = 0; p < out_size; p++) {
        uint8_t *candidate = patterns + count * k;
        for (int64_t a = 0; a < k; a++) {
            int64_t at = p * stride - pad + a * d;
            candidate[a] = !(at >= 0 && at < size);
        }
        int64_t found = 0;
        while (found < count && memcmp(patterns + found * k, candidate, (size_t)k)) found++;
        if (found == count) count++;
        ids[p] = found;
    }
    return count;
}

static int64_t padded_count(const uint8_t *pattern, int64_t k) {
    int64_t n = 0;
    for (int64_t a = 0; a < k; a++) n += pattern[a];
    return n;
}

void free_plan(Plan *plan) {
    free(plan->offsets);
    free(plan->fused_offsets);
    free(plan->base);
    free(plan->starts);
    free(plan->border_cols);
    free(plan->border_patterns);
    free(plan->excess);
    memset(plan, 0, sizeof *plan);
}

int make_plan(const Weights *wt, const int64_t *g, int64_t h, int64_t w, Plan *plan) {
    int64_t kh = wt->kh, kw = wt->kw, cw = wt->cw, columns = wt->columns;
    memset(plan, 0, sizeof *plan);
    plan->h = h, plan->w = w;
    placement(h, w, kh, kw, g, &plan->pt, &plan->pl, &plan->oh, &plan->ow);
    int64_t oh = plan->oh, ow = plan->ow;
    plan->rows = padded_extent(h, kh, g[G_SH], g[G_DH], plan->pt, oh, 1);
    plan->cols = padded_extent(w, kw, g[G_SW], g[G_DW], plan->pl, ow, TILE_PIXELS);
    int64_t *row_ids = malloc(sizeof(int64_t) * (size_t)(oh + ow));
    uint8_t *row_masks = malloc((size_t)((oh + 1) * kh + (ow + 1) * kw));
    plan->offsets = malloc(sizeof(int64_t) * (size_t)(kh * kw * cw));
    plan->fused_offsets = malloc(sizeof(int64_t) * (size_t)kh);
    plan->base = malloc(sizeof(int32_t) * (size_t)(oh * ow));
    plan->starts = malloc(sizeof(int64_t) * (size_t)(oh + 1));
    plan->border_cols = malloc(sizeof(int64_t) * (size_t)(oh * ow));
    plan->border_patterns = malloc(sizeof(int64_t) * (size_t)(oh * ow));
    if (!row_ids || !row_masks || !plan->offsets || !plan->fused_offsets || !plan->base || !plan->starts || !plan->border_cols ||
        !plan->border_patterns) {
        free(row_ids), free(row_masks), free_plan(plan);
        return -1;
    }
    int64_t t = 0;
    for (int64_t a = 0; a < kh; a++)
        for (int64_t b = 0; b < kw; b++)
            for (int64_t c = 0; c < cw; c++) plan->offsets[t++] = (a * g[G_DH] * cw + c) * plan->cols + b * g[G_DW];
    for (int64_t a = 0; a < kh; a++) plan->fused_offsets[a] = a * g[G_DH] * cw * plan->cols;
    int64_t *col_ids = row_ids + oh;
    uint8_t *col_masks = row_masks + (oh + 1) * kh;
    int64_t n_rows = pattern_ids(kh, g[G_DH], g[G_SH], plan->pt, h, oh, row_ids, row_masks);
    int64_t n_cols = pattern_ids(kw, g[G_DW], g[G_SW], plan->pl, w, ow, col_ids, col_masks);
    plan->excess = calloc((size_t)(n_rows * n_cols * columns), sizeof(int32_t));
    if (!plan->excess) {
        free(row_ids), free(row_masks), free_plan(plan);
        return -1;
    }
    for (int64_t rp = 0; rp < n_rows; rp++)
        for (int64_t cp = 0; cp < n_cols; cp++)
            for (int64_t a = 0; a < kh; a++)
                for (int64_t b = 0; b < kw; b++)
                    if (row_masks[rp * kh + a] || col_masks[cp * kw + b]) {
                        int32_t *row = plan->excess + (rp * n_cols + cp) * columns;
                        const int32_t *taps = wt->taps_pop + (a * kw + b) * columns;
                        for (int64_t k = 0; k < columns; k++) row[k] += taps[k];
                    }
    int64_t count = 0;
    plan->starts[0] = 0;
    for (int64_t r = 0; r < oh; r++) {
        int64_t rows_valid = kh - padded_count(row_masks + row_ids[r] * kh, kh);
        for (int64_t col = 0; col < ow; col++) {
            int64_t cols_valid = kw - padded_count(col_masks + col_ids[col] * kw, kw);
            plan->base[r * ow + col] = (int32_t)(rows_valid * cols_valid * g[G_CHANNELS]);
            if (row_ids[r] || col_ids[col]) {
                plan->border_cols[count] = col;
                plan->border_patterns[count] = row_ids[r] * n_cols + col_ids[col];
                count++;
            }
        }
        plan->starts[r + 1] = count;
    }
    free(row_ids), free(row_masks);
    return 0;
}

/* ---- packing (bitconv.pack_input, chain.place_bits, multibit.pack_levels) ---- */

/* one input row's channels of one word into row[col] (zeroed): bit b = (x > 0) of channel b (NaN: 0) */
typedef void (*PackRowFn)(const float *src, int64_t plane, int64_t bits, int64_t w, uint64_t *row);

static void pack_row_generic(const float *src, int64_t plane, int64_t bits, int64_t w, uint64_t *row) {
    for (int64_t b = 0; b < bits; b++, src += plane)
        for (int64_t col = 0; col < w; col++) row[col] |= (uint64_t)(src[col] > 0) << b;
}

static PackRowFn pack_row = pack_row_generic;

void pack_rows(const float *x, int64_t c, int64_t h, int64_t w, int64_t cw, int64_t rows, int64_t cols, int64_t pt,
               int64_t pl, uint64_t *xp, int64_t first, int64_t last) {
    for (int64_t job = first; job < last; job++) {
        int64_t i = job / h, r = job % h;
        for (int64_t word = 0; word < cw; word++)
            pack_row(x + ((i * c + word * 64) * h + r) * w, h * w, min64(64, c - word * 64), w,
                     xp + ((i * rows + pt + r) * cw + word) * cols + pl);
    }
}

void place_bits_rows(const uint64_t *bits, int64_t h_in, int64_t w_in, int64_t cw, const int64_t *pool,
                     const Plan *plan, uint64_t *xp, int64_t first, int64_t last) {
    int64_t h = plan->h, w = plan->w;
    for (int64_t job = first; job < last; job++) {
        int64_t i = job / h, r = job % h;
        for (int64_t word = 0; word < cw; word++) {
            uint64_t *dst = xp + ((i * plan->rows + plan->pt + r) * cw + word) * plan->cols + plan->pl;
            for (int64_t a = 0; a < pool[0]; a++) {
                int64_t src_r = r * pool[2] - pool[6] + a * pool[4];
                if (src_r < 0 || src_r >= h_in) continue;
                const uint64_t *src = bits + ((i * h_in + src_r) * cw + word) * w_in;
                for (int64_t b = 0; b < pool[1]; b++)
                    for (int64_t col = 0; col < w; col++) {
                        int64_t src_c = col * pool[3] - pool[7] + b * pool[5];
                        if (src_c >= 0 && src_c < w_in) dst[col] |= src[src_c];
                    }
            }
        }
    }
}

static float residual_step(float v, float s) { return v > 0 ? v - s : v + s; }

double level_abs_sum(const float *x, const float *scales, int64_t n, int64_t level, int64_t sample, int64_t first,
                     int64_t last) {
    double total = 0.0;
    for (int64_t k = first; k < last; k++) {
        float v = x[k];
        for (int64_t p = 0; p < level; p++) v = residual_step(v, scales[p * n + sample]);
        total += fabsf(v);
    }
    return total;
}

double pack_levels_row(const float *x, int64_t c, int64_t h, int64_t w, const float *scales, int64_t n,
                       int64_t levels, const Plan *plan, int64_t cw, int64_t plane_words, uint64_t *xp,
                       int64_t i, int64_t r) {
    double total = 0.0;
    for (int64_t word = 0; word < cw; word++) {
        int64_t bits = min64(64, c - word * 64);
        uint64_t *row0 = xp + ((i * plan->rows + plan->pt + r) * cw + word) * plan->cols + plan->pl;
        for (int64_t b = 0; b < bits; b++) {
            const float *src = x + ((i * c + word * 64 + b) * h + r) * w;
            for (int64_t col = 0; col < w; col++) {
                float v = src[col];
                for (int64_t j = 0; j < levels - 1; j++) {
                    row0[j * plane_words + col] |= (uint64_t)(v > 0) << b;
                    v = residual_step(v, scales[j * n + i]);
                }
                row0[(levels - 1) * plane_words + col] |= (uint64_t)(v > 0) << b;
                total += fabsf(v);
            }
        }
    }
    return total;
}

/* ---- the register tiles: popcount sums of one output row for channels k_start..k_stop (bitconv.channel_tiles)
 * into sums[(k - k_start) * tiles * 8 + col]. With next_row >= 0 (rows of at most 4 pixels), lanes 4-7 hold the
 * row whose input starts next_row words on. A short last channel tile repeats channel `last`. ---- */

typedef void (*TilesFn)(const uint64_t *x, const uint64_t *w, const int64_t *offsets, int64_t steps,
                        int64_t row_origin, int64_t next_row, int64_t sw, int64_t columns, int64_t k_start,
                        int64_t k_stop, int64_t last, int64_t tiles, int32_t *sums);

static int64_t lane_at(int64_t lane, int64_t next_row, int64_t sw) {
    return next_row < 0 || lane < 4 ? lane * sw : next_row + (lane - 4) * sw;
}

#define GENERIC_CHANNELS 4
static void tiles_generic(const uint64_t *x, const uint64_t *w, const int64_t *offsets, int64_t steps,
                          int64_t row_origin, int64_t next_row, int64_t sw, int64_t columns, int64_t k_start,
                          int64_t k_stop, int64_t last, int64_t tiles, int32_t *sums) {
    int64_t stride = tiles * TILE_PIXELS, lane[TILE_PIXELS];
    for (int l = 0; l < TILE_PIXELS; l++) lane[l] = lane_at(l, next_row, sw);
    for (int64_t k0 = k_start; k0 < k_stop; k0 += GENERIC_CHANNELS) {
        int64_t ks[GENERIC_CHANNELS];
        for (int j = 0; j < GENERIC_CHANNELS; j++) ks[j] = min64(k0 + j, last);
        for (int64_t tile = 0; tile < tiles; tile++) {
            int64_t origin = row_origin + tile * TILE_PIXELS * sw;
            int64_t acc[GENERIC_CHANNELS][TILE_PIXELS] = {{0}};
            for (int64_t t = 0; t < steps; t++) {
                const uint64_t *at = x + origin + offsets[t], *wt = w + t * columns;
                for (int j = 0; j < GENERIC_CHANNELS; j++)
                    for (int l = 0; l < TILE_PIXELS; l++) acc[j][l] += __builtin_popcountll(at[lane[l]] ^ wt[ks[j]]);
            }
            for (int j = 0; j < GENERIC_CHANNELS; j++)
                for (int l = 0; l < TILE_PIXELS; l++)
                    sums[(k0 - k_start + j) * stride + tile * TILE_PIXELS + l] = (int32_t)acc[j][l];
        }
    }
}

#ifdef X86
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512vpopcntdq")))
#define AVX2 __attribute__((target("avx2,popcnt")))

/* one register tile: 8 pixels (the lanes of v) x the 8 channels whose weight words sit at wt[t * columns + at[j]] */
#define TILE_AVX512(at0, at1, at2, at3, at4, at5, at6, at7)                                                       \
    for (int64_t t = 0; t < steps; t++) {                                                                       \
        const uint64_t *in = origin + offsets[t];                                                               \
        __m512i v = contiguous ? _mm512_loadu_si512((const void *)in) : _mm512_i64gather_epi64(index, (const void *)in, 8); \
        const uint64_t *wt = w + t * columns;                                                                   \
        a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_xor_si512(v, _mm512_set1_epi64((long long)wt[at0])))); \
        a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_xor_si512(v, _mm512_set1_epi64((long long)wt[at1])))); \
        a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_xor_si512(v, _mm512_set1_epi64((long long)wt[at2])))); \
        a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_xor_si512(v, _mm512_set1_epi64((long long)wt[at3])))); \
        a4 = _mm512_add_epi64(a4, _mm512_popcnt_epi64(_mm512_xor_si512(v, _mm512_set1_epi64((long long)wt[at4])))); \
        a5 = _mm512_add_epi64(a5, _mm512_popcnt_epi64(_mm512_xor_si512(v, _mm512_set1_epi64((long long)wt[at5])))); \
        a6 = _mm512_add_epi64(a6, _mm512_popcnt_epi64(_mm512_xor_si512(v, _mm512_set1_epi64((long long)wt[at6])))); \
        a7 = _mm512_add_epi64(a7, _mm512_popcnt_epi64(_mm512_xor_si512(v, _mm512_set1_epi64((long long)wt[at7])))); \
    }

AVX512 static void tiles_avx512(const uint64_t *x, const uint64_t *w, const int64_t *offsets, int64_t steps,
                                int64_t row_origin, int64_t next_row, int64_t sw, int64_t columns, int64_t k_start,
                                int64_t k_stop, int64_t last, int64_t tiles, int32_t *sums) {
    int64_t stride = tiles * TILE_PIXELS;
    int contiguous = sw == 1 && next_row < 0;
    __m512i index = _mm512_set_epi64(lane_at(7, next_row, sw), lane_at(6, next_row, sw), lane_at(5, next_row, sw),
                                     lane_at(4, next_row, sw), lane_at(3, next_row, sw), lane_at(2, next_row, sw),
                                     lane_at(1, next_row, sw), 0);
    for (int64_t k0 = k_start; k0 < k_stop; k0 += 8) {
        int32_t *row = sums + (k0 - k_start) * stride;
        for (int64_t tile = 0; tile < tiles; tile++) {
            const uint64_t *origin = x + row_origin + tile * TILE_PIXELS * sw;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            if (k0 + 7 <= last) { /* 8 whole channels: constant offsets from one pointer (fewer registers) */
                const uint64_t *w_saved = w;
                w += k0;
                TILE_AVX512(0, 1, 2, 3, 4, 5, 6, 7)
                w = w_saved;
            } else { /* a short last tile repeats channel `last` */
                int64_t k1 = min64(k0 + 1, last), k2 = min64(k0 + 2, last), k3 = min64(k0 + 3, last);
                int64_t k4 = min64(k0 + 4, last), k5 = min64(k0 + 5, last), k6 = min64(k0 + 6, last);
                int64_t k7 = min64(k0 + 7, last);
                TILE_AVX512(k0, k1, k2, k3, k4, k5, k6, k7)
            }
            int32_t *out = row + tile * TILE_PIXELS;
            _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi64_epi32(a0));
            _mm256_storeu_si256((__m256i *)(out + stride), _mm512_cvtepi64_epi32(a1));
            _mm256_storeu_si256((__m256i *)(out + 2 * stride), _mm512_cvtepi64_epi32(a2));
            _mm256_storeu_si256((__m256i *)(out + 3 * stride), _mm512_cvtepi64_epi32(a3));
            _mm256_storeu_si256((__m256i *)(out + 4 * stride), _mm512_cvtepi64_epi32(a4));
            _mm256_storeu_si256((__m256i *)(out + 5 * stride), _mm512_cvtepi64_epi32(a5));
            _mm256_storeu_si256((__m256i *)(out + 6 * stride), _mm512_cvtepi64_epi32(a6));
            _mm256_storeu_si256((__m256i *)(out + 7 * stride), _mm512_cvtepi64_epi32(a7));
        }
    }
}

/* 8 pixels at a time: a compare mask per channel sets that channel's bit in the 8 pixels' words */
AVX512 static void pack_row_avx512(const float *src, int64_t plane, int64_t bits, int64_t w, uint64_t *row) {
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t col = 0; col < w; col += 8) {
        __mmask8 valid = (__mmask8)(w - col >= 8 ? 0xff : (1u << (w - col)) - 1);
        __m512i acc = _mm512_setzero_si512();
        const float *at = src + col;
        for (int64_t b = 0; b < bits; b++, at += plane) {
            __mmask8 positive = _mm256_cmp_ps_mask(_mm256_maskz_loadu_ps(valid, at), zero, _CMP_GT_OQ);
            acc = _mm512_mask_or_epi64(acc, positive, acc, _mm512_set1_epi64((long long)(1ULL << b)));
        }
        _mm512_mask_storeu_epi64(row + col, valid, acc);
    }
}

/* out[col] = ((float)base[col] - 2 * (float)sums[col]) * scale + shift, 16 at a time: the scalar loop's float32
 * operations in the same order (no fused multiply-add) */
AVX512 static void finish_row_avx512(const int32_t *base, const int32_t *sums, float scale, float shift, int64_t ow,
                                     float *out) {
    const __m512 two = _mm512_set1_ps(2.0f), a = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift);
    for (int64_t col = 0; col < ow; col += 16) {
        __mmask16 valid = (__mmask16)(ow - col >= 16 ? 0xffff : (1u << (ow - col)) - 1);
        __m512 total = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, base + col)),
                                     _mm512_mul_ps(two, _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, sums + col))));
        _mm512_mask_storeu_ps(out + col, valid, _mm512_add_ps(_mm512_mul_ps(total, a), b));
    }
}

/* per-byte popcounts of a 256-bit vector (nibble table lookups) */
AVX2 static inline __m256i byte_counts(__m256i v) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
}

AVX2 static inline void store_lanes(int32_t *out, __m256i lanes) { /* 4 int64 lanes (< 2^31) as int32 */
    __m256i packed = _mm256_permutevar8x32_epi32(lanes, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(packed));
}

/* 8 pixels at a time: a compare mask per channel ANDed with the channel's bit, in 32-bit halves interleaved to
 * the 8 pixels' words at the end; a last part row of fewer than 8 pixels goes the scalar way */
AVX2 static void pack_row_avx2(const float *src, int64_t plane, int64_t bits, int64_t w, uint64_t *row) {
    const __m256 zero = _mm256_setzero_ps();
    int64_t col = 0;
    for (; col + 8 <= w; col += 8) {
        __m256i lo = _mm256_setzero_si256(), hi = lo;
        const float *at = src + col;
        for (int64_t b = 0; b < bits; b++, at += plane) {
            __m256i positive = _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(at), zero, _CMP_GT_OQ));
            if (b < 32) lo = _mm256_or_si256(lo, _mm256_and_si256(positive, _mm256_set1_epi32((int)(1u << b))));
            else hi = _mm256_or_si256(hi, _mm256_and_si256(positive, _mm256_set1_epi32((int)(1u << (b - 32)))));
        }
        __m256i a = _mm256_unpacklo_epi32(lo, hi), c = _mm256_unpackhi_epi32(lo, hi); /* pixels 0 1 4 5, 2 3 6 7 */
        _mm256_storeu_si256((__m256i *)(row + col), _mm256_permute2x128_si256(a, c, 0x20));
        _mm256_storeu_si256((__m256i *)(row + col + 4), _mm256_permute2x128_si256(a, c, 0x31));
    }
    if (col < w) pack_row_generic(src + col, plane, bits, w - col, row + col);
}

AVX2 static void finish_row_avx2(const int32_t *base, const int32_t *sums, float scale, float shift, int64_t ow,
                                 float *out) {
    const __m256 two = _mm256_set1_ps(2.0f), a = _mm256_set1_ps(scale), b = _mm256_set1_ps(shift);
    int64_t col = 0;
    for (; col + 8 <= ow; col += 8) {
        __m256 total = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(base + col))),
                                     _mm256_mul_ps(two, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(sums + col)))));
        _mm256_storeu_ps(out + col, _mm256_add_ps(_mm256_mul_ps(total, a), b));
    }
    for (; col < ow; col++) {
        float total = (float)base[col] - 2.0f * (float)sums[col];
        out[col] = total * scale + shift;
    }
}

AVX2 static void tiles_avx2(const uint64_t *x, const uint64_t *w, const int64_t *offsets, int64_t steps,
                            int64_t row_origin, int64_t next_row, int64_t sw, int64_t columns, int64_t k_start,
                            int64_t k_stop, int64_t last, int64_t tiles, int32_t *sums) {
    int64_t stride = tiles * TILE_PIXELS;
    int contiguous = sw == 1 && next_row < 0;
    int64_t second = next_row < 0 ? 4 * sw : next_row; /* where lanes 4-7 start */
    __m256i index = _mm256_setr_epi64x(0, sw, 2 * sw, 3 * sw);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t k0 = k_start; k0 < k_stop; k0 += 4) {
        int64_t ks[4] = {k0, min64(k0 + 1, last), min64(k0 + 2, last), min64(k0 + 3, last)};
        int32_t *row = sums + (k0 - k_start) * stride;
        for (int64_t tile = 0; tile < tiles; tile++) {
            const uint64_t *origin = x + row_origin + tile * TILE_PIXELS * sw;
            __m256i lo[4] = {zero, zero, zero, zero}, hi[4] = {zero, zero, zero, zero};
            for (int64_t t0 = 0; t0 < steps; t0 += BYTE_STEPS) {
                __m256i blo[4] = {zero, zero, zero, zero}, bhi[4] = {zero, zero, zero, zero};
                for (int64_t t = t0; t < min64(t0 + BYTE_STEPS, steps); t++) {
                    const uint64_t *at = origin + offsets[t];
                    __m256i v0, v1;
                    if (contiguous) {
                        v0 = _mm256_loadu_si256((const __m256i *)at);
                        v1 = _mm256_loadu_si256((const __m256i *)(at + 4));
                    } else {
                        v0 = _mm256_i64gather_epi64((const long long *)at, index, 8);
                        v1 = _mm256_i64gather_epi64((const long long *)(at + second), index, 8);
                    }
                    const uint64_t *wt = w + t * columns;
                    for (int j = 0; j < 4; j++) {
                        __m256i wj = _mm256_set1_epi64x((long long)wt[ks[j]]);
                        blo[j] = _mm256_add_epi8(blo[j], byte_counts(_mm256_xor_si256(v0, wj)));
                        bhi[j] = _mm256_add_epi8(bhi[j], byte_counts(_mm256_xor_si256(v1, wj)));
                    }
                }
                for (int j = 0; j < 4; j++) {
                    lo[j] = _mm256_add_epi64(lo[j], _mm256_sad_epu8(blo[j], zero));
                    hi[j] = _mm256_add_epi64(hi[j], _mm256_sad_epu8(bhi[j], zero));
                }
            }
            for (int j = 0; j < 4; j++) {
                store_lanes(row + j * stride + tile * TILE_PIXELS, lo[j]);
                store_lanes(row + j * stride + tile * TILE_PIXELS + 4, hi[j]);
            }
        }
    }
}
#endif

typedef void (*FinishRowFn)(const int32_t *base, const int32_t *sums, float scale, float shift, int64_t ow,
                            float *out);
static void finish_row_generic(const int32_t *base, const int32_t *sums, float scale, float shift, int64_t ow,
                               float *out) {
    for (int64_t col = 0; col < ow; col++) {
        float total = (float)base[col] - 2.0f * (float)sums[col];
        out[col] = total * scale + shift;
    }
}

static TilesFn channel_tiles = tiles_generic;
static FinishRowFn finish_row = finish_row_generic;
static const char *isa_name = "generic";

int onnxopt_select_isa(const char *name) {
#ifdef X86
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512vpopcntdq");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    if (!name || !*name) name = avx512 ? "avx512" : avx2 ? "avx2" : "generic";
    if (!strcmp(name, "avx512") && avx512) {
        channel_tiles = tiles_avx512, pack_row = pack_row_avx512, finish_row = finish_row_avx512;
        isa_name = "avx512";
        return 0;
    }
    if (!strcmp(name, "avx2") && avx2) {
        channel_tiles = tiles_avx2, pack_row = pack_row_avx2, finish_row = finish_row_avx2;
        isa_name = "avx2";
        return 0;
    }
#else
    if (!name || !*name) name = "generic";
#endif
    if (!strcmp(name, "generic")) {
        channel_tiles = tiles_generic, pack_row = pack_row_generic, finish_row = finish_row_generic;
        isa_name = "generic";
        return 0;
    }
    return -1;
}

const char *onnxopt_isa(void) { return isa_name; }

/* ---- jobs: one output row (two when rows have at most 4 pixels) x 64 output channels (bitconv.conv_packed,
 * multibit.conv_levels) ---- */

static int64_t rows_per_job(int64_t ow) { return 2 * ow <= TILE_PIXELS ? 2 : 1; }

int64_t conv_jobs(const Conv *cv) {
    int64_t per_job = rows_per_job(cv->plan->ow), groups = (cv->weights->o + GROUP_CHANNELS - 1) / GROUP_CHANNELS;
    return cv->n * ((cv->plan->oh + per_job - 1) / per_job) * groups;
}

static int64_t tiles_of(const Conv *cv) { return (cv->plan->ow + TILE_PIXELS - 1) / TILE_PIXELS; }

size_t job_scratch_bytes(const Conv *cv) {
    size_t sums = sizeof(int32_t) * GROUP_CHANNELS * (size_t)(tiles_of(cv) * TILE_PIXELS);
    size_t acc = cv->scales ? sizeof(float) * 2 * GROUP_CHANNELS * (size_t)cv->plan->ow : 0; /* multi-bit rows */
    return sums + acc;
}

/* take out of one row's sums what padded taps added; weight columns first + k (bitconv.remove_padding) */
static void remove_padding(int32_t *sums, int64_t stride, int64_t k0, int64_t k1, int64_t first, int64_t r,
                           const Plan *plan, int64_t columns) {
    for (int64_t j = plan->starts[r]; j < plan->starts[r + 1]; j++) {
        int64_t col = plan->border_cols[j];
        const int32_t *excess = plan->excess + plan->border_patterns[j] * columns + first;
        for (int64_t k = k0; k < k1; k++) sums[(k - k0) * stride + col] -= excess[k];
    }
}

static void finish(const Conv *cv, int32_t *sums, int64_t stride, int64_t k0, int64_t k1, int64_t i, int64_t r) {
    const Plan *plan = cv->plan;
    int64_t ow = plan->ow, oh = plan->oh;
    remove_padding(sums, stride, k0, k1, 0, r, plan, cv->weights->columns);
    const int32_t *base = plan->base + r * ow;
    if (cv->signs) { /* bitconv._finish_signs */
        uint64_t *word = cv->signs + ((i * oh + r) * ((cv->weights->o + 63) / 64) + k0 / 64) * ow;
        memset(word, 0, sizeof(uint64_t) * (size_t)ow);
        for (int64_t k = k0; k < k1; k++) {
            float scale = cv->alpha[k], shift = cv->bias[k];
            const int32_t *s = sums + (k - k0) * stride;
            for (int64_t col = 0; col < ow; col++) {
                float total = (float)base[col] - 2.0f * (float)s[col];
                word[col] |= (uint64_t)(total * scale + shift > 0) << (k - k0);
            }
        }
        return;
    }
    for (int64_t k = k0; k < k1; k++) /* bitconv._finish_row */
        finish_row(base, sums + (k - k0) * stride, cv->alpha[k], cv->bias[k], ow,
                   cv->out + ((i * cv->weights->o + k) * oh + r) * ow);
}

/* acc[k - k0, col] += s_j * alpha_i[k] * (base - 2 sum) for one weight plane (multibit._add_pair) */
static void add_pair(const Conv *cv, int32_t *sums, int64_t stride, int64_t plane, int64_t k0, int64_t k1, int64_t r,
                     float level_scale, float *acc) {
    const Plan *plan = cv->plan;
    int64_t ow = plan->ow, o = cv->weights->o;
    remove_padding(sums, stride, k0, k1, plane * o, r, plan, cv->weights->columns);
    const int32_t *base = plan->base + r * ow;
    for (int64_t k = k0; k < k1; k++) {
        float scale = cv->alpha[plane * o + k] * level_scale;
        const int32_t *s = sums + (k - k0) * stride;
        float *a = acc + (k - k0) * ow;
        for (int64_t col = 0; col < ow; col++) a[col] += ((float)base[col] - 2.0f * (float)s[col]) * scale;
    }
}

void conv_job(const Conv *cv, int64_t job, void *scratch) {
    const Weights *wt = cv->weights;
    const Plan *plan = cv->plan;
    int64_t o = wt->o, oh = plan->oh, ow = plan->ow, cw = wt->cw, cols = plan->cols, rows = plan->rows;
    int64_t groups = (o + GROUP_CHANNELS - 1) / GROUP_CHANNELS, per_job = rows_per_job(ow);
    int64_t row_jobs = (oh + per_job - 1) / per_job;
    int64_t g = job % groups, i = job / (row_jobs * groups), r = (job / groups) % row_jobs * per_job;
    int64_t r2 = per_job == 2 ? min64(r + 1, oh - 1) : r;
    int64_t g0 = g * GROUP_CHANNELS, g1 = min64(o, g0 + GROUP_CHANNELS);
    int64_t next_row = per_job == 2 ? (r2 - r) * cv->sh * cw * cols : -1;
    int64_t tiles = tiles_of(cv), stride = tiles * TILE_PIXELS;
    int64_t steps = wt->fused ? wt->kh : wt->kh * wt->kw * cw;
    const uint64_t *wp = wt->fused ? wt->fused : wt->wp;
    const int64_t *offsets = wt->fused ? plan->fused_offsets : plan->offsets;
    int32_t *sums = scratch;
    if (!cv->scales) { /* 1-bit: one plane pair */
        int64_t origin = (i * rows + r * cv->sh) * cw * cols;
        channel_tiles(cv->xp, wp, offsets, steps, origin, next_row, cv->sw, wt->columns, g0, g1, o - 1, tiles, sums);
        finish(cv, sums, stride, g0, g1, i, r);
        if (r2 != r) finish(cv, sums + TILE_PIXELS / 2, stride, g0, g1, i, r2);
        return;
    }
    float *acc = (float *)(sums + GROUP_CHANNELS * stride); /* [2][GROUP][ow]: the job's rows */
    memset(acc, 0, sizeof(float) * 2 * GROUP_CHANNELS * (size_t)ow);
    float *acc2 = acc + GROUP_CHANNELS * ow;
    int64_t plane_words = cv->n * rows * cw * cols;
    for (int64_t j = 0; j < cv->levels_x; j++) {
        int64_t origin = j * plane_words + (i * rows + r * cv->sh) * cw * cols;
        float level_scale = cv->scales[j * cv->n + i];
        for (int64_t plane = 0; plane < wt->levels_w; plane++) {
            int64_t first = plane * o;
            channel_tiles(cv->xp, wp, offsets, steps, origin, next_row, cv->sw, wt->columns, first + g0,
                          first + g1, first + o - 1, tiles, sums);
            add_pair(cv, sums, stride, plane, g0, g1, r, level_scale, acc);
            if (r2 != r) add_pair(cv, sums + TILE_PIXELS / 2, stride, plane, g0, g1, r2, level_scale, acc2);
        }
    }
    for (int64_t k = g0; k < g1; k++) {
        float *out = cv->out + ((i * o + k) * oh + r) * ow, bias = cv->bias[k];
        for (int64_t col = 0; col < ow; col++) out[col] = acc[(k - g0) * ow + col] + bias;
        if (r2 != r) {
            float *out2 = cv->out + ((i * o + k) * oh + r2) * ow;
            for (int64_t col = 0; col < ow; col++) out2[col] = acc2[(k - g0) * ow + col] + bias;
        }
    }
}
