"""Trainer of the embedded model pair: ``hedgerow train-pair``, or ``python -m hedgerow.server.embedded.train``.

``cli`` parses the flags and runs the pipeline (its docstring describes the stages);
``corpus``, ``models``, ``loop``, ``distill`` and ``evaluate`` hold the stages.
"""
