/* onnxopt's native custom-op library: the lowered ops (com.onnxopt::BitConv, MultibitBitConv, and the packed-bit
 * chain ops PackSigns, PackedBitConv, PackedBitConvSigns) for any onnxruntime >= 1.16, from Python
 * (SessionOptions.register_custom_ops_library) or C/C++/C#/Java (RegisterCustomOpsLibrary_V2). Built when the
 * package is installed; no Python, numba or compiler at serve time. The arithmetic is kernels/native/binary.c.
 *
 * - Per node, once: the packed weights' tap popcounts (from the constant inputs, at kernel creation), and per input
 *   size the padding terms (cached; at most PLANS sizes a node). A call allocates nothing once its buffers have
 *   grown to the size it needs (per thread, reused).
 * - Threads: onnxruntime's intra-op pool (KernelContext_ParallelFor), so a lowered model follows
 *   intra_op_num_threads like every other op; work too small to split runs on the calling thread.
 * - Bad inputs (a raw session has no onnxopt guard in front) make session.run fail with one of PROBLEMS.
 *
 * onnxruntime's wheel ships no C headers: the few API entries used are called by their position in the OrtApi
 * table (onnxruntime only appends to it), and the OrtCustomOp table is declared with the fields of version 16.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../kernels/native/binary.h"

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

typedef void OrtStatus;
typedef void OrtApi;

#define BASE_API_VERSION 16 /* onnxruntime 1.16: every entry below but the two newer ones */
#define NEWER_API_VERSION 17 /* constant inputs at kernel creation, ParallelFor */
#define ERROR_INVALID_ARGUMENT 2
#define ERROR_FAIL 1
#define TYPE_FLOAT 1
#define TYPE_INT64 7
#define TYPE_UINT64 13

enum { /* positions in the OrtApi table */
    CREATE_STATUS = 0, CREATE_CUSTOM_OP_DOMAIN = 26, CUSTOM_OP_DOMAIN_ADD = 27, ADD_CUSTOM_OP_DOMAIN = 28,
    GET_TENSOR_MUTABLE_DATA = 51, GET_TENSOR_ELEMENT_TYPE = 60, GET_DIMENSIONS_COUNT = 61, GET_DIMENSIONS = 62,
    GET_TENSOR_TYPE_AND_SHAPE = 65, KERNEL_CONTEXT_GET_INPUT_COUNT = 88, KERNEL_CONTEXT_GET_INPUT = 90,
    KERNEL_CONTEXT_GET_OUTPUT = 91, RELEASE_STATUS = 93, RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
    KERNEL_INFO_GET_CONSTANT_INPUT = 249, KERNEL_CONTEXT_PARALLEL_FOR = 274,
};

typedef struct { const OrtApi *(*GetApi)(uint32_t); const char *(*GetVersionString)(void); } ApiBase;
typedef OrtStatus *(*CreateStatusFn)(int, const char *);
typedef OrtStatus *(*CreateDomainFn)(const char *, void **);
typedef OrtStatus *(*DomainAddFn)(void *, const void *);
typedef OrtStatus *(*AddDomainFn)(void *, void *);
typedef OrtStatus *(*MutableDataFn)(const void *, void **);
typedef OrtStatus *(*ElementTypeFn)(const void *, int *);
typedef OrtStatus *(*DimsCountFn)(const void *, size_t *);
typedef OrtStatus *(*DimsFn)(const void *, int64_t *, size_t);
typedef OrtStatus *(*TypeAndShapeFn)(const void *, void **);
typedef OrtStatus *(*InputCountFn)(const void *, size_t *);
typedef OrtStatus *(*GetInputFn)(const void *, size_t, const void **);
typedef OrtStatus *(*GetOutputFn)(void *, size_t, const int64_t *, size_t, void **);
typedef OrtStatus *(*ConstantInputFn)(const void *, size_t, int *, const void **);
typedef OrtStatus *(*ParallelForFn)(const void *, void (*)(void *, size_t), size_t, size_t, void *);
typedef void (*ReleaseFn)(void *);

static void *const *api;   /* the OrtApi table, as function pointers */
static int newer_api;      /* the table serves NEWER_API_VERSION */
#define CALL(position, type) ((type)api[position])

/* ---- problems: what session.run reports for inputs the kernels cannot take ---- */
enum { OK, BAD_GEOMETRY, BAD_WEIGHT, BAD_ALPHA, BAD_BIAS, BAD_RANK, BAD_CHANNELS, EMPTY_INPUT, NO_OUTPUT, BAD_POOL,
       BAD_PACKED, TOO_LARGE, NO_MEMORY, BAD_TYPE, BAD_COUNT };
