"""Image encoder (pretrained EfficientNet-Lite) and the on-disk feature store it fills."""
from captioner.features.encoder import ENCODERS, Encoder, EncoderSpec, get_spec
from captioner.features.store import FeatureStore, build_features

__all__ = ["ENCODERS", "Encoder", "EncoderSpec", "get_spec", "FeatureStore", "build_features"]
