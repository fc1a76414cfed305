"""TensorRT engines from an artifact's ONNX export: the graphs prepared for TensorRT's parser
(`prepare`) and built into engines (`build`).

Importing this package needs neither onnx nor TensorRT; its modules import onnx at their top.
"""