static const char *const PROBLEMS[] = {
    "",
    "onnxopt: geometry must be int64 values within range (11 for BitConv; 11 + activation levels 1..4 for "
    "MultibitBitConv)",
    "onnxopt: packed weight must be uint64 [kh, kw, ceil(channels/64), O or levels*O] (kh = 1 for 1-D)",
    "onnxopt: alpha must be float32 [O] (BitConv) or [weight levels 1..4, O] (MultibitBitConv)",
    "onnxopt: bias must be float32 [O]",
    "onnxopt: input rank does not match the layer (4 for 2-D, 3 for 1-D)",
    "onnxopt: input channels do not match the layer",
    "onnxopt: input has an empty spatial dim",
    "onnxopt: input is smaller than the kernel's span: no output",
    "onnxopt: pool must be 10 int64 values within range (kernel, strides, dilations, pads)",
    "onnxopt: packed input must be uint64 [N, H, words(channels), W] of a 2-D layer",
    "onnxopt: the kernel's padded input for this input and geometry would exceed 2 GiB (pads or strides far beyond "
    "the input)",
    "onnxopt: the kernel failed (out of memory?)",
    "onnxopt: an input has the wrong element type",
    "onnxopt: an op has the wrong number of inputs",
};
#define MAX_WORK_BYTES (1.0 * (1LL << 31)) /* kernels/geometry.py's MAX_WORK_BYTES */
#define MAX_STEP (1 << 12)
#define MAX_PAD (1 << 16)

static OrtStatus *problem(int code) {
    return CALL(CREATE_STATUS, CreateStatusFn)(code == NO_MEMORY ? ERROR_FAIL : ERROR_INVALID_ARGUMENT,
                                               PROBLEMS[code]);
}

/* ---- one input: data, type, shape ---- */
#define MAX_RANK 7
typedef struct { void *data; int type; int64_t rank, dims[MAX_RANK]; } Tensor;

static OrtStatus *describe(const void *value, Tensor *t) {
    void *info;
    size_t rank = 0;
    OrtStatus *status = CALL(GET_TENSOR_TYPE_AND_SHAPE, TypeAndShapeFn)(value, &info);
    if (status) return status;
    status = CALL(GET_TENSOR_ELEMENT_TYPE, ElementTypeFn)(info, &t->type);
    if (!status) status = CALL(GET_DIMENSIONS_COUNT, DimsCountFn)(info, &rank);
    if (!status && rank > MAX_RANK) status = problem(BAD_RANK);
    if (!status) status = CALL(GET_DIMENSIONS, DimsFn)(info, t->dims, rank);
    CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(info);
    t->rank = (int64_t)rank;
    return status ? status : CALL(GET_TENSOR_MUTABLE_DATA, MutableDataFn)(value, &t->data);
}

static int64_t elements(const Tensor *t) {
    int64_t n = 1;
    for (int64_t i = 0; i < t->rank; i++) n *= t->dims[i];
    return n;
}

/* ---- the ops ---- */
enum { BIT_CONV, MULTIBIT_BIT_CONV, PACK_SIGNS, PACKED_BIT_CONV, PACKED_BIT_CONV_SIGNS, OPS };
#define MAX_INPUTS 6
#define W_IN 1 /* constant inputs: packed weight, alpha, bias, geometry, then the chain ops' pool */
#define ALPHA_IN 2
#define BIAS_IN 3
#define GEOMETRY_IN 4
#define POOL_IN 5

/* what a conv op's constant inputs fix, validated: built at kernel creation, or per call when not constant */
typedef struct {
    Weights weights;
    uint64_t *wp, *fused;
    float *alpha, *bias;
    int64_t geometry[12], pool[POOL_LENGTH];
    int multibit;
} Layer;

#define PLANS 8
typedef struct {
    int op;
    Layer *layer;               /* NULL: the constants are read per call */
    pthread_mutex_t lock;       /* guards plans */
    Plan plans[PLANS];
    int plan_count;
} Node;

static void free_layer(Layer *layer) {
    if (!layer) return;
    free(layer->wp), free(layer->fused), free(layer->alpha), free(layer->bias), free(layer->weights.taps_pop), free(layer);
}

