/* onnxopt's lowered ops (com.onnxopt::BitConv, MultibitBitConv, and the packed-bit chain ops PackSigns,
 * PackedBitConv, PackedBitConvSigns of kernels/chain.py) for onnxruntime, with no Python on the call path.
 *
 * Why C: onnxruntime's Python API registers custom ops only from a shared library exporting RegisterCustomOps,
 * and onnxruntime-extensions' PyOp bridge takes the GIL and copies every tensor (33 us a call at batch 1).
 * This file is only the plumbing between onnxruntime's C API and numba @cfunc functions (runtime/cabi.py; a
 * shape check and a compute per op), whose addresses Python hands over with onnxopt_set_kernels() before
 * onnxruntime loads this same library (dlopen returns the handle already open). The arithmetic stays in the numba
 * kernels (kernels/bitconv.py, kernels/multibit.py).
 *
 * onnxruntime's wheel ships no C headers, so the few API entries used are called by their position in the
 * OrtApi function table, which onnxruntime only ever appends to (positions as of API version 16, which every
 * onnxruntime since 1.16 serves), and the OrtCustomOp table is declared with the fields of version 16.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef void OrtStatus;
typedef void OrtApi;

#define API_VERSION 16
#define ERROR_INVALID_ARGUMENT 2
#define TYPE_FLOAT 1
#define TYPE_INT64 7
#define TYPE_UINT64 13

/* positions in the OrtApi table */
enum {
    CREATE_STATUS = 0, CREATE_CUSTOM_OP_DOMAIN = 26, CUSTOM_OP_DOMAIN_ADD = 27, ADD_CUSTOM_OP_DOMAIN = 28,
    GET_TENSOR_MUTABLE_DATA = 51, GET_TENSOR_ELEMENT_TYPE = 60, GET_DIMENSIONS_COUNT = 61, GET_DIMENSIONS = 62,
    GET_TENSOR_TYPE_AND_SHAPE = 65, KERNEL_CONTEXT_GET_INPUT_COUNT = 88, KERNEL_CONTEXT_GET_INPUT = 90,
    KERNEL_CONTEXT_GET_OUTPUT = 91, RELEASE_STATUS = 93, RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
};

typedef struct { const OrtApi *(*GetApi)(uint32_t); const char *(*GetVersionString)(void); } ApiBase;

typedef OrtStatus *(*CreateStatusFn)(int, const char *);
typedef OrtStatus *(*CreateDomainFn)(const char *, void **);
typedef OrtStatus *(*DomainAddFn)(void *, const void *);
typedef OrtStatus *(*AddDomainFn)(void *, void *);
typedef OrtStatus *(*MutableDataFn)(void *, void **);
typedef OrtStatus *(*ElementTypeFn)(const void *, int *);
typedef OrtStatus *(*DimsCountFn)(const void *, size_t *);
typedef OrtStatus *(*DimsFn)(const void *, int64_t *, size_t);
typedef OrtStatus *(*TypeAndShapeFn)(const void *, void **);
typedef OrtStatus *(*InputCountFn)(const void *, size_t *);
typedef OrtStatus *(*GetInputFn)(const void *, size_t, const void **);
typedef OrtStatus *(*GetOutputFn)(void *, size_t, const int64_t *, size_t, void **);
typedef void (*ReleaseFn)(void *);

static void *const *api;  /* the OrtApi table, as function pointers */
#define CALL(position, type) ((type)api[position])

/* the numba side (runtime/cabi.py): dims holds up to 6 inputs x (rank, 7 dims), then the output's 4 dims and
 * rank, which the shape check fills; data holds the inputs' pointers, then the output's at [MAX_INPUTS]; each
 * returns 0 or a problem code that cabi.PROBLEMS explains */
typedef int64_t (*ShapeFn)(int64_t *dims, void **data);
typedef int64_t (*ComputeFn)(void **data, int64_t *dims);
#define OPS 5  /* cabi.ENTRY_MODULES' positions */
static ShapeFn shape_fns[OPS];
static ComputeFn compute_fns[OPS];
static const char *const *problem_text;
static int64_t problem_count;

void onnxopt_set_problems(const char *const *problems, int64_t count) {
    problem_text = problems;
    problem_count = count;
}

/* the entry points of op `op` (cabi.ENTRY_MODULES' positions), handed over before a session needs them */
void onnxopt_set_kernels(int op, void *shape, void *compute) {
    if (op < 0 || op >= OPS) return;
    shape_fns[op] = (ShapeFn)shape;
    compute_fns[op] = (ComputeFn)compute;
}

#define MAX_INPUTS 6
#define SLOTS 8
#define GEOMETRY 4  /* the conv ops' geometry input */

typedef struct OpTable OpTable;  /* onnxruntime's OrtCustomOp, below */

static OrtStatus *fail(const char *message) {
    return CALL(CREATE_STATUS, CreateStatusFn)(ERROR_INVALID_ARGUMENT, message);
}

