"""Model references every loader knows by name, and the file names that tell a model family apart."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CLIP = "ViT-B-32:laion2b_s34b_b79k"
DEFAULT_CAPTIONER = "coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k"
BLIP_CAPTIONER = "Salesforce/blip-image-captioning-large"
BLIP_ITM = "Salesforce/blip-itm-large-coco"  # the ITM head BLIP's CapFilt filtered with (ViT-L, COCO-finetuned)

# The small models trained on the shapes world (lab/), committed in the repository.
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
SHAPES_CLIP = str(MODELS_DIR / "shapes-clip")
SHAPES_CAPTIONER = str(MODELS_DIR / "shapes-captioner")
SHAPES_CLIP_WEB = str(MODELS_DIR / "shapes-clip-web")   # trained on clean and web phrasings too
SHAPES_ITM = str(MODELS_DIR / "shapes-itm")

OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
              "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
