"""The pipeline's flows as library functions: a typed config in, a typed result out.

`fit_posterior`, `embed`, `zeroshot` and `select` are what the `bayescurate` commands run (jobs/ only parses
flags and prints) and what the demo and annotation campaigns call directly.
"""
