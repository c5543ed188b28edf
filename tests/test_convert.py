"""`recur convert`: detects the layout, converts, writes the folder atomically, refuses bad input."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from recur.cli import main as cli_main


def convert_main(args):
    """`recur convert ARGS` as the command line runs it (errors: one line, exit 2)."""
    return cli_main(["convert", *args])


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


def test_converts_a_transformers_mamba2_folder_and_a_blinkdl_rwkv6_file(tmp_path):
    """The other two layouts through the command: logits equal the source model's (Mamba-2) or the
    converter's own output (RWKV-6, whose reference is tested in test_model_rwkv6)."""
    import test_model_mamba2 as mamba2_tests  # the other test files' model builders
    import test_model_rwkv6 as rwkv6_tests
    hf = mamba2_tests.hf_mamba2(n_groups=1, tie=True)
    hf.save_pretrained(tmp_path / "hf-mamba2")
    assert convert_main([str(tmp_path / "hf-mamba2"), str(tmp_path / "m2")]) == 0
    x = torch.randint(0, hf.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").eval()
    with torch.no_grad():
        diff = (ours(x).logits[..., :hf.config.vocab_size] - hf(x).logits).abs().max().item()
    assert ours.config.model_type == "recur_mamba2" and diff <= 1e-4

    state = rwkv6_tests.blinkdl_state_dict()
    torch.save(state, tmp_path / "rwkv.pth")
    assert convert_main([str(tmp_path / "rwkv.pth"), str(tmp_path / "r6")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "r6")
    assert loaded.config.model_type == "recur_rwkv6"
    from recur.modeling.rwkv6.convert import from_blinkdl

    for name, tensor in from_blinkdl(state)[1].items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def _one_line_error(args, capsys):
    assert convert_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_every_layout_converts_from_the_folder_its_library_saves(tmp_path, capsys):
    """Folders written by the reference libraries' own save_pretrained at the installed versions (tied
    heads are not saved by transformers 5.24): recur convert reads each, and the logits agree."""
    from fla.models import HGRN2Config, HGRN2ForCausalLM
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(0)
    sources = {
        "griffin": RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=192, num_attention_heads=4, num_hidden_layers=3,
            lru_width=64, attention_window_size=16, tie_word_embeddings=True, pad_token_id=0)),
        "hgrn2": HGRN2ForCausalLM(HGRN2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, expand_ratio=16,
                                              intermediate_size=64)),
    }
    x = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    for name, source in sources.items():
        source.eval()
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        source.save_pretrained(tmp_path / name)
        assert convert_main([str(tmp_path / name), str(tmp_path / f"{name}-recur")]) == 0, capsys.readouterr().err
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-recur").eval()
        if name == "hgrn2":
            continue  # fla's HGRN2 needs Triton to run; its logits are compared in test_model_fla_parity
        with torch.no_grad():
            assert (ours(x).logits - source(x, use_cache=False).logits).abs().max() <= 1e-4


def test_unreadable_weights_and_a_file_destination_are_one_line(fla_gla_folder, tmp_path, capsys):
    src, _ = fla_gla_folder
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = _one_line_error([str(broken), str(tmp_path / "a")], capsys)
    assert "not a readable safetensors file" in err and not (tmp_path / "a").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("precious")
    assert "is a file" in _one_line_error([str(src), str(a_file)], capsys) and a_file.read_text() == "precious"
    (broken / "config.json").write_text("{not json")
    assert "config" in _one_line_error([str(broken), str(tmp_path / "b")], capsys)