static int geometry_problem(const Tensor *g, int multibit) {
    const int64_t *v = g->data;
    if (g->type != TYPE_INT64 || g->rank != 1 || g->dims[0] != (multibit ? 12 : 11)) return BAD_GEOMETRY;
    if (v[G_RANK] != 1 && v[G_RANK] != 2) return BAD_GEOMETRY;
    const int steps[] = {G_SH, G_SW, G_DH, G_DW}, pads[] = {G_PT, G_PL, G_PB, G_PR};
    for (int i = 0; i < 4; i++) {
        if (v[steps[i]] < 1 || v[steps[i]] > MAX_STEP) return BAD_GEOMETRY;
        if (v[pads[i]] < 0 || v[pads[i]] > MAX_PAD) return BAD_GEOMETRY;
    }
    if (v[G_AUTO] < 0 || v[G_AUTO] > 3 || v[G_CHANNELS] < 1) return BAD_GEOMETRY;
    if (v[G_RANK] == 1 && (v[G_SH] != 1 || v[G_DH] != 1 || v[G_PT] != 0 || v[G_PB] != 0)) return BAD_GEOMETRY;
    if (multibit && (v[G_LEVELS] < 1 || v[G_LEVELS] > MAX_LEVELS)) return BAD_GEOMETRY;
    return OK;
}

static int pool_problem(const Tensor *p) {
    const int64_t *v = p->data;
    if (p->type != TYPE_INT64 || p->rank != 1 || p->dims[0] != POOL_LENGTH) return BAD_POOL;
    for (int i = 0; i < 6; i++)
        if (v[i] < 1 || v[i] > MAX_STEP) return BAD_POOL;
    for (int i = 6; i < 10; i++)
        if (v[i] < 0 || v[i] > MAX_PAD) return BAD_POOL;
    return OK;
}

/* a validated Layer (copies of the constants) from inputs 1..4 (and 5), or a problem code */
static int make_layer(int op, const Tensor *in, Layer **out) {
    int multibit = op == MULTIBIT_BIT_CONV, chained = op == PACKED_BIT_CONV || op == PACKED_BIT_CONV_SIGNS;
    const Tensor *w = &in[W_IN], *alpha = &in[ALPHA_IN], *bias = &in[BIAS_IN];
    int code = geometry_problem(&in[GEOMETRY_IN], multibit);
    if (code) return code;
    const int64_t *g = in[GEOMETRY_IN].data;
    if (w->type != TYPE_UINT64 || w->rank != 4 || w->dims[0] < 1 || w->dims[1] < 1 || w->dims[3] < 1 ||
        w->dims[2] != (g[G_CHANNELS] + 63) / 64 || (g[G_RANK] == 1 && w->dims[0] != 1))
        return BAD_WEIGHT;
    int64_t levels = multibit ? alpha->dims[0] : 1, o = multibit ? alpha->dims[1] : alpha->dims[0];
    if (alpha->type != TYPE_FLOAT || alpha->rank != (multibit ? 2 : 1) || levels < 1 || levels > MAX_LEVELS ||
        w->dims[3] != levels * o)
        return BAD_ALPHA;
    if (bias->type != TYPE_FLOAT || bias->rank != 1 || bias->dims[0] != o) return BAD_BIAS;
    if (chained && (code = pool_problem(&in[POOL_IN]))) return code;
    if (chained && g[G_RANK] != 2) return BAD_PACKED;
    Layer *layer = calloc(1, sizeof *layer);
    int64_t words = elements(w);
    if (layer) {
        layer->wp = malloc(sizeof(uint64_t) * (size_t)words);
        layer->alpha = malloc(sizeof(float) * (size_t)(levels * o));
        layer->bias = malloc(sizeof(float) * (size_t)o);
        layer->weights.taps_pop = malloc(sizeof(int32_t) * (size_t)(w->dims[0] * w->dims[1] * w->dims[3]));
    }
    if (!layer || !layer->wp || !layer->alpha || !layer->bias || !layer->weights.taps_pop) {
        free_layer(layer);
        return NO_MEMORY;
    }
    memcpy(layer->wp, w->data, sizeof(uint64_t) * (size_t)words);
    memcpy(layer->alpha, alpha->data, sizeof(float) * (size_t)(levels * o));
    memcpy(layer->bias, bias->data, sizeof(float) * (size_t)o);
    memcpy(layer->geometry, g, sizeof(int64_t) * (size_t)in[GEOMETRY_IN].dims[0]);
    if (chained) memcpy(layer->pool, in[POOL_IN].data, sizeof layer->pool);
    layer->multibit = multibit;
    Weights *wt = &layer->weights;
    wt->kh = w->dims[0], wt->kw = w->dims[1], wt->cw = w->dims[2], wt->columns = w->dims[3];
    wt->o = o, wt->levels_w = levels, wt->wp = layer->wp, wt->channels = g[G_CHANNELS], wt->dw = g[G_DW];
    tap_popcounts(wt);
    if (fusable(wt, g[G_CHANNELS])) {
        layer->fused = malloc(sizeof(uint64_t) * (size_t)(wt->kh * wt->columns));
        if (!layer->fused) {
            free_layer(layer);
            return NO_MEMORY;
        }
        fuse_weights(wt, g[G_CHANNELS], layer->fused);
        wt->fused = layer->fused;
    }
    *out = layer;
    return OK;
}

