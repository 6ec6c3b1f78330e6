"""Headless three-stage trainer for DynamiCrafter on the `dynamicrafter` library's layers.

See training/README.md ("Train your own"). Entry point: ``python -m training.train CONFIG``.
"""
