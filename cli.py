"""Run onnxopt from a checkout without installing it: `python cli.py factor models/mlp.onnx --rank 0.6`."""
from onnxopt.cli import main

if __name__ == "__main__":
    main()
