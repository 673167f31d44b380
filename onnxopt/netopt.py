"""CNTK netopt's names (and this package's earlier ones), as thin aliases over `api` in one place.

netopt passes functions where the commands take `module:function` strings; both work, so the aliases
only rename keywords: filter_function → filter_fn, projection_function → projection_fn,
factor_function → factor_fn, train_function → train_hook, fold_batch_norm → not keep_batchnorm.
"""
from __future__ import annotations

from typing import Callable

import onnx

from . import api

_RENAMED = {"filter_function": "filter_fn", "projection_function": "projection_fn", "factor_function": "factor_fn",
            "train_function": "train_hook"}


def _keywords(options: dict) -> dict:
    out = {_RENAMED.get(k, k): v for k, v in options.items() if v is not None or k not in _RENAMED}
    if "fold_batch_norm" in out:
        out["keep_batchnorm"] = not out.pop("fold_batch_norm")
    return out


def factor_dense(model: onnx.ModelProto, projection_function: Callable | None = None,
                 filter_function: Callable | None = None, factor_function: Callable | None = None,
                 **options) -> onnx.ModelProto:
    """netopt's factor_dense: the factored model (default rank: half of min(m, n), as netopt's)."""
    if projection_function is None and not {"rank", "energy", "rank_for"} & set(options):
        options["rank"] = "0.5"
    return factor_with_report(model, projection_function=projection_function, filter_function=filter_function,
                              factor_function=factor_function, **options)[0]


def convert_to_binary_convolution(model: onnx.ModelProto, filter_function: Callable | None = None,
                                  **options) -> onnx.ModelProto:
    """netopt's name: Conv → trainable BinaryConv."""
    return binarize_with_report(model, filter_function=filter_function, stage="transform", **options)[0]


def convert_to_native_binary_convolution(model: onnx.ModelProto) -> onnx.ModelProto:
    """netopt's name: BinaryConv → native bit-packed BitConv."""
    return lower_with_report(model)[0]


def binarize_convolution(model: onnx.ModelProto, train_function: Callable | None = None,
                         filter_function: Callable | None = None, **options) -> onnx.ModelProto:
    """netopt's name: transform, train with `train_function(model) -> model` if given, lower."""
    return binarize_with_report(model, train_function=train_function, filter_function=filter_function,
                                **options)[0]


def factor_with_report(model, **options):
    """Earlier name of `api.factor`."""
    return api.factor(model, **_keywords(options))


def binarize_with_report(model, **options):
    """Earlier name of `api.binarize`."""
    return api.binarize(model, **_keywords(options))


def lower_with_report(model, **options):
    """Earlier name of `api.lower`."""
    return api.lower(model, **_keywords(options))
