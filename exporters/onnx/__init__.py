"""ONNX export of compressed artifacts (`export`) and its ONNX Runtime loader (`loader`)."""