/* one input's data pointer, element type and shape; NULL or a status */
static OrtStatus *read_input(void *context, size_t index, int want_type, void **data, int64_t *slots) {
    const void *value;
    void *info;
    int type;
    size_t rank;
    OrtStatus *status = CALL(KERNEL_CONTEXT_GET_INPUT, GetInputFn)(context, index, &value);
    if (status) return status;
    if ((status = CALL(GET_TENSOR_TYPE_AND_SHAPE, TypeAndShapeFn)(value, &info))) return status;
    status = CALL(GET_TENSOR_ELEMENT_TYPE, ElementTypeFn)(info, &type);
    if (!status) status = CALL(GET_DIMENSIONS_COUNT, DimsCountFn)(info, &rank);
    if (!status && rank >= SLOTS) status = fail("onnxopt: an input has more than 7 dimensions");
    if (!status) status = CALL(GET_DIMENSIONS, DimsFn)(info, slots + 1, rank);
    CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(info);
    if (status) return status;
    if (type != want_type) return fail("onnxopt: an input has the wrong element type");
    slots[0] = (int64_t)rank;
    return CALL(GET_TENSOR_MUTABLE_DATA, MutableDataFn)((void *)value, data);
}

static OrtStatus *problem(int64_t code) {
    if (code > 0 && code < problem_count) return fail(problem_text[code]);
    return fail("onnxopt: the kernel refused its inputs");
}

/* ---- the OrtCustomOp table (version 16 fields) ---- */
struct OpTable {
    uint32_t version;
    void *(*CreateKernel)(const struct OpTable *, const OrtApi *, const void *);
    const char *(*GetName)(const struct OpTable *);
    const char *(*GetExecutionProviderType)(const struct OpTable *);
    int (*GetInputType)(const struct OpTable *, size_t);
    size_t (*GetInputTypeCount)(const struct OpTable *);
    int (*GetOutputType)(const struct OpTable *, size_t);
    size_t (*GetOutputTypeCount)(const struct OpTable *);
    void (*KernelCompute)(void *, void *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct OpTable *, size_t);
    int (*GetOutputCharacteristic)(const struct OpTable *, size_t);
    int (*GetInputMemoryType)(const struct OpTable *, size_t);
    int (*GetVariadicInputMinArity)(const struct OpTable *);
    int (*GetVariadicInputHomogeneity)(const struct OpTable *);
    int (*GetVariadicOutputMinArity)(const struct OpTable *);
    int (*GetVariadicOutputHomogeneity)(const struct OpTable *);
    OrtStatus *(*CreateKernelV2)(const struct OpTable *, const OrtApi *, const void *, void **);
    OrtStatus *(*KernelComputeV2)(void *, void *);
};

typedef struct {
    OpTable table;  /* first: onnxruntime hands back &table */
    int index;
    const char *name;
    size_t inputs;
    int input_types[MAX_INPUTS];
    int output_type;
} Op;

#define OP(table) ((const Op *)(table))
static const char *op_name(const OpTable *op) { return OP(op)->name; }
static const char *op_provider(const OpTable *op) { (void)op; return "CPUExecutionProvider"; }
static int op_input_type(const OpTable *op, size_t i) { return i < OP(op)->inputs ? OP(op)->input_types[i] : 0; }
static size_t op_input_count(const OpTable *op) { return OP(op)->inputs; }
static int op_output_type(const OpTable *op, size_t i) { (void)i; return OP(op)->output_type; }
static size_t op_output_count(const OpTable *op) { (void)op; return 1; }
static void op_destroy(void *kernel) { (void)kernel; }
static int op_required(const OpTable *op, size_t i) { (void)op; (void)i; return 0; }
static int op_memory(const OpTable *op, size_t i) { (void)op; (void)i; return 0; }
static int op_one(const OpTable *op) { (void)op; return 1; }

/* ---- kernel threads under contention ----
 * numba's parallel kernels split a layer between its threads and wait for the slowest. When another process
 * takes a core, the thread on it is descheduled for milliseconds and every layer waits for it (YOLOv8n lowered:
 * 37x slower beside one busy process, where float onnxruntime slows 2.2x; benchmarks/cpu_hog.py). A call whose
 * calling thread got less than half its wall time on a CPU was waiting on such a thread (or was descheduled
 * itself): after WAITED_CALLS such calls in a row the kernels run on the calling thread alone for SERIAL_S, after
 * which parallel calls probe again. Calls shorter than JUDGED_NS are too noisy to judge. Races between sessions on this state are benign. */
