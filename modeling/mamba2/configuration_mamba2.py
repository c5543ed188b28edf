"""Configuration of Mamba-2 (SSD, arXiv 2405.21060), with mamba_ssm's field names and defaults.

Defaults are state-spaces/mamba2-130m. `d_model` and `n_layer` (mamba_ssm's names) are accepted
for hidden_size and num_hidden_layers. `vocab_size` is the vocabulary as given; the model's
embedding and head are padded up to a multiple of `pad_vocab_size_multiple` where the model is
built, as mamba_ssm's MambaLMHeadModel does (50277 -> 50288: `padded_vocab_size`), so a config
means the same when written and read.
"""
from transformers import PretrainedConfig


class Mamba2Config(PretrainedConfig):
    model_type = "recur_mamba2"
    attribute_map = {"d_model": "hidden_size", "n_layer": "num_hidden_layers"}

    def __init__(self, vocab_size=50277, hidden_size=768, num_hidden_layers=24, d_state=128, d_conv=4, expand=2,
                 headdim=64, ngroups=1, chunk_size=256, conv_bias=True, bias=False, dt_min=1e-3, dt_max=0.1,
                 dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), A_init_range=(1.0, 16.0), norm_eps=1e-5,
                 residual_in_fp32=True, pad_vocab_size_multiple=16, initializer_range=0.02,
                 rescale_prenorm_residual=True, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                 pad_token_id=0, use_cache=True, **kwargs):
        hidden_size = kwargs.pop("d_model", hidden_size)
        num_hidden_layers = kwargs.pop("n_layer", num_hidden_layers)
        self.vocab_size = vocab_size
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.d_state, self.d_conv, self.expand, self.headdim, self.ngroups = d_state, d_conv, expand, headdim, ngroups
        self.chunk_size, self.conv_bias, self.bias = chunk_size, conv_bias, bias
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_limit = tuple(float(x) for x in dt_limit)
        self.A_init_range = tuple(float(x) for x in A_init_range)
        self.norm_eps, self.residual_in_fp32 = norm_eps, residual_in_fp32
        self.initializer_range, self.rescale_prenorm_residual = initializer_range, rescale_prenorm_residual
        self.use_cache = use_cache
        d_inner = expand * hidden_size
        if d_inner != int(d_inner) or int(d_inner) % headdim:
            raise ValueError(f"expand·hidden_size = {d_inner} must be a whole multiple of headdim = {headdim}")
        if self.num_heads % ngroups:
            raise ValueError(f"ngroups = {ngroups} must divide the number of heads {self.num_heads}")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    # Derived sizes: properties, so they are never saved and can never disagree with the fields.
    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to pad_vocab_size_multiple."""
        multiple = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % multiple if multiple > 1 else self.vocab_size

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.hidden_size)

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels through the short convolution: x, B and C."""
        return self.d_inner + 2 * self.ngroups * self.d_state
