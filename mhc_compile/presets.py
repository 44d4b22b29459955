"""Small built-in models for ``mhc-compile inspect`` (random weights from configs: no downloads)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("this preset needs the 'transformers' package: pip install transformers") from e


def _ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16))


def gpt2():
    t = _transformers()
    cfg = t.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    return t.GPT2LMHeadModel(cfg), (_ids(),)


def llama():
    t = _transformers()
    cfg = t.LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=128)
    return t.LlamaForCausalLM(cfg), (_ids(),)


def bert():
    t = _transformers()
    cfg = t.BertConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128)
    return t.BertModel(cfg), (_ids(),)


def vit():
    t = _transformers()
    cfg = t.ViTConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                      image_size=32, patch_size=8)
    return t.ViTModel(cfg), (torch.randn(2, 3, 32, 32),)


def gpt_neox():
    t = _transformers()
    cfg = t.GPTNeoXConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128)
    return t.GPTNeoXForCausalLM(cfg), (_ids(),)


def tinygpt():
    from mhc_compile.demo import TinyGPT

    return TinyGPT(), (torch.randint(0, 256, (2, 64)),)


PRESETS: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "gpt_neox": gpt_neox, "tinygpt": tinygpt,
}


def load(spec: str) -> tuple[nn.Module, tuple[Any, ...]]:
    """A preset name, or ``pkg.module:factory`` where factory() returns (model, example_inputs)."""
    if spec in PRESETS:
        return PRESETS[spec]()
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: use one of {sorted(PRESETS)} or 'pkg.module:factory'")
    module_name, attr = spec.split(":", 1)
    factory = getattr(importlib.import_module(module_name), attr)
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ValueError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
