"""Stand-ins the position tests share: a plugin model class instance with only what its position
code reads, vLLM's model class reduced to what the plugin's overrides call, prompt features."""
from types import SimpleNamespace

import torch

from divprune_ext.vllm.qwen_vl import QwenVLPruning
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

MERGE = 2


def feature(modality, offset, length, thw, seconds=None):
    data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(thw))}
    if seconds is not None:
        data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(seconds))
    return SimpleNamespace(modality=modality, data=data, mm_position=SimpleNamespace(offset=offset, length=length))


def bare(cls, tokens_per_second=2.0, max_tokens=1024, device="cpu"):
    """An instance of a plugin model class with just the config its position code reads and the
    offsets buffer ``MRoPEPruning.__init__`` allocates."""
    model = object.__new__(cls)
    config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=tokens_per_second),
                             text_config=SimpleNamespace(hidden_size=8))
    object.__setattr__(model, "config", config)
    object.__setattr__(model, "position_offsets", torch.zeros(3, max_tokens, dtype=torch.int64, device=device))
    return model


class Parent:
    """Stands for vLLM's model class: what the plugin's overrides call with super(). Its
    ``forward`` is the decoder: it returns (a copy of) the positions it reads."""
    features = None

    def embed_multimodal(self, **kwargs):
        return list(self.features)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self.merged = multimodal_embeddings
        return torch.zeros(len(input_ids), 8, device=input_ids.device)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return positions.clone()


class Stub(QwenVLPruning, Parent):
    """The plugin's M-RoPE code over the stand-in parent; positions as vLLM's Qwen2-VL computes them."""
    vllm_positions = Qwen2VLForConditionalGeneration.get_mrope_input_positions
    iter_mm_grid_thw = Qwen2VLForConditionalGeneration.iter_mm_grid_thw