#define SERIAL_S 2
#define JUDGED_NS 50000
#define WAITED_CALLS 3  /* in a row: one slow call (a first call, a page fault storm) is not contention */
volatile int64_t onnxopt_serial_until;  /* CLOCK_MONOTONIC seconds (a test sets it) */
static volatile int waited_in_a_row;
int64_t onnxopt_serial_switches;  /* how often the governor went serial (read by tests and benchmarks) */
static int64_t nanoseconds(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}
typedef void (*SetThreadsFn)(int);
static SetThreadsFn set_threads;  /* numba's threading layer: the calling thread's count for parallel regions */
static int all_threads;
void onnxopt_set_threading(void *set_num_threads, int64_t threads) {
    set_threads = (SetThreadsFn)set_num_threads;
    all_threads = (int)threads;
}
static int64_t governed_compute(ComputeFn fn, void **data, int64_t *dims) {
    int64_t wall = nanoseconds(CLOCK_MONOTONIC), cpu = nanoseconds(CLOCK_THREAD_CPUTIME_ID);
    int parallel = wall / 1000000000 >= onnxopt_serial_until;
    if (set_threads && all_threads > 0) set_threads(parallel ? all_threads : 1);
    int64_t code = fn(data, dims);
    int64_t took = nanoseconds(CLOCK_MONOTONIC) - wall, busy = nanoseconds(CLOCK_THREAD_CPUTIME_ID) - cpu;
    if (parallel && took >= JUDGED_NS) {
        waited_in_a_row = 2 * busy < took ? waited_in_a_row + 1 : 0;
        if (waited_in_a_row >= WAITED_CALLS) {
            onnxopt_serial_until = (wall + took) / 1000000000 + SERIAL_S;
            waited_in_a_row = 0;
            onnxopt_serial_switches++;
        }
    }
    return code;
}
static OrtStatus *compute(void *kernel, void *context) {
    const Op *op = (const Op *)kernel;
    void *data[MAX_INPUTS + 1];
    int64_t dims[MAX_INPUTS * SLOTS + 5];
    size_t count;
    OrtStatus *status = CALL(KERNEL_CONTEXT_GET_INPUT_COUNT, InputCountFn)(context, &count);
    if (status) return status;
    if (count != op->inputs) return fail("onnxopt: an op has the wrong number of inputs");
    for (size_t i = 0; i < count; i++)
        if ((status = read_input(context, i, op->input_types[i], &data[i], dims + i * SLOTS))) return status;
    if (count > GEOMETRY && dims[GEOMETRY * SLOTS] != 1) return problem(1);
    if (!shape_fns[op->index] || !compute_fns[op->index])
        return fail("onnxopt: this op's kernel was not loaded (make the session with onnxopt.session or "
                    "session_options(model=))");
    int64_t code = shape_fns[op->index](dims, data);
    if (code) return problem(code);
    int64_t *out_dims = dims + MAX_INPUTS * SLOTS;  /* 4 dims, then the rank (3: a Conv1d output, dims 0, 1, 3) */
    int64_t shape[4] = {out_dims[0], out_dims[1], out_dims[2], out_dims[3]};
    if (out_dims[4] == 3) shape[2] = out_dims[3];
    void *output;
    if ((status = CALL(KERNEL_CONTEXT_GET_OUTPUT, GetOutputFn)(context, 0, shape, (size_t)out_dims[4], &output)))
        return status;
    if ((status = CALL(GET_TENSOR_MUTABLE_DATA, MutableDataFn)(output, &data[MAX_INPUTS]))) return status;
    code = governed_compute(compute_fns[op->index], data, dims);
    return code ? problem(code) : NULL;
}

static OrtStatus *op_create(const OpTable *op, const OrtApi *a, const void *info, void **kernel) {
    (void)a; (void)info;
    *kernel = (void *)op;  /* no per-node state: the geometry travels as an input */
    return NULL;
}

#define TABLE {API_VERSION, NULL, op_name, op_provider, op_input_type, op_input_count, op_output_type, \
               op_output_count, NULL, op_destroy, op_required, op_required, op_memory, op_one, op_one, op_one, \
               op_one, op_create, compute}
#define CONV_INPUTS TYPE_FLOAT, TYPE_UINT64, TYPE_FLOAT, TYPE_FLOAT, TYPE_INT64
#define CHAINED_INPUTS TYPE_UINT64, TYPE_UINT64, TYPE_FLOAT, TYPE_FLOAT, TYPE_INT64, TYPE_INT64
static const Op op_tables[OPS] = {
    {TABLE, 0, "BitConv", 5, {CONV_INPUTS}, TYPE_FLOAT},
    {TABLE, 1, "MultibitBitConv", 5, {CONV_INPUTS}, TYPE_FLOAT},
    {TABLE, 2, "PackSigns", 1, {TYPE_FLOAT}, TYPE_UINT64},
    {TABLE, 3, "PackedBitConv", 6, {CHAINED_INPUTS}, TYPE_FLOAT},
    {TABLE, 4, "PackedBitConvSigns", 6, {CHAINED_INPUTS}, TYPE_UINT64},
};

static void *domain;  /* one for the process: a domain must outlive every session that uses it */

OrtStatus *RegisterCustomOps(void *options, const ApiBase *base) {
    api = (void *const *)base->GetApi(API_VERSION);
    if (!api || !problem_text) return NULL;  /* nothing registered; the session then reports the op as unknown */
    if (!domain) {
        OrtStatus *status = CALL(CREATE_CUSTOM_OP_DOMAIN, CreateDomainFn)("com.onnxopt", &domain);
        for (int i = 0; i < OPS && !status; i++)
            status = CALL(CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &op_tables[i].table);
        if (status) { domain = NULL; return status; }
    }
    return CALL(ADD_CUSTOM_OP_DOMAIN, AddDomainFn)(options, domain);
}
