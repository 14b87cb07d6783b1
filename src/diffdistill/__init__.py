"""diffdistill: dataset distillation by generation with a class-conditional U-ViT."""
__version__ = "0.1.0"
