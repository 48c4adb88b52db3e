"""Training the seed model on SYNTHETIC data and exporting it as a verified ONNX bundle.

Needs the ``train`` extra (torch, onnx); worker nodes never import this package.
"""
