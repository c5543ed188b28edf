"""A saved recur checkpoint loads with transformers alone (trust_remote_code), recur not importable."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import recur  # noqa: F401
from recur.modeling import FAMILIES

# the first test config each family declares
TINY = {family.model_type: next(iter(family.tiny.values())) for family in FAMILIES.values()}

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


@pytest.mark.slow  # a Python subprocess per family
@pytest.mark.parametrize("family", sorted(TINY))
def test_saved_folder_loads_without_recur(family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TINY[family])).eval()
    model.save_pretrained(tmp_path)
    assert type(model).__module__.startswith("recur.")  # not a second copy of the package under another name
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    x = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.save((x, model(x).logits), tmp_path / "expected.pt")
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_RECUR, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
                       cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