/* heap allocations made while computing (buffers grown, plans and per-call layers made): a test reads it to check
 * that calls at a size seen before allocate nothing */
EXPORT int64_t onnxopt_native_allocations;
static void count_allocation(void) { __atomic_fetch_add(&onnxopt_native_allocations, 1, __ATOMIC_RELAXED); }

/* the plan for an h x w input: cached per node (read-only once made, so threads share it), or made into `own` */
static const Plan *plan_for(Node *node, const Layer *layer, int64_t h, int64_t w, Plan *own) {
    if (!node->layer) {
        count_allocation();
        return make_plan(&layer->weights, layer->geometry, h, w, own) ? NULL : own;
    }
    const Plan *found = NULL;
    pthread_mutex_lock(&node->lock);
    for (int i = 0; i < node->plan_count && !found; i++)
        if (node->plans[i].h == h && node->plans[i].w == w) found = &node->plans[i];
    if (!found && node->plan_count < PLANS) {
        count_allocation();
        if (!make_plan(&layer->weights, layer->geometry, h, w, &node->plans[node->plan_count]))
            found = &node->plans[node->plan_count++];
    }
    pthread_mutex_unlock(&node->lock);
    if (!found) { /* a ninth size: a plan for this call only */
        count_allocation();
        if (!make_plan(&layer->weights, layer->geometry, h, w, own)) found = own;
    }
    return found;
}

/* ---- buffers reused between calls: per thread, grown as needed ---- */
enum { PACKED_BUFFER, JOB_BUFFER, SCALE_BUFFER, BUFFERS };
static __thread struct { void *data; size_t size; } buffers[BUFFERS];

static void *buffer(int which, size_t size) {
    if (buffers[which].size < size) {
        void *grown = malloc(size);
        if (!grown) return NULL;
        count_allocation();
        free(buffers[which].data);
        buffers[which].data = grown, buffers[which].size = size;
    }
    return buffers[which].data;
}

/* ---- threads ---- */
/* popcount words (or elements packed) below which the calling thread alone is faster than waking the pool:
 * measured on the small layers of benchmarks/bitconv.py, flat between 4096 and 32768 (ONNXOPT_NATIVE_PARALLEL_WORK
 * overrides it, for that measurement) */
static double parallel_work = 1 << 14;

typedef struct Jobs Jobs;
struct Jobs {
    void (*run)(Jobs *, int64_t);
    const void *context;
    Conv conv;
    const float *x;
    const uint64_t *bits;
    const int64_t *pool;
    uint64_t *xp;
    int64_t c, h, w, h_in, w_in, cw, chunk, level;
    float *scales;
    double *partial;
    volatile int failed;
};

static void run_one(void *jobs, size_t index) { ((Jobs *)jobs)->run(jobs, (int64_t)index); }

static void run_jobs(Jobs *jobs, int64_t count, double work) {
    if (newer_api && count > 1 && work >= parallel_work &&
        !CALL(KERNEL_CONTEXT_PARALLEL_FOR, ParallelForFn)(jobs->context, run_one, (size_t)count, 0, jobs))
        return;
    for (int64_t i = 0; i < count; i++) jobs->run(jobs, i); /* small work, an older onnxruntime, or a failure */
}

static void conv_one(Jobs *jobs, int64_t job) {
    void *scratch = buffer(JOB_BUFFER, job_scratch_bytes(&jobs->conv));
    if (!scratch) { jobs->failed = 1; return; }
    conv_job(&jobs->conv, job, scratch);
}

/* the packed row of input row `row` (sample row / h), taps fused when the layer fuses them */
static void fuse_packed(Jobs *jobs, int64_t row, int64_t plane_words) {
    const Weights *wt = jobs->conv.weights;
    const Plan *p = jobs->conv.plan;
    if (!wt || !wt->fused) return;
    for (int64_t j = 0; j < jobs->conv.levels_x; j++)
        fuse_row(jobs->xp + j * plane_words + ((row / jobs->h) * p->rows + p->pt + row % jobs->h) * p->cols, p->cols,
                 wt->kw, wt->dw, wt->channels);
}

