"""quantize: int8 through onnxruntime.quantization (int8), com.onnxopt ops left float."""
