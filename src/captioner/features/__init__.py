"""Image encoder (pretrained EfficientNet-Lite) and the on-disk feature store it fills."""
from captioner.features.encoder import (ENCODERS, Encoder, EncoderSpec, ImageError, get_spec, load_image,
                                        preprocess)
from captioner.features.store import CaptionDataset, FeatureStore, build_features, collate_images

__all__ = ["ENCODERS", "Encoder", "EncoderSpec", "ImageError", "get_spec", "load_image", "preprocess",
           "CaptionDataset", "FeatureStore", "build_features", "collate_images"]