static void pack_one(Jobs *jobs, int64_t row) { /* one input row, all channels */
    const Plan *p = jobs->conv.plan;
    pack_rows(jobs->x, jobs->c, jobs->h, jobs->w, jobs->cw, p->rows, p->cols, p->pt, p->pl, jobs->xp, row, row + 1);
    fuse_packed(jobs, row, 0);
}

static void place_one(Jobs *jobs, int64_t row) {
    place_bits_rows(jobs->bits, jobs->h_in, jobs->w_in, jobs->cw, jobs->pool, jobs->conv.plan, jobs->xp, row,
                    row + 1);
    fuse_packed(jobs, row, 0);
}

#define CHUNKS 16 /* multibit.CHUNKS */
static void level_one(Jobs *jobs, int64_t job) { /* multibit.leading_scales: one chunk of one sample */
    int64_t i = job / CHUNKS, chunk = job % CHUNKS, size = jobs->c * jobs->h * jobs->w;
    int64_t first = chunk * jobs->chunk, last = first + jobs->chunk < size ? first + jobs->chunk : size;
    jobs->partial[job] = first < last ? level_abs_sum(jobs->x + i * size, jobs->scales, jobs->conv.n, jobs->level,
                                                      i, first, last) : 0.0;
}

static void levels_one(Jobs *jobs, int64_t job) { /* multibit.pack_levels: one row of one sample */
    const Conv *cv = &jobs->conv;
    int64_t plane_words = cv->n * cv->plan->rows * jobs->cw * cv->plan->cols;
    jobs->partial[job] = pack_levels_row(jobs->x, jobs->c, jobs->h, jobs->w, jobs->scales, cv->n, cv->levels_x,
                                         cv->plan, jobs->cw, plane_words, jobs->xp, job / jobs->h, job % jobs->h);
    fuse_packed(jobs, job, plane_words);
}

/* the activation scales and packed planes of a multi-bit layer (multibit.leading_scales, pack_levels) */
static int pack_multibit(Jobs *jobs) {
    Conv *cv = &jobs->conv;
    int64_t n = cv->n, levels = cv->levels_x, size = jobs->c * jobs->h * jobs->w;
    jobs->partial = buffer(SCALE_BUFFER, sizeof(double) * (size_t)(n * (jobs->h > CHUNKS ? jobs->h : CHUNKS)) +
                                         sizeof(float) * (size_t)(levels * n));
    if (!jobs->partial) return NO_MEMORY;
    jobs->scales = (float *)(jobs->partial + n * (jobs->h > CHUNKS ? jobs->h : CHUNKS));
    for (int64_t k = 0; k < levels * n; k++) jobs->scales[k] = 1.0f;
    jobs->chunk = (size + CHUNKS - 1) / CHUNKS;
    jobs->run = level_one;
    for (jobs->level = 0; jobs->level < levels - 1; jobs->level++) {
        run_jobs(jobs, n * CHUNKS, (double)(n * size * (jobs->level + 1)));
        for (int64_t i = 0; i < n; i++) {
            double total = 0.0;
            for (int64_t c = 0; c < CHUNKS; c++) total += jobs->partial[i * CHUNKS + c];
            jobs->scales[jobs->level * n + i] = (float)(total / (double)size);
        }
    }
    jobs->run = levels_one;
    run_jobs(jobs, n * jobs->h, (double)(n * size * levels));
    if (levels > 1)
        for (int64_t i = 0; i < n; i++) {
            double total = 0.0;
            for (int64_t r = 0; r < jobs->h; r++) total += jobs->partial[i * jobs->h + r];
            jobs->scales[(levels - 1) * n + i] = (float)(total / (double)size);
        }
    cv->scales = jobs->scales;
    return OK;
}

/* ---- compute ---- */
typedef struct OpTable OpTable;
struct OpTable { /* onnxruntime's OrtCustomOp, version 16 fields */
    uint32_t version;
    void *(*CreateKernel)(const OpTable *, const OrtApi *, const void *);
    const char *(*GetName)(const OpTable *);
    const char *(*GetExecutionProviderType)(const OpTable *);
    int (*GetInputType)(const OpTable *, size_t);
    size_t (*GetInputTypeCount)(const OpTable *);
    int (*GetOutputType)(const OpTable *, size_t);
    size_t (*GetOutputTypeCount)(const OpTable *);
    void (*KernelCompute)(void *, void *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const OpTable *, size_t);
    int (*GetOutputCharacteristic)(const OpTable *, size_t);
    int (*GetInputMemoryType)(const OpTable *, size_t);
    int (*GetVariadicInputMinArity)(const OpTable *);
    int (*GetVariadicInputHomogeneity)(const OpTable *);
    int (*GetVariadicOutputMinArity)(const OpTable *);
    int (*GetVariadicOutputHomogeneity)(const OpTable *);
    OrtStatus *(*CreateKernelV2)(const OpTable *, const OrtApi *, const void *, void **);
    OrtStatus *(*KernelComputeV2)(void *, void *);
};

