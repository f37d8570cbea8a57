from .tiny_internvl import build_tiny_internvl
