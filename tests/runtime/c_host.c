/* A host with no Python: onnxruntime's C API (dlopen'ed), onnxopt's native library registered with
 * RegisterCustomOpsLibrary_V2, one float32 input read from a file, the first output written to a file.
 * usage: c_host LIBONNXRUNTIME LIBONNXOPT|- MODEL INPUT_NAME OUTPUT_NAME INPUT.bin OUTPUT.bin THREADS DIM...
 * Prints "session_ms S run_ms R total_ms T" (total: from main's start to the output in memory).
 * The wheel and the npm package ship no C headers: the API entries are called by their position in the OrtApi
 * table (as runtime/native/library.c does). */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef void *(*Fn)();
typedef struct { void *const *(*GetApi)(uint32_t); const char *(*GetVersionString)(void); } ApiBase;
enum { GET_ERROR_MESSAGE = 2, CREATE_ENV = 3, CREATE_SESSION = 7, RUN = 9, CREATE_SESSION_OPTIONS = 10,
       SET_INTRA_OP_THREADS = 24, CREATE_TENSOR_WITH_DATA = 49, GET_TENSOR_MUTABLE_DATA = 51,
       GET_ELEMENT_COUNT = 64, GET_TYPE_AND_SHAPE = 65, CREATE_CPU_MEMORY_INFO = 69,
       REGISTER_CUSTOM_OPS_LIBRARY_V2 = 228 };
static void *const *api;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void check(void *status, const char *what) {
    if (!status) return;
    const char *(*message)(void *) = (const char *(*)(void *))api[GET_ERROR_MESSAGE];
    fprintf(stderr, "%s: %s\n", what, message(status));
    exit(1);
}

int main(int argc, char **argv) {
    double start = now_ms();
    if (argc < 10) { fprintf(stderr, "usage: see c_host.c\n"); return 2; }
    void *ort = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!ort) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 1; }
    const ApiBase *(*get_base)(void) = (const ApiBase *(*)(void))dlsym(ort, "OrtGetApiBase");
    api = get_base()->GetApi(16);
    if (!api) { fprintf(stderr, "onnxruntime does not serve API 16\n"); return 1; }
    int rank = argc - 9;
    int64_t dims[8], count = 1;
    for (int i = 0; i < rank; i++) count *= dims[i] = atoll(argv[9 + i]);
    float *input = malloc(sizeof(float) * (size_t)count);
    FILE *f = fopen(argv[6], "rb");
    if (!f || fread(input, sizeof(float), (size_t)count, f) != (size_t)count) { fprintf(stderr, "input\n"); return 1; }
    fclose(f);

    void *env, *options, *session, *memory, *value, *output = NULL, *info;
    check(((void *(*)(int, const char *, void **))api[CREATE_ENV])(3, "c_host", &env), "CreateEnv");
    check(((void *(*)(void **))api[CREATE_SESSION_OPTIONS])(&options), "CreateSessionOptions");
    check(((void *(*)(void *, int))api[SET_INTRA_OP_THREADS])(options, atoi(argv[8])), "SetIntraOpNumThreads");
    if (strcmp(argv[2], "-")) /* "-": no custom-op library (a float model) */
        check(((void *(*)(void *, const char *))api[REGISTER_CUSTOM_OPS_LIBRARY_V2])(options, argv[2]),
              "RegisterCustomOpsLibrary_V2");
    double before_session = now_ms();
    check(((void *(*)(void *, const char *, void *, void **))api[CREATE_SESSION])(env, argv[3], options, &session),
          "CreateSession");
    double before_run = now_ms();
    check(((void *(*)(int, int, void **))api[CREATE_CPU_MEMORY_INFO])(1, 0, &memory), "CreateCpuMemoryInfo");
    check(((void *(*)(void *, void *, size_t, const int64_t *, size_t, int, void **))api[CREATE_TENSOR_WITH_DATA])(
              memory, input, sizeof(float) * (size_t)count, dims, (size_t)rank, 1, &value),
          "CreateTensorWithDataAsOrtValue");
    const char *inputs[] = {argv[4]}, *outputs[] = {argv[5]};
    check(((void *(*)(void *, void *, const char *const *, void *const *, size_t, const char *const *, size_t,
                      void **))api[RUN])(session, NULL, inputs, (void *const *)&value, 1, outputs, 1, &output),
          "Run");
    float *result;
    size_t elements;
    check(((void *(*)(void *, void **))api[GET_TENSOR_MUTABLE_DATA])(output, (void **)&result), "GetTensorMutableData");
    check(((void *(*)(void *, void **))api[GET_TYPE_AND_SHAPE])(output, &info), "GetTensorTypeAndShape");
    check(((void *(*)(void *, size_t *))api[GET_ELEMENT_COUNT])(info, &elements), "GetTensorShapeElementCount");
    double done = now_ms();
    f = fopen(argv[7], "wb");
    if (!f || fwrite(result, sizeof(float), elements, f) != elements) { fprintf(stderr, "output\n"); return 1; }
    fclose(f);
    printf("session_ms %.3f run_ms %.3f total_ms %.3f\n", before_run - before_session, done - before_run,
           done - start);
    return 0;
}
