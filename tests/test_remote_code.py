"""A saved recur checkpoint loads with transformers alone (trust_remote_code), recur not importable."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import recur  # noqa: F401

TINY = {
    "recur_griffin": dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, intermediate_size=48,
                          num_attention_heads=4, lru_width=32, attention_window_size=6),
    "recur_gla": dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=2, gate_low_rank_dim=4),
    "recur_hgrn2": dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, expand_ratio=16, intermediate_size=64),
    "recur_mamba2": dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, d_state=8, headdim=8, chunk_size=16),
    "recur_rwkv6": dict(vocab_size=61, hidden_size=64, num_hidden_layers=2, head_size=32, intermediate_size=128,
                        time_mix_low_rank_dim=8, time_decay_low_rank_dim=8),
    "recur_titans": dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=48,
                         variant="mac", memory_chunk_size=4, segment_len=8, attention_window_size=6),
}

# Runs in a fresh Python where `import recur` fails, then compares with the logits saved beside.
LOAD_WITHOUT_RECUR = """
import importlib.abc, sys
class HideRecur(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "recur" or name.startswith("recur."):
            raise ImportError("recur is hidden in this test")
sys.meta_path.insert(0, HideRecur())
import torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
x, expected = torch.load(folder + "/expected.pt")
with torch.no_grad():
    torch.testing.assert_close(model(x).logits, expected)
    greedy = model.generate(x[:1, :4], attention_mask=torch.ones_like(x[:1, :4]), max_new_tokens=5, do_sample=False)
print("OK", type(model).__name__, greedy.shape[1])
"""


@pytest.mark.parametrize("family", sorted(TINY))
def test_saved_folder_loads_without_recur(family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TINY[family])).eval()
    model.save_pretrained(tmp_path)
    assert type(model).__module__.startswith("recur.")  # not a second copy of the package under another name
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    x = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        torch.save((x, model(x).logits), tmp_path / "expected.pt")
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_RECUR, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
                       cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