typedef struct {
    OpTable table; /* first: onnxruntime hands back &table */
    int op;
    const char *name;
    size_t inputs;
    int input_types[MAX_INPUTS];
    int output_type;
} Op;

static const size_t INPUTS[OPS] = {5, 5, 1, 6, 6};

static OrtStatus *read_inputs(const void *context, size_t count, Tensor *in) {
    size_t given;
    OrtStatus *status = CALL(KERNEL_CONTEXT_GET_INPUT_COUNT, InputCountFn)(context, &given);
    if (status) return status;
    if (given != count) return problem(BAD_COUNT);
    for (size_t i = 0; i < count; i++) {
        const void *value;
        if ((status = CALL(KERNEL_CONTEXT_GET_INPUT, GetInputFn)(context, i, &value))) return status;
        if ((status = describe(value, &in[i]))) return status;
    }
    return NULL;
}

static OrtStatus *output(void *context, const int64_t *dims, size_t rank, void **data) {
    void *value;
    OrtStatus *status = CALL(KERNEL_CONTEXT_GET_OUTPUT, GetOutputFn)(context, 0, dims, rank, &value);
    return status ? status : CALL(GET_TENSOR_MUTABLE_DATA, MutableDataFn)(value, data);
}

static OrtStatus *pack_signs(void *context, const Tensor *x) {
    if (x->type != TYPE_FLOAT) return problem(BAD_TYPE);
    if (x->rank != 4) return problem(BAD_RANK);
    int64_t n = x->dims[0], c = x->dims[1], h = x->dims[2], w = x->dims[3], cw = (c + 63) / 64;
    int64_t dims[4] = {n, h, cw, w};
    uint64_t *out;
    OrtStatus *status = output(context, dims, 4, (void **)&out);
    if (status || n * h * w == 0) return status;
    memset(out, 0, sizeof(uint64_t) * (size_t)(n * h * cw * w));
    Plan whole = {.h = h, .w = w, .rows = h, .cols = w}; /* no border */
    Jobs jobs = {.run = pack_one, .context = context, .x = x->data, .xp = out, .c = c, .h = h, .w = w, .cw = cw};
    jobs.conv.plan = &whole;
    run_jobs(&jobs, n * h, (double)(n * c * h * w));
    return NULL;
}

