//! Building a release (manifest + bundle) from an ONNX model: shared by `edgefleet bundle build`
//! and the controller's model registry.
