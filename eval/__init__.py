"""Evaluation: objective metrics, peer codecs (Opus, Codec 2), rate-quality runs and reports."""

SAMPLE_RATE = 16000
"""Every metric runs on 16 kHz mono float arrays; inputs and decoded audio are resampled to it."""
