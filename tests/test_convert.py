"""`recur convert`: detects the layout, converts, writes the folder atomically, refuses bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from recur.modeling.convert import main as convert_main

pytest.importorskip("fla", reason="flash-linear-attention is not installed")


@pytest.fixture(scope="module")
def fla_gla_folder(tmp_path_factory):
    from fla.models import GLAConfig, GLAForCausalLM

    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                     intermediate_size=64))
    folder = tmp_path_factory.mktemp("fla-gla")
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    return folder, model.state_dict()


def test_converts_an_fla_checkpoint_folder(fla_gla_folder, tmp_path, capsys):
    src, fla_state = fla_gla_folder
    assert convert_main([str(src), str(tmp_path / "out")]) == 0
    assert "recur_gla" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "recur_gla"
    ours = model.state_dict()
    for name, tensor in fla_state.items():
        torch.testing.assert_close(ours[name.replace("g_norm_swish_gate", "g_norm")], tensor)
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left behind


def test_refuses_bad_input_with_one_line(fla_gla_folder, tmp_path, capsys):
    src, fla_state = fla_gla_folder
    assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    assert convert_main([str(src), str(taken)]) == 2
    assert "is not empty" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "precious"

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(llama / "model.safetensors"))
    assert convert_main([str(llama), str(tmp_path / "b")]) == 2
    assert "model_type 'llama' is not a layout recur converts" in capsys.readouterr().err

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "hgrn2", "hidden_size": 32, "num_hidden_layers": 2,
                                                   "vocab_size": 50}))
    save_file({k: v.contiguous() for k, v in fla_state.items()}, str(wrong / "model.safetensors"))
    assert convert_main([str(wrong), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "not a HGRN2 checkpoint" in err and "GLA" in err and not (tmp_path / "c").exists()
