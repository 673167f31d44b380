"""Eight-lane uint64 vectors for numba kernels: a numba type backed by LLVM's <8 x i64>.

numba vectorizes loops, but it cannot keep a block of accumulators in registers across a reduction
loop (they live in heap arrays it must reload and store). A `vec8` value is an SSA register
that LLVM lowers to one zmm register with AVX-512 (VPOPCNTQ) or two ymm registers with AVX2 (popcount
through byte shuffles), so the kernel reads like scalar code and compiles to register-blocked SIMD.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

LANES = 8
_I64 = ir.IntType(64)
_VEC = ir.VectorType(_I64, LANES)


class Vec8Type(types.Type):
    def __init__(self):
        super().__init__(name="Vec8xU64")


vec8 = Vec8Type()


@register_model(Vec8Type)
class _Vec8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


@intrinsic
def popcount(typingctx, x):
    """LLVM's ctpop on one uint64 (numba has no popcount builtin); returns int64 so sums stay integer."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


@intrinsic
def zeros(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_VEC, None)

    return vec8(), codegen


def _lane_pointer(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


@intrinsic
def word(typingctx, array, index):
    """array[index] of a C-contiguous 1-D uint64 array, without numba's negative-index wraparound
    (the kernel's indices are never negative; the check costs three instructions per load)."""
    if not (isinstance(array, types.Array) and array.dtype == types.uint64 and array.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(_lane_pointer(context, builder, signature.args[0], args[0], args[1]))

    return types.uint64(array, types.intp), codegen


@intrinsic
def load(typingctx, array, index):
    """array[index : index + 8] of a C-contiguous 1-D uint64 array, as one vector (unaligned load)."""
    if not (isinstance(array, types.Array) and array.dtype == types.uint64 and array.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        pointer = _lane_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(pointer, _VEC.as_pointer()), align=8)

    return vec8(array, types.intp), codegen


@intrinsic
def load_strided(typingctx, array, first, second, stride):
    """Lanes 0-3: array[first + lane·stride]; lanes 4-7: array[second + (lane − 4)·stride] (second = first + 4·stride
    for 8 neighbouring pixels of one row, or the start of the next row for two short rows), of a C-contiguous 1-D
    uint64 array."""
    if not (isinstance(array, types.Array) and array.dtype == types.uint64 and array.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        vector = ir.Constant(_VEC, None)
        for lane in range(LANES):
            start = args[1] if lane < LANES // 2 else args[2]
            at = builder.add(start, builder.mul(args[3], ir.Constant(args[3].type, lane % (LANES // 2))))
            vector = builder.insert_element(vector, builder.load(builder.gep(data, [at])),
                                            ir.Constant(ir.IntType(32), lane))
        return vector

    return vec8(array, types.intp, types.intp, types.intp), codegen


@intrinsic
def load_halves(typingctx, array, first, second):
    """array[first : first + 4] in lanes 0-3 and array[second : second + 4] in lanes 4-7 (two short output rows
    in one vector), of a C-contiguous 1-D uint64 array."""
    if not (isinstance(array, types.Array) and array.dtype == types.uint64 and array.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        half = ir.VectorType(_I64, LANES // 2)
        parts = [builder.load(builder.bitcast(_lane_pointer(context, builder, signature.args[0], args[0], at),
                                              half.as_pointer()), align=8) for at in (args[1], args[2])]
        return builder.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                                      list(range(LANES))))

    return vec8(array, types.intp, types.intp), codegen


def _broadcast_xor(builder, word_value, vector_value):
    """broadcast(word) ^ vector."""
    lane0 = builder.insert_element(ir.Constant(_VEC, None), word_value, ir.Constant(ir.IntType(32), 0))
    broadcast = builder.shuffle_vector(lane0, ir.Constant(_VEC, None),
                                       ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))
    return builder.xor(broadcast, vector_value)


@intrinsic
def xor_popcount_add(typingctx, acc, word, vector):
    """acc + popcount(broadcast(word) ^ vector), lane by lane."""
    if not (acc == vec8 and vector == vec8 and word == types.uint64):
        return None

    def codegen(context, builder, signature, args):
        acc_value, word_value, vector_value = args
        # llvmlite's builder.ctpop accepts scalars only; the intrinsic itself takes vectors
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC]), "llvm.ctpop.v8i64")
        return builder.add(acc_value, builder.call(ctpop, [_broadcast_xor(builder, word_value, vector_value)]))

    return vec8(vec8, types.uint64, vec8), codegen


@intrinsic
def xor_popcount_add_bytes(typingctx, acc, word, vector):
    """Like xor_popcount_add, but the counts stay per byte (acc holds 64 byte counters): without a vector
    popcount (AVX2), a byte count is a nibble-table lookup, and the per-lane sum of the bytes (vpsadbw) is left
    to `add_byte_sums`, once per BYTE_STEPS steps (a byte count grows by at most 8 a step: 31 steps fit)."""
    if not (acc == vec8 and vector == vec8 and word == types.uint64):
        return None

    def codegen(context, builder, signature, args):
        acc_value, word_value, vector_value = args
        bytes_type = ir.VectorType(ir.IntType(8), 8 * LANES)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bytes_type, [bytes_type]),
                                               "llvm.ctpop.v64i8")
        counts = builder.call(ctpop, [builder.bitcast(_broadcast_xor(builder, word_value, vector_value), bytes_type)])
        return builder.bitcast(builder.add(builder.bitcast(acc_value, bytes_type), counts), _VEC)

    return vec8(vec8, types.uint64, vec8), codegen


BYTE_STEPS = 31


@intrinsic
def add_byte_sums(typingctx, acc, byte_counts):
    """acc + the sum of the 8 byte counters of each lane of byte_counts."""
    if not (acc == vec8 and byte_counts == vec8):
        return None

    def codegen(context, builder, signature, args):
        acc_value, value = args

        def splat(v):
            return ir.Constant(_VEC, [v] * LANES)

        # bytes → 16-bit pairs (≤ 2·248), then the four pairs of each lane (≤ 1984) into its low 16 bits
        pairs = builder.add(builder.and_(value, splat(0x00FF00FF00FF00FF)),
                            builder.and_(builder.lshr(value, splat(8)), splat(0x00FF00FF00FF00FF)))
        pairs = builder.add(pairs, builder.lshr(pairs, splat(16)))
        pairs = builder.add(pairs, builder.lshr(pairs, splat(32)))
        return builder.add(acc_value, builder.and_(pairs, splat(0xFFFF)))

    return vec8(vec8, vec8), codegen


@intrinsic
def store(typingctx, array, index, value):
    """array[index : index + 8] = value narrowed to int32, for a C-contiguous 1-D int32 array (popcount sums
    of a convolution stay far below 2³¹; int32 halves the epilogue's memory and converts to float32 in
    one AVX2 instruction, where int64 needs AVX-512DQ)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int32 and array.ndim == 1 and value == vec8):
        return None

    def codegen(context, builder, signature, args):
        pointer = _lane_pointer(context, builder, signature.args[0], args[0], args[1])
        narrow = builder.trunc(args[2], ir.VectorType(ir.IntType(32), LANES))
        builder.store(narrow, builder.bitcast(pointer, narrow.type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(array, types.intp, vec8), codegen