static OrtStatus *convolve(Node *node, void *context, Tensor *in) {
    int op = node->op, chained = op == PACKED_BIT_CONV || op == PACKED_BIT_CONV_SIGNS;
    Layer *layer = node->layer;
    int code = OK;
    if (!layer) { /* weights that are not initializers: validated and prepared per call */
        count_allocation();
        if ((code = make_layer(op, in, &layer))) return problem(code);
    }
    const int64_t *g = layer->geometry;
    const Tensor *x = &in[0];
    int64_t n = 0, c = g[G_CHANNELS], h = 0, w = 0, h_in = 0, w_in = 0;
    if (chained) {
        if (x->type != TYPE_UINT64 || x->rank != 4 || x->dims[2] != (c + 63) / 64) code = BAD_PACKED;
        if (!code) n = x->dims[0], h_in = x->dims[1], w_in = x->dims[3];
        if (!code && (h_in < 1 || w_in < 1)) code = EMPTY_INPUT;
        if (!code) pooled_shape(h_in, w_in, layer->pool, &h, &w);
        if (!code && (h < 1 || w < 1)) code = NO_OUTPUT;
    } else {
        if (x->type != TYPE_FLOAT) code = BAD_TYPE;
        else if (x->rank != g[G_RANK] + 2) code = BAD_RANK; /* checked before any dim is read */
        else if (x->dims[1] != c) code = BAD_CHANNELS;
        if (!code) n = x->dims[0], h = x->rank == 3 ? 1 : x->dims[2], w = x->dims[x->rank - 1];
        if (!code && (h < 1 || w < 1)) code = EMPTY_INPUT;
    }
    const Weights *wt = &layer->weights;
    int64_t levels_x = layer->multibit ? g[G_LEVELS] : 1;
    if (!code && work_bytes(n, h, w, c, wt->kh, wt->kw, g, levels_x) > MAX_WORK_BYTES) code = TOO_LARGE;
    Plan own = {0};
    const Plan *plan = NULL;
    if (!code) {
        int64_t pt, pl, oh, ow;
        placement(h, w, wt->kh, wt->kw, g, &pt, &pl, &oh, &ow);
        if (oh < 1 || ow < 1) code = NO_OUTPUT;
        else if (!(plan = plan_for(node, layer, h, w, &own))) code = NO_MEMORY;
    }
    OrtStatus *status = code ? problem(code) : NULL;
    void *out = NULL;
    if (!status) {
        int emit_signs = op == PACKED_BIT_CONV_SIGNS;
        int64_t dims[4] = {n, emit_signs ? plan->oh : wt->o, emit_signs ? (wt->o + 63) / 64 : plan->oh, plan->ow};
        if (x->rank == 3 && !chained) dims[2] = plan->ow; /* Conv1d: (n, o, ow) */
        status = output(context, dims, x->rank == 3 && !chained ? 3 : 4, &out);
    }
    size_t packed = status ? 0 : (size_t)(levels_x * n * plan->rows * wt->cw * plan->cols);
    uint64_t *xp = status || n == 0 ? NULL : buffer(PACKED_BUFFER, sizeof(uint64_t) * packed);
    if (!status && n > 0 && !xp) status = problem(NO_MEMORY);
    if (!status && n > 0) {
        memset(xp, 0, sizeof(uint64_t) * packed);
        Jobs jobs = {.context = context, .x = x->data, .bits = x->data, .xp = xp, .c = c, .h = h, .w = w,
                     .h_in = h_in, .w_in = w_in, .cw = wt->cw};
        Conv *cv = &jobs.conv;
        cv->weights = wt, cv->plan = plan, cv->xp = xp, cv->alpha = layer->alpha, cv->bias = layer->bias;
        cv->n = n, cv->levels_x = levels_x, cv->sh = g[G_SH], cv->sw = g[G_SW];
        if (op == PACKED_BIT_CONV_SIGNS) cv->signs = out;
        else cv->out = out;
        if (layer->multibit) {
            if ((code = pack_multibit(&jobs))) status = problem(code);
        } else if (chained) {
            jobs.run = place_one, jobs.pool = layer->pool;
            run_jobs(&jobs, n * h, (double)(n * h * w * wt->cw * layer->pool[0] * layer->pool[1]));
        } else {
            jobs.run = pack_one;
            run_jobs(&jobs, n * h, (double)(n * c * h * w));
        }
        if (!status) {
            jobs.run = conv_one;
            run_jobs(&jobs, conv_jobs(cv),
                     (double)(n * plan->oh * plan->ow) * (double)(wt->o * wt->kh * wt->kw * wt->cw * levels_x *
                                                                  wt->levels_w));
            if (jobs.failed) status = problem(NO_MEMORY);
        }
    }
    if (plan == &own) free_plan(&own);
    if (!node->layer) free_layer(layer);
    return status;
}

static OrtStatus *compute(void *kernel, void *context) {
    Node *node = kernel;
    Tensor in[MAX_INPUTS];
    OrtStatus *status = read_inputs(context, INPUTS[node->op], in);
    if (status) return status;
    return node->op == PACK_SIGNS ? pack_signs(context, &in[0]) : convolve(node, context, in);
}

/* the node's Layer from its constant inputs, when onnxruntime can give them at kernel creation and they are all
 * constant (initializers); otherwise (or when they are invalid: the first call reports why) NULL */
static Layer *constant_layer(int op, const void *info) {
    if (!newer_api || op == PACK_SIGNS) return NULL;
    Tensor in[MAX_INPUTS];
    for (size_t i = W_IN; i < INPUTS[op]; i++) {
        int constant = 0;
        const void *value = NULL;
        OrtStatus *status = CALL(KERNEL_INFO_GET_CONSTANT_INPUT, ConstantInputFn)(info, i, &constant, &value);
        if (!status && constant && value) status = describe(value, &in[i]);
        else if (!status) return NULL;
        if (status) {
            CALL(RELEASE_STATUS, ReleaseFn)(status);
            return NULL;
        }
    }
    Layer *layer = NULL;
    return make_layer(op, in, &layer) == OK ? layer : NULL;
}

