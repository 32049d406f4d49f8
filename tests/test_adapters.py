import pytest
import torch

from lrc.errors import ConfigError
from lrc.model.adapters import ARCHITECTURES, find_targets
from lrc.model.loading import tiny_random


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_targets_groups_and_gqa_shapes(model_type):
    loaded = tiny_random(model_type=model_type, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         device="cpu")
    cfg = loaded.model.config
    targets = find_targets(loaded.model)
    assert len(targets) == 7 * cfg.num_hidden_layers
    by_kind = {t.kind: t for t in targets if t.block == 0}
    head_dim = loaded.model.get_submodule(by_kind["q_proj"].name).weight.shape[0] // cfg.num_attention_heads
    assert by_kind["k_proj"].shape == (cfg.num_key_value_heads * head_dim, 64)  # from the weights, not hidden_size
    assert by_kind["q_proj"].group == by_kind["k_proj"].group == by_kind["v_proj"].group
    assert by_kind["gate_proj"].group == by_kind["up_proj"].group != by_kind["down_proj"].group
    assert {t.sublayer for t in targets if t.kind in ("q_proj", "o_proj")} == {"attn"}
    assert {t.sublayer for t in targets if t.kind in ("gate_proj", "down_proj")} == {"mlp"}
    # each sublayer's start/end modules exist in every block
    arch = ARCHITECTURES[model_type]
    block = loaded.model.model.layers[0]
    for sub in arch.sublayers:
        block.get_submodule(sub.start), block.get_submodule(sub.end)


def test_unknown_architecture_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    model.config = type("C", (), {"model_type": "rwkv"})()
    with pytest.raises(ConfigError, match="model_type='rwkv' is not in the adapter table"):
        find_targets(model)
