"""Benchmarks of what :class:`~dgdn_lightning_monitor.MonitoringCallback` costs a training run.

Run ``python -m benchmarks.run`` (or ``make bench``); ``--help`` lists the options. Every comparison runs its
cases interleaved in one process (A B C, B C A, ...) and reports medians with their spread, because the
machines these run on are shared and noisy.
"""
