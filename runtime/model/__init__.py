"""The merged VLA: bundles, merging, router, reference model, ONNX export and engines."""
