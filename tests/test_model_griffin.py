"""Griffin / Hawk (recur_griffin): parity with transformers' RecurrentGemma.

The generic family tests (generation, padding, packing, save/load, ...) run in test_models.py for
a Griffin and a Hawk configuration.
"""
import torch

import recur  # noqa: F401  registers the families
from recur.modeling.griffin import GriffinForCausalLM


def ids(*shape, seed=1, vocab=101):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_parity_with_transformers_recurrent_gemma():
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from recur.modeling.griffin.convert import from_transformers

    hf_config = RecurrentGemmaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=2 * 96, num_attention_heads=4, num_hidden_layers=4,
        lru_width=64, attention_window_size=16, conv1d_width=4, logits_soft_cap=30.0, rms_norm_eps=1e-6,
        block_types=["recurrent", "recurrent", "attention"], num_key_value_heads=1, pad_token_id=0, bos_token_id=2,
        eos_token_id=1, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = RecurrentGemmaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    config, state = from_transformers(hf_config.to_dict(), hf.state_dict())
    ours = GriffinForCausalLM(config).eval()
    ours.load_state_dict(state, strict=False)
    missing = set(ours.state_dict()) - set(state) - {"lm_head.weight"}
    assert not missing, missing
    x = ids(2, 12, vocab=97)
    with torch.no_grad():
        ref = hf(x, use_cache=False).logits
        got = ours(x, use_cache=False).logits
    assert (ref - got).abs().max() <= 1e-4, (ref - got).abs().max()
    prompt = ids(1, 5, seed=4, vocab=97)
    kw = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(hf.generate(prompt, **kw), ours.generate(prompt, **kw))
