"""Training: labelled DICOM (RSNA layout, labels CSV, class folders) or SYNTHETIC radiographs
→ a verified, versioned ONNX bundle, plus ``lightbox compile`` (INT8, TensorRT engines).

Needs the ``train`` extra (torch, MONAI, onnx, matplotlib); worker nodes never import this
package.
"""
