"""Evaluation: attack suites, sanity checks and escalation, the ledger, certification, reports.

It never imports the loop (:mod:`regdefense.training.loop`); it rebuilds models through
:mod:`regdefense.training.restore` and trains the clean surrogate through :mod:`regdefense.training.run`.
"""
