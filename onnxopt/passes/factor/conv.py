"""factor for convolutions: W (O×C×kh×kw) replaced by two or three cheaper convs, standard ops only.

- channel (Zhang et al. 2015): W as the matrix (C·kh·kw) × O of X·W (the im2col view) is factored like a dense
  layer, rank k: Conv(C→k, kh×kw, the original geometry) then Conv(k→O, 1×1) + bias. This is the mode that
  budgets and calibration (whitening by the Gram matrix of the im2col'd inputs) work on.
- tucker (Kim et al. 2015, Tucker-2): W ≈ core ×₀ U_out ×₁ U_in, ranks r1 (input) and r2 (output):
  Conv(C→r1, 1×1) → Conv(r1→r2, kh×kw, the original geometry) → Conv(r2→O, 1×1) + bias; HOSVD then HOOI sweeps.
- spatial (Jaderberg et al. 2014): W as the matrix (C·kh) × (O·kw), rank r: Conv(C→r, kh×1) then
  Conv(r→O, 1×kw) + bias, the vertical geometry on the first, the horizontal on the second (explicit pads only).
Zero padding stays exact in every mode: the convs before the padded one have no bias, so padding their output
equals padding the input. `auto` (the default) takes, per layer, the mode with the lowest weight error at the
size `--rank` gives the channel mode (ranks of the other modes chosen to match that size), and says which; it
leaves the conv dense when that form keeps more than 2/3 of its FLOPs (not measurably faster, see AUTO_MAX_FLOPS).
1-D convs (audio models) are factored in channel mode, the only one that applies to one spatial axis.
Grouped/depthwise convs and 3-D convs are left alone with the reason.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ...graph.nodes import node_attributes as _attrs
from ...graph.selection import layer_paths, matches
from ...kernels.geometry import Geometry, im2col
from ...report import LayerReport
from ..rules import Declined, Rewrite, constant_weight
from . import linalg
from .lowrank import LowRankRule, large_error_warning

HOOI_SWEEPS = 5
# auto leaves a conv dense when its factored form keeps more than this share of the FLOPs: measured in
# onnxruntime (benchmarks/factor_conv.py), factored 3x3 convs run at 0.65–1.0x of their FLOP ratio, so a form
# that saves less than a third of the FLOPs may well run slower than the original
AUTO_MAX_FLOPS = 2 / 3


def tucker2(w: np.ndarray, r1: int, r2: int, sweeps: int = HOOI_SWEEPS):
    """(u_in C×r1, core r2×r1×kh×kw, u_out O×r2, relative error) of W ≈ core ×₀ u_out ×₁ u_in: HOSVD, then
    HOOI sweeps (each factor the leading left singular vectors of W projected on the other)."""
    w64 = np.asarray(w, np.float64)
    o, c = w64.shape[:2]

    def leading(matrix, r):
        return np.linalg.svd(matrix, full_matrices=False)[0][:, :r]

    u_out = leading(w64.reshape(o, -1), r2)
    u_in = leading(w64.transpose(1, 0, 2, 3).reshape(c, -1), r1)
    for _ in range(sweeps):  # optimize=True: pairwise products, not one 6-index loop (minutes at 512 channels)
        u_out = leading(np.einsum("ocij,cr->orij", w64, u_in, optimize=True).reshape(o, -1), r2)
        u_in = leading(np.einsum("ocij,os->csij", w64, u_out, optimize=True).reshape(c, -1), r1)
    core = np.einsum("ocij,os,cr->srij", w64, u_out, u_in, optimize=True)
    # the factors are orthonormal, so the approximation is a projection: ‖W − Ŵ‖² = ‖W‖² − ‖core‖²
    total = float(np.sum(w64 ** 2))
    error = float(np.sqrt(max(total - float(np.sum(core ** 2)), 0.0) / total)) if total else 0.0
    return u_in, core, u_out, error


def _spatial_matrix(w: np.ndarray) -> np.ndarray:
    """M[(c, i), (o, j)] = W[o, c, i, j]: rank r of M is a kh×1 conv to r channels then a 1×kw conv."""
    o, c, kh, kw = w.shape
    return np.asarray(w, np.float64).transpose(1, 2, 0, 3).reshape(c * kh, o * kw)


class ConvRule(LowRankRule):
    """Conv with a constant 3-D or 4-D float weight (Conv1d or Conv2d) and group 1."""

    def check(self, node, ctx):
        w, reason = constant_weight(node, ctx)
        if reason:
            return reason
        if w.ndim not in (3, 4):
            return f"{w.ndim - 2}-D conv: only 1-D and 2-D convs are factored"
        if int(_attrs(node).get("group", 1)) != 1:
            return "grouped/depthwise conv: already factored along channels"
        if w.ndim == 3 and self.options.conv_mode in ("tucker", "spatial") and self.ranks is None:
            return f"1-D conv: --conv-mode {self.options.conv_mode} needs two spatial axes (channel mode applies)"
        if min(w.shape[0], int(np.prod(w.shape[1:]))) < 2:
            return f"weight {'x'.join(map(str, w.shape))} has rank 1 at most"
        if len(node.input) > 2 and node.input[2] and ctx.constant(node.input[2]) is None:
            return "bias is not a constant"
        return None

    def kernel(self, node, ctx) -> np.ndarray:
        return ctx.constant(node.input[1])

    def weight(self, node, ctx):
        w = self.kernel(node, ctx)
        return w.reshape(w.shape[0], -1).T  # (C·kh·kw) × O: the im2col view X·W

    def bias_size(self, node, ctx):
        b = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return int(b.size) if b is not None else 0

    def rows(self, node, ctx):
        """Output pixels per sample (1 when shape inference does not know them: FLOPs then per pixel, and the
        rewrite warns)."""
        return self._pixels(node, ctx) or 1

    def _pixels(self, node, ctx) -> int | None:
        spatial = (ctx.shape(node.output[0]) or [])[2:]
        if len(spatial) not in (1, 2) or not all(isinstance(d, int) for d in spatial):
            return None
        return int(np.prod(spatial))

    def calibration_gram(self, node, x, constant):
        kernel = constant(node.input[1]).shape[2:]
        if len(kernel) == 1:  # a 1-D conv is a 2-D one over a height of 1: the same patches
            x, kernel = x[:, :, None, :], (1, kernel[0])
        kh, kw = kernel
        geometry = Geometry.from_conv(_attrs(node), len(constant(node.input[1]).shape) - 2, x.shape[1])
        gram = 0
        for start in range(0, len(x), 8):  # the patches are kh·kw times the input: a few samples at a time
            cols = im2col(x[start:start + 8], (kh, kw), geometry).astype(np.float64)
            gram = gram + cols.T @ cols
        return gram

    def rewrite(self, node, ctx):
        name = ctx.name_of(node)
        w = self.kernel(node, ctx)
        paths = layer_paths(node)
        pin = next((r for p, r in self.options.tucker_overrides if matches(name, p, paths)), None)
        mode = "tucker" if pin else "channel" if self.ranks is not None else self.options.conv_mode
        k = None if pin else self.choose_rank(name, self.weight(node, ctx), paths,  # budgets allocate channel ranks
                                              key=ctx.layer_id(node))
        if w.ndim == 3:  # channel: the only mode with one spatial axis (check() refused the others)
            if pin:
                raise Declined("1-D conv: a tucker rank needs two spatial axes (channel mode applies)")
            mode = "channel"
        explicit_pads = _attrs(node).get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        spatial_ok = w.ndim == 4 and w.shape[2] * w.shape[3] > 1 and explicit_pads
        automatic = mode == "auto"
        if automatic:
            mode, size = self._best_mode(w, k, spatial_ok)
        elif mode == "tucker":
            size = pin or self._tucker_ranks(w, k)
        elif mode == "spatial":
            if not spatial_ok:
                raise Declined("spatial mode needs a kernel larger than 1x1 and explicit pads (no auto_pad)")
            size = self._spatial_rank(w, k)
        else:
            size = k
        rewrite = {"channel": self._channel, "tucker": self._tucker, "spatial": self._spatial}[mode](node, ctx, w, size)
        layer = rewrite.layer
        if automatic and layer.flops_after > AUTO_MAX_FLOPS * layer.flops_before:
            raise Declined(f"auto: the best form ({mode}) keeps {layer.flops_after / layer.flops_before:.0%} of the "
                           f"FLOPs, too few saved to run faster in onnxruntime; --conv-mode {mode} forces it")
        return rewrite

    # ---- sizes and the automatic choice ----

    def _fraction(self) -> float | None:
        spec = self.options.rank_spec
        return spec.fraction if spec is not None else None

    def _tucker_ranks(self, w, k, target=None) -> tuple[int, int]:
        """(r1, r2): --rank's fraction of C and of O (an integer rank: k for both); with `target`, the ranks
        r1 = f·C, r2 = f·O whose params C·r1 + r1·r2·kh·kw + r2·O come closest to it."""
        o, c, kh, kw = w.shape
        if target is None:
            f = self._fraction()
            return (max(1, round(f * c)), max(1, round(f * o))) if f else (min(k, c), min(k, o))
        a, b = c * o * kh * kw, c * c + o * o  # the params as a quadratic in f
        f = (-b + np.sqrt(b * b + 4 * a * target)) / (2 * a)
        return max(1, min(c, round(f * c))), max(1, min(o, round(f * o)))

    def _spatial_rank(self, w, k, target=None) -> int:
        o, c, kh, kw = w.shape
        full = min(c * kh, o * kw)
        if target is not None:
            return max(1, min(full, int(target // (c * kh + o * kw))))
        f = self._fraction()
        return max(1, min(full, round(f * full) if f else k))

    def _best_mode(self, w, k, spatial_ok: bool):
        """(mode, its size) with the lowest weight error at the size rank k gives the channel mode."""
        o, c, kh, kw = w.shape
        target = k * (c * kh * kw + o)
        candidates = {"channel": (k, float(np.sqrt(linalg.spectrum(w.reshape(o, -1).T).tail_energy()[k])))}
        r1, r2 = self._tucker_ranks(w, k, target=target)
        candidates["tucker"] = ((r1, r2), tucker2(w, r1, r2, sweeps=1)[3])
        if spatial_ok:
            r = self._spatial_rank(w, k, target=target)
            candidates["spatial"] = (r, float(np.sqrt(linalg.spectrum(_spatial_matrix(w)).tail_energy()[r])))
        mode = min(candidates, key=lambda m: candidates[m][1])
        return mode, candidates[mode][0]

    # ---- the three replacements ----

    def _conv(self, ctx, name, x, weight, attrs, suffix, bias=None):
        w_init = ctx.initializer(f"{name}/factor_{suffix}", np.ascontiguousarray(weight))
        inputs, inits = [x, w_init.name], [w_init]
        if bias is not None:
            b_init = ctx.initializer(f"{name}/factor_bias", bias)
            inputs.append(b_init.name)
            inits.append(b_init)
        out = ctx.fresh(f"{name}/factor_{suffix}_out")
        return helper.make_node("Conv", inputs, [out], name=ctx.fresh(f"{name}/factor_{suffix}"), **attrs), inits

    def _chain(self, node, ctx, parts, layer) -> Rewrite:
        """Conv nodes in order, the last one writing the original output."""
        nodes, inits, x = [], [], node.input[0]
        for weight, attrs, suffix, bias in parts:
            n, i = self._conv(ctx, ctx.name_of(node), x, weight, attrs, suffix, bias)
            nodes.append(n)
            inits += i
            x = n.output[0]
        nodes[-1].output[0] = node.output[0]
        unknown = [] if self._pixels(node, ctx) else [
            "conv FLOPs are per output pixel where shape inference does not know the spatial size: give "
            "--input-shape NAME:N,C,H,W"]
        return Rewrite(nodes=nodes, initializers=inits, layer=layer, warnings=large_error_warning(layer) + unknown)

    def _layer(self, node, ctx, w, params_after, flops_after, error, rank, mode) -> LayerReport:
        bias, rows = self.bias_size(node, ctx), self.rows(node, ctx)
        return LayerReport(name=ctx.name_of(node), op_type="Conv", shape="x".join(map(str, w.shape)),
                           action=f"factored ({mode})", rank=rank, params_before=int(w.size) + bias,
                           params_after=params_after + bias, flops_before=2 * int(w.size) * rows,
                           flops_after=flops_after, error=error)

    def _bias(self, node, ctx, dtype):
        b = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return None if b is None else b.astype(dtype)

    def _growth(self, before, after, what):
        if after >= before and not self.options.allow_growth:
            raise Declined(f"{what} gains nothing: {after:,} params >= {before:,}")

    def _channel(self, node, ctx, w, k):
        o, c, kernel = w.shape[0], w.shape[1], w.shape[2:]
        m = c * int(np.prod(kernel))
        self._growth(m * o, k * (m + o), f"rank {k}")
        f = self.factors(ctx.name_of(node), self.weight(node, ctx), k, key=ctx.layer_id(node))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        first = f.u.T.reshape(k, c, *kernel).astype(w.dtype)
        second = f.v.T.reshape(o, k, *[1] * len(kernel)).astype(w.dtype)
        rows = self.rows(node, ctx)
        layer = self._layer(node, ctx, w, k * (m + o), 2 * k * (m + o) * rows, f.error, k, "channel")
        layer.full_rank = min(m, o)
        return self._chain(node, ctx, [(first, attrs, "conv_k", None),
                                       (second, {"kernel_shape": [1] * len(kernel)}, "conv_1x1",
                                        self._bias(node, ctx, w.dtype))], layer)

    def _tucker(self, node, ctx, w, ranks):
        o, c, kh, kw = w.shape
        # a mode's rank cannot exceed its unfolding's: C x (O·kh·kw) and O x (C·kh·kw)
        r1, r2 = min(ranks[0], c, o * kh * kw), min(ranks[1], o, c * kh * kw)
        params = c * r1 + r1 * r2 * kh * kw + r2 * o
        self._growth(int(w.size), params, f"ranks {r1}x{r2}")
        u_in, core, u_out, error = tucker2(w, r1, r2)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rows = self.rows(node, ctx)
        # the first 1x1 runs on the input's pixels, the rest on the output's; with unknown sizes both count 1
        in_shape = ctx.shape(node.input[0]) or []
        in_pixels = int(np.prod(in_shape[2:])) if len(in_shape) == 4 and all(
            isinstance(d, int) for d in in_shape[2:]) else rows
        flops = 2 * (c * r1 * in_pixels + (r1 * r2 * kh * kw + r2 * o) * rows)
        layer = self._layer(node, ctx, w, params, flops, error, None, "tucker")
        layer.shape += f" r={r1}x{r2}"
        dt = w.dtype
        return self._chain(node, ctx, [(u_in.T.reshape(r1, c, 1, 1).astype(dt), {"kernel_shape": [1, 1]}, "in_1x1",
                                        None),
                                       (core.astype(dt), attrs, "core", None),
                                       (u_out.reshape(o, r2, 1, 1).astype(dt), {"kernel_shape": [1, 1]}, "out_1x1",
                                        self._bias(node, ctx, dt))], layer)

    def _spatial(self, node, ctx, w, r):
        o, c, kh, kw = w.shape
        params = r * (c * kh + o * kw)
        self._growth(int(w.size), params, f"rank {r}")
        spec = linalg.spectrum(_spatial_matrix(w))
        f = spec.factors(r)
        a = _attrs(node)
        g = Geometry.from_conv(a, 2, c)
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = g.strides, g.dilations, g.pads
        vertical = f.u.T.reshape(r, c, kh, 1).astype(w.dtype)
        horizontal = f.v.reshape(r, o, kw).transpose(1, 0, 2).reshape(o, r, 1, kw).astype(w.dtype)
        rows = self.rows(node, ctx)
        in_shape = ctx.shape(node.input[0]) or []
        width = in_shape[3] if len(in_shape) == 4 and isinstance(in_shape[3], int) else None
        out_w = (ctx.shape(node.output[0]) or [None] * 4)[3]
        v_pixels = rows // out_w * width if width and isinstance(out_w, int) else rows
        flops = 2 * (r * c * kh * v_pixels + o * r * kw * rows)
        layer = self._layer(node, ctx, w, params, flops, f.error, r, "spatial")
        return self._chain(node, ctx, [
            (vertical, {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1], "pads": [pt, 0, pb, 0]},
             "conv_v", None),
            (horizontal, {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw], "pads": [0, pl, 0, pr]},
             "conv_h", self._bias(node, ctx, w.dtype))], layer)


def rules(options, whitening=None, ranks=None, spectra=None) -> dict:
    return {("", "Conv"): ConvRule(options, whitening, ranks, spectra)}
