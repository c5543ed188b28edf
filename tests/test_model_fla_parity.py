"""GLA and HGRN2 against fla's own models on CPU, with the same weights.

fla's models need Triton for their kernels, norms and activations, which do not run on a CPU; the
fixture swaps exactly those for fla's own pure-PyTorch reference op (`naive_recurrent_gla`) and
plain torch functions, leaving fla's layer and model code as it is. Weights go through
`recur convert`'s converters (`from_fla`), so this also checks the fla checkpoint layout.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("fla", reason="flash-linear-attention is not installed")

from recur.modeling.gla import GLAForCausalLM  # noqa: E402
from recur.modeling.hgrn2 import HGRN2ForCausalLM  # noqa: E402
from recur.modeling.gla.convert import from_fla as gla_from_fla  # noqa: E402
from recur.modeling.hgrn2.convert import from_fla as hgrn2_from_fla  # noqa: E402


@pytest.fixture(scope="module")
def fla_on_cpu():
    import fla.layers.gla as fla_gla
    import fla.layers.hgrn2 as fla_hgrn2
    import fla.modules.mlp as fla_mlp
    from fla.ops.gla.naive import naive_recurrent_gla

    def naive(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, **kwargs):
        return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state, output_final_state)

    patch = pytest.MonkeyPatch()
    for module in (fla_gla, fla_hgrn2):
        patch.setattr(module, "fused_recurrent_gla", naive)
        patch.setattr(module, "chunk_gla", naive)
    patch.setattr(fla_gla, "RMSNorm", lambda hidden_size, elementwise_affine=True, eps=1e-5, **kw:
                  nn.RMSNorm(hidden_size, eps=eps, elementwise_affine=elementwise_affine))
    patch.setattr(fla_hgrn2, "swish", F.silu)
    patch.setattr(fla_hgrn2, "rms_norm_linear",
                  lambda x, w, b, lw, lb: F.linear(F.rms_norm(x, (x.shape[-1],), w, eps=1e-6), lw, lb))
    patch.setattr(fla_mlp, "swiglu", lambda gate, y: F.silu(gate) * y)
    yield
    patch.undo()


CPU_FLAGS = dict(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)


def _fla_model(kind, **config):
    from fla.models import GLAConfig, GLAForCausalLM as FlaGLA, HGRN2Config, HGRN2ForCausalLM as FlaHGRN2

    torch.manual_seed(0)
    cls, cfg = (FlaGLA, GLAConfig) if kind == "gla" else (FlaHGRN2, HGRN2Config)
    model = cls(cfg(vocab_size=97, hidden_size=64, num_hidden_layers=3, intermediate_size=128, **CPU_FLAGS,
                    **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # away from the init, so every tensor matters
    for module in model.modules():  # fla's activations are Triton kernels: same function in torch
        for name in ("gate_fn", "act_fn"):
            if hasattr(module, name):
                setattr(module, name, F.silu)
    return model


@pytest.mark.parametrize("kind,config,ours,convert", [
    ("gla", dict(num_heads=2), GLAForCausalLM, gla_from_fla),
    ("hgrn2", dict(expand_ratio=16), HGRN2ForCausalLM, hgrn2_from_fla),
])
def test_logits_match_fla(fla_on_cpu, kind, config, ours, convert):
    reference = _fla_model(kind, **config)
    our_config, state = convert(reference.config.to_dict(), reference.state_dict())
    model = ours(our_config).eval()
    model.load_state_dict(state, strict=True)
    for T in (1, 37, 100):
        x = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            diff = (model(x, use_cache=False).logits - reference(x, use_cache=False).logits).abs().max().item()
        assert diff <= 1e-4, f"{kind} T={T}: max |logit difference| {diff:.2e}"


def test_converters_refuse_wrong_or_incomplete_checkpoints(fla_on_cpu):
    gla = _fla_model("gla", num_heads=2)
    config, state = gla.config.to_dict(), gla.state_dict()
    with pytest.raises(ValueError, match="missing model.layers.1.attn.o_proj.weight"):
        gla_from_fla(config, {k: v for k, v in state.items() if k != "model.layers.1.attn.o_proj.weight"})
    with pytest.raises(ValueError, match="unexpected model.layers.9.extra"):
        gla_from_fla(config, {**state, "model.layers.9.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a HGRN2 checkpoint .* looks like GLA"):
        hgrn2_from_fla(config, state)
    with pytest.raises(ValueError, match="use_short_conv=True is not supported"):
        gla_from_fla({**config, "use_short_conv": True}, state)
