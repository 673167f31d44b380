/* The lowered ops' arithmetic in C (binary.c), for the native custom-op library (runtime/native/library.c).
 * kernels/bitconv.py, kernels/multibit.py and kernels/chain.py are the reference: these functions compute the
 * same values in the same float32 order, so outputs are equal bit for bit (tests/runtime/test_native.py).
 * Nothing here allocates, raises or knows onnxruntime: the caller owns every buffer and the threads.
 */
#ifndef ONNXOPT_BINARY_H
#define ONNXOPT_BINARY_H
#include <stddef.h>
#include <stdint.h>

#define GROUP_CHANNELS 64 /* output channels per job, as kernels/bitconv.py */
#define TILE_PIXELS 8     /* output pixels per register tile (the padded width rounds up to it) */
#define MAX_LEVELS 4
#define POOL_LENGTH 10

/* conv geometry: the int64 encoding of kernels/geometry.py */
enum { G_RANK, G_SH, G_SW, G_PT, G_PL, G_PB, G_PR, G_DH, G_DW, G_AUTO, G_CHANNELS, G_LEVELS };

/* what depends on the weights only: computed once per node */
typedef struct {
    int64_t kh, kw, cw, columns; /* packed weight [kh, kw, cw, columns]; columns = weight levels x O */
    int64_t o, levels_w;
    const uint64_t *wp;
    int32_t *taps_pop; /* [kh, kw, columns]: set weight bits per tap, what a zero (padded) word adds */
    /* taps fused: when a row of taps fits one word (one channel word, kw x channels <= 64), tap b's channel bits
     * sit at bit b x channels of one word per kernel row, in the weights ([kh, columns]) and in the input (each
     * packed input row rewritten in place by fuse_row), so a kernel row costs one popcount instead of kw. The
     * fields are disjoint and unused bits zero on both sides: the popcount sums are the same integers. */
    const uint64_t *fused; /* NULL: not fused */
    int64_t channels, dw;
} Weights;

/* what depends on the input's spatial size too: computed once per (h, w) a node sees */
typedef struct {
    int64_t h, w, pt, pl, oh, ow; /* input size after any pool, padding before, output size */
    int64_t rows, cols;            /* the padded packed input's height and width (per channel word) */
    int64_t *offsets;              /* [kh * kw * cw]: each tap's and word's offset from a pixel's origin */
    int64_t *fused_offsets;        /* [kh]: each kernel row's, for fused taps */
    int32_t *base;                 /* [oh, ow]: valid taps x channels */
    int64_t *starts;               /* [oh + 1]: row r's border pixels are cols[starts[r] .. starts[r + 1]] */
    int64_t *border_cols, *border_patterns;
    int32_t *excess; /* [patterns, columns]: what a pattern's padded taps added to the popcount sums */
} Plan;

/* the per-call arrays of one convolution (one activation plane at a time for multi-bit) */
typedef struct {
    const Weights *weights;
    const Plan *plan;
    const uint64_t *xp; /* packed input [levels_x][n, rows, cw, cols] */
    const float *alpha, *bias, *scales; /* scales [levels_x, n] (multi-bit) */
    int64_t n, levels_x, sh, sw;
    float *out;        /* (n, o, oh, ow), or NULL when signs */
    uint64_t *signs;   /* (n, oh, words(o), ow), or NULL */
} Conv;

/* which register tile runs: picked once, by the CPU (or ONNXOPT_NATIVE_ISA=avx512|avx2|generic) */
const char *onnxopt_isa(void);
int onnxopt_select_isa(const char *name); /* 0: selected; -1: this CPU cannot run it */

void resolve_axis(int64_t size, int64_t k, int64_t s, int64_t d, int64_t begin, int64_t end, int64_t auto_pad,
                  int64_t *pad_before, int64_t *out);
void placement(int64_t h, int64_t w, int64_t kh, int64_t kw, const int64_t *g, int64_t *pt, int64_t *pl,
               int64_t *oh, int64_t *ow);
int64_t padded_extent(int64_t size, int64_t k, int64_t s, int64_t d, int64_t begin, int64_t out, int64_t lanes);
double work_bytes(int64_t n, int64_t h, int64_t w, int64_t channels, int64_t kh, int64_t kw, const int64_t *g,
                  int64_t levels);
void pooled_shape(int64_t h, int64_t w, const int64_t *pool, int64_t *oh, int64_t *ow);

void tap_popcounts(Weights *weights);
int fusable(const Weights *weights, int64_t channels);
void fuse_weights(const Weights *weights, int64_t channels, uint64_t *out); /* [kh, columns] */
void fuse_row(uint64_t *row, int64_t cols, int64_t kw, int64_t dw, int64_t channels); /* in place */
/* plan for an h x w input (after any pool); 0, or -1 when out of memory (plan then holds nothing to free) */
int make_plan(const Weights *weights, const int64_t *g, int64_t h, int64_t w, Plan *plan);
void free_plan(Plan *plan);

/* packing: rows [first, last) of the n*h input rows */
/* x (n, c, h, w) → sign bits at [i, pt + r, word, pl + col] of a zeroed (n, rows, cw, cols) buffer */
void pack_rows(const float *x, int64_t c, int64_t h, int64_t w, int64_t cw, int64_t rows, int64_t cols, int64_t pt,
               int64_t pl, uint64_t *xp, int64_t first, int64_t last);
void place_bits_rows(const uint64_t *bits, int64_t h_in, int64_t w_in, int64_t cw, const int64_t *pool,
                     const Plan *plan, uint64_t *xp, int64_t first, int64_t last);
/* multi-bit activations: scale of level j of sample i over elements [first, last) as a float64 partial sum */
double level_abs_sum(const float *x, const float *scales, int64_t n, int64_t level, int64_t sample, int64_t first,
                     int64_t last);
double pack_levels_row(const float *x, int64_t c, int64_t h, int64_t w, const float *scales, int64_t n,
                       int64_t levels, const Plan *plan, int64_t cw, int64_t plane_words, uint64_t *xp,
                       int64_t sample, int64_t row);

int64_t conv_jobs(const Conv *conv);
size_t job_scratch_bytes(const Conv *conv); /* per thread running jobs */
void conv_job(const Conv *conv, int64_t job, void *scratch);

#endif