static OrtStatus *create(const OpTable *table, const OrtApi *unused, const void *info, void **kernel) {
    (void)unused;
    Node *node = calloc(1, sizeof *node);
    if (!node) return problem(NO_MEMORY);
    node->op = ((const Op *)table)->op;
    node->layer = constant_layer(node->op, info);
    pthread_mutex_init(&node->lock, NULL);
    *kernel = node;
    return NULL;
}

static void destroy(void *kernel) {
    Node *node = kernel;
    for (int i = 0; i < node->plan_count; i++) free_plan(&node->plans[i]);
    free_layer(node->layer);
    pthread_mutex_destroy(&node->lock);
    free(node);
}

#define OP(table) ((const Op *)(table))
static const char *op_name(const OpTable *op) { return OP(op)->name; }
static const char *op_provider(const OpTable *op) { (void)op; return "CPUExecutionProvider"; }
static int op_input_type(const OpTable *op, size_t i) { return i < OP(op)->inputs ? OP(op)->input_types[i] : 0; }
static size_t op_input_count(const OpTable *op) { return OP(op)->inputs; }
static int op_output_type(const OpTable *op, size_t i) { (void)i; return OP(op)->output_type; }
static size_t op_output_count(const OpTable *op) { (void)op; return 1; }
static int op_required(const OpTable *op, size_t i) { (void)op; (void)i; return 0; }
static int op_memory(const OpTable *op, size_t i) { (void)op; (void)i; return 0; }
static int op_one(const OpTable *op) { (void)op; return 1; }

#define TABLE {16, NULL, op_name, op_provider, op_input_type, op_input_count, op_output_type, op_output_count, NULL, \
               destroy, op_required, op_required, op_memory, op_one, op_one, op_one, op_one, create, compute}
#define CONV_INPUTS TYPE_FLOAT, TYPE_UINT64, TYPE_FLOAT, TYPE_FLOAT, TYPE_INT64
#define CHAINED_INPUTS TYPE_UINT64, TYPE_UINT64, TYPE_FLOAT, TYPE_FLOAT, TYPE_INT64, TYPE_INT64
static const Op op_tables[OPS] = {
    {TABLE, BIT_CONV, "BitConv", 5, {CONV_INPUTS}, TYPE_FLOAT},
    {TABLE, MULTIBIT_BIT_CONV, "MultibitBitConv", 5, {CONV_INPUTS}, TYPE_FLOAT},
    {TABLE, PACK_SIGNS, "PackSigns", 1, {TYPE_FLOAT}, TYPE_UINT64},
    {TABLE, PACKED_BIT_CONV, "PackedBitConv", 6, {CHAINED_INPUTS}, TYPE_FLOAT},
    {TABLE, PACKED_BIT_CONV_SIGNS, "PackedBitConvSigns", 6, {CHAINED_INPUTS}, TYPE_UINT64},
};

static void *domain; /* one for the process: a domain must outlive every session that uses it */
static pthread_mutex_t domain_lock = PTHREAD_MUTEX_INITIALIZER;

/* onnxruntime calls this when a session registers the library */
EXPORT OrtStatus *RegisterCustomOps(void *options, const ApiBase *base) {
    pthread_mutex_lock(&domain_lock);
    OrtStatus *status = NULL;
    if (!api) {
        const OrtApi *newer = base->GetApi(NEWER_API_VERSION);
        newer_api = newer != NULL;
        api = (void *const *)(newer ? newer : base->GetApi(BASE_API_VERSION));
        if (onnxopt_select_isa(getenv("ONNXOPT_NATIVE_ISA"))) onnxopt_select_isa(NULL);
        if (getenv("ONNXOPT_NATIVE_PARALLEL_WORK")) parallel_work = atof(getenv("ONNXOPT_NATIVE_PARALLEL_WORK"));
    }
    if (!api) {
        pthread_mutex_unlock(&domain_lock);
        return NULL; /* an onnxruntime older than 1.16: nothing registered, the session reports the ops unknown */
    }
    if (!domain) {
        status = CALL(CREATE_CUSTOM_OP_DOMAIN, CreateDomainFn)("com.onnxopt", &domain);
        for (int i = 0; i < OPS && !status; i++)
            status = CALL(CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &op_tables[i].table);
        if (status) domain = NULL;
    }
    pthread_mutex_unlock(&domain_lock);
    return status ? status : CALL(ADD_CUSTOM_OP_DOMAIN, AddDomainFn)(options, domain);
}

/* for onnxopt's Python side and tests: the register tile in use ("avx512", "avx2", "generic") */
EXPORT const char *onnxopt_native_isa(void) {
    if (!api) onnxopt_select_isa(getenv("ONNXOPT_NATIVE_ISA"));
    return onnxopt_isa();
}
