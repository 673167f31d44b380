"""Measuring models: inputs (feeds), scores and labels (scores), output differences and latency (compare),
`inspect` (inspect).
"""
