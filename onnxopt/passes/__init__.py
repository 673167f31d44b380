"""Rewrite passes: one folder per technique (factor, binarize, prune, quantize), each a dict of rules keyed by
(domain, op_type) over the one driver in `rules.py`; `budget.py` is what --budget means for all of them.
"""
