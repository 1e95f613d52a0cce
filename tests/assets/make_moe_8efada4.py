"""Write tests/assets/moe-8efada4: a CLIP-MoE saved by the code at 8efada4 (before the plain-MoE split), and
the outputs that code computed, so later code must load it unchanged and compute the same."""

import json
import os
import sys

import torch

sys.path.insert(0, "tests")
import clipmoe
from clipmoe import sparse_upcycle
from clipmoe.assets import TINY_CLIP
from conftest import make_tiny_clip

out = "tests/assets/moe-8efada4"
moe = sparse_upcycle(make_tiny_clip(hidden_act="quick_gelu"), 4, 2, noise=0.05, dispatch="loop")
torch.manual_seed(3)
for m in moe.moe_layers():
    torch.nn.init.normal_(m.router.weight)
    with torch.no_grad():
        m.b1.normal_(std=0.1)
        m.b2.normal_(std=0.1)
moe.save_pretrained(out)
cfg = json.load(open(os.path.join(out, "config.json")))
assert cfg["moe"]["dispatch"] == "loop", cfg["moe"]
torch.manual_seed(1)
pixels = torch.randn(2, 3, 32, 32)
text = moe.tokenizer(["a photo of a red cube", "blue sphere on the left"])
ref = clipmoe.load(out)
shipped = clipmoe.load(TINY_CLIP)
torch.manual_seed(2)
tiny_pixels = torch.randn(2, 3, 48, 48)
tiny_text = shipped.tokenizer(["a photo of a red cube", "blue sphere on the left"])
with torch.no_grad():
    expected = {
        "pixels": pixels,
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "image": ref.encode_image(pixels),
        "text": ref.encode_text(**text),
        "tiny_pixels": tiny_pixels,
        "tiny_input_ids": tiny_text["input_ids"],
        "tiny_attention_mask": tiny_text["attention_mask"],
        "tiny_image": shipped.encode_image(tiny_pixels),
        "tiny_text": shipped.encode_text(**tiny_text),
    }
torch.save(expected, os.path.join(out, "expected_outputs.pt"))
print({k: tuple(v.shape) for k, v in expected.items()})
