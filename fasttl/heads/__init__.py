"""Heads on frozen features: a linear or MLP head trained on a feature cache (train), the
closed-form L2 solver for linear heads (solver), their strength and epochs chosen on validation
(tuning), and the epoch loop every trained model shares (fit).

    fit = fasttl.heads.train_head(cache, kind="linear", epochs=10)   # fit.head, fit.history
"""
from fasttl.heads.train import HeadFit, evaluate_head, make_head, predict_cache, train_head

__all__ = ["HeadFit", "evaluate_head", "make_head", "predict_cache", "train_head"]
