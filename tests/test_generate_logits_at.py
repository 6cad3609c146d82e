"""dsv4lib.logits.logits_at: the head on selected positions only equals the full forward's logits there
(DeepseekV4 path, with and without a cache) and the stand-in fallback (models with only forward)."""
import torch

from dsv4lib.config import ModelConfig
from dsv4lib.logits import logits_at
from dsv4lib.model import DeepseekV4


@torch.no_grad()
def test_logits_at_equals_full_forward():
    torch.manual_seed(0)
    m = DeepseekV4(ModelConfig.tiny()).eval()
    ids = torch.randint(0, m.config.vocab_size, (3, 21))
    pos = torch.tensor([20, 7, 13])
    full = m(ids)                                                       # [B, S, V]
    got = logits_at(m, ids, pos)
    assert got.shape == (3, m.config.vocab_size)
    assert (got - full[torch.arange(3), pos]).abs().max() <= 1e-5
    c = m.new_cache(3, 32)
    got_c = logits_at(m, ids, torch.full((3,), 20), c)
    assert c.pos == 21 and (got_c - full[:, -1]).abs().max() <= 1e-5


def test_logits_at_fallback_for_forward_only_models():
    class Standin(torch.nn.Module):
        def forward(self, ids, cache=None):
            return torch.nn.functional.one_hot(ids, 10).float() * 3       # [B, S, V]
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    got = logits_at(Standin(), ids, torch.tensor([0, 2]))
    assert torch.equal(got.argmax(-1), torch.tensor([1, 6]))
