"""generate() refuses a bad prompt with a ValueError naming it, for every family: an empty prompt and
token ids without an embedding row would otherwise fail deep inside (an IndexError in the embedding)."""
import pytest
import torch

from test_models import FAMILIES, tiny_model  # the tests folder is on sys.path (pytest's rootdir import mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_refuses_an_empty_prompt_and_ids_outside_the_vocabulary(family):
    model = tiny_model(family)
    rows = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=r"prompt is empty \(input_ids of shape \[2, 0\]\)"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match=rf"token id {rows}, outside \[0, {rows}\) \(vocab_size 101"):
        model.generate(torch.tensor([[5, rows, 7]]), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match=rf"token id -1, outside \[0, {rows}\)"):
        model.generate(input_ids=torch.tensor([[5, -1, 7]]), max_new_tokens=2, do_sample=False)
    prompt = torch.tensor([[0, rows - 1]])  # both ends of the range are fine
    out = model.generate(prompt, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert out.shape == (1, 4)
