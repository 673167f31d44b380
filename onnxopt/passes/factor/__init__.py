"""factor: low-rank dense layers (dense, lowrank: W ≈ U·V at rank k), convs as two or three smaller convs
(conv: channel, Tucker-2, spatial), ranks under a --budget (budget), the SVDs (linalg).
"""
