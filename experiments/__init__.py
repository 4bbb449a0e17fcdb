"""Experiment drivers: train methods with the same budget and compare them (``python experiments/compare.py``).

They import the :mod:`fedbrats` package; the package never imports them.
"""
