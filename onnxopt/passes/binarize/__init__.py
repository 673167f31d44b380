"""binarize: Conv → BinaryConv / MultibitConv (conv), lowered to bit-packed BitConv (lower) with a following
BatchNormalization folded (fold); the standard-ops form for external trainers (emulate) and its inverse
(unbinarize).
"""
