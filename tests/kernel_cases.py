"""What the kernel property tests draw: convolution geometries whose kernels reach 130 taps along one axis (past
64, where a padding bit mask kept in one int64 wrapped and gave wrong outputs silently), with pads up to half the
kernel, and channel counts at the 64-bit word boundaries."""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from onnxopt.kernels.geometry import Geometry

CHANNELS = st.one_of(st.sampled_from([1, 63, 64, 65, 129]), st.integers(1, 140))
LONG_TAPS = (60, 130)


@dataclass(frozen=True)
class ConvCase:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: all begins, then all ends
    sizes: tuple[int, ...]  # input spatial sizes, large enough for one output at least

    def attributes(self) -> dict:
        return {"pads": list(self.pads), "strides": list(self.strides), "dilations": list(self.dilations)}

    def geometry(self, channels: int, auto_pad: str = "NOTSET") -> Geometry:
        attrs = self.attributes() if auto_pad == "NOTSET" else {**self.attributes(), "auto_pad": auto_pad,
                                                                "pads": None}
        return Geometry.from_conv(attrs, len(self.kernel), channels)


@st.composite
def conv_cases(draw, spatial: int = 2, max_k: int = 5, max_pad: int = 3, max_dilation: int = 2,
               max_stride: int = 2) -> ConvCase:
    """Small kernels on every axis, or (one case in three or so) one axis of 60..130 taps, dilation 1."""
    long_axis = draw(st.sampled_from([None, None, *range(spatial)]))
    kernel, strides, dilations, begins, ends, sizes = [], [], [], [], [], []
    for axis in range(spatial):
        if axis == long_axis:
            k, d = draw(st.integers(*LONG_TAPS)), 1
            begin, end = draw(st.integers(0, k // 2 + 1)), draw(st.integers(0, k // 2 + 1))
        else:
            k, d = draw(st.integers(1, max_k)), draw(st.integers(1, max_dilation))
            begin, end = draw(st.integers(0, max_pad)), draw(st.integers(0, max_pad))
        least = max(1, (k - 1) * d + 1 - begin - end)
        kernel.append(k)
        dilations.append(d)
        strides.append(draw(st.integers(1, max_stride)))
        begins.append(begin)
        ends.append(end)
        sizes.append(draw(st.integers(least, least + 12)))
    return ConvCase(tuple(kernel), tuple(strides), tuple(dilations), tuple(begins + ends), tuple(sizes))
