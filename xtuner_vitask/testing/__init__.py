from .tiny_internvl import build_internvl2_preset, build_tiny_internvl
from .tiny_llava import build_tiny_llava
