"""Checkpoints of converted models: the sites they hold, creating those sites on a model that lacks them, and
reading them from files.

A converted model's ``state_dict`` holds, for each site, ``<owner>.mhc_<name>.{phi, bias, alpha}`` and the site's
layout (n, width, mode) as ``<...>._extra_state`` (``params.encode_layout``). ``torch.save`` / safetensors / Hugging
Face's ``save_pretrained`` keep them all. Loading is where they get lost: ``from_pretrained`` builds the model from
its class, which has no sites, and drops the checkpoint's mHC tensors with a log line. So:

- ``load_sites`` reads a checkpoint's mHC tensors (a state dict, a file, or a Hugging Face directory) and loads them
  into the model, creating its sites from their saved layouts;
- a converted model with a Hugging Face-style ``config`` records ``config.mhc_compile = {"n", "mode"}``, which
  ``save_pretrained`` writes into config.json; creating sites afresh on a model whose config came with that record
  raises (``check_not_dropped``), since its trained sites would be replaced by new ones without a word.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from mhc_compile import distributed
from mhc_compile.config import MHCConfig
from mhc_compile.errors import MHCConversionError
from mhc_compile.runtime.params import MHCSite, add_site, decode_layout

SITE_LEAVES = ("phi", "bias", "alpha", "_extra_state")
CONFIG_KEY = "mhc_compile"


def is_site_key(key: str) -> bool:
    """Whether a state-dict key is one of an mHC site's tensors (``....mhc_attn.phi``)."""
    parts = key.rsplit(".", 2)
    return len(parts) >= 2 and parts[-1] in SITE_LEAVES and parts[-2].startswith("mhc_")


def checkpoint_sites(state_dict: Mapping) -> dict[str, dict]:
    """Site path -> {"n", "width", "mode"} for every mHC site a converted model's state_dict holds."""
    suffix = "._extra_state"
    sites = {}
    for key, value in state_dict.items():
        if key.endswith(suffix) and is_site_key(key):
            layout = decode_layout(value)
            if layout is not None:
                sites[key[: -len(suffix)]] = layout
    return sites


def sites_from_checkpoint(model: nn.Module, state_dict: Mapping, *, strict: bool = True) -> list[str]:
    """Create on ``model`` the MHCSite modules the checkpoint holds and the model lacks; check the others.

    Returns the paths created. Raises ValueError naming the site when the model has the site with another
    layout, when its owner module does not exist, or (``strict``) when the model has mHC sites the
    checkpoint lacks.
    """
    wanted = checkpoint_sites(state_dict)
    have = {path: m for path, m in model.named_modules() if isinstance(m, MHCSite)}
    if strict:
        extra = sorted(set(have) - set(wanted))
        if extra:
            raise ValueError(
                f"mhc: the model has mHC sites the checkpoint lacks ({', '.join(extra[:4])}"
                f"{', ...' if len(extra) > 4 else ''}): the checkpoint was saved from a model that was not "
                f"converted, or converted with other sites; pass strict=False to keep their initial values"
            )
    created = []
    for path, layout in wanted.items():
        owner_path, _, name = path.rpartition(".")
        if path in have:
            mine = have[path].layout()
            if mine != layout:
                raise ValueError(
                    f"mHC checkpoint mismatch at {path!r}: the checkpoint's site was converted with {layout}, this "
                    f"model's with {mine}; prepare the model with the same n and mode as the checkpoint, or load "
                    f"into a model that was not prepared"
                )
            continue
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError:
            raise ValueError(
                f"mhc: the checkpoint has mHC site {path!r} but the model has no module {owner_path!r} to put it "
                f"on: the checkpoint comes from another architecture"
            ) from None
        if getattr(owner, name, None) is not None:
            raise ValueError(f"mhc: cannot create mHC site {path!r}: the attribute exists and is a "
                             f"{type(getattr(owner, name)).__name__}")
        distributed.check_can_create(  # a wrapper that already listed its parameters would miss the site
            model, path, fix="mhc_compile.load_state_dict / load_sites before wrapping the model")
        phi = state_dict.get(f"{path}.phi")
        dtype = phi.dtype if isinstance(phi, torch.Tensor) else torch.float32
        device = next((p.device for p in owner.parameters()), torch.device("cpu"))
        add_site(model, owner, path, MHCSite(  # index and alpha_init matter only to a later reset_parameters
            layout["n"], layout["width"], layout["mode"], index=0, alpha_init=MHCConfig.alpha_init, dtype=dtype,
            device=device))
        created.append(path)
    if wanted:  # a loaded model's sites all exist: its config records the conversion even if none was created
        first = next(iter(wanted.values()))
        mark_config(model, first["n"], first["mode"])
    return created


# --- reading a checkpoint's mHC tensors -----------------------------------------------------------------------


_HF_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def _checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint: the file itself, or a Hugging Face directory's (sharded or not)."""
    if os.path.isdir(path):
        found = next((os.path.join(path, f) for f in _HF_FILES if os.path.isfile(os.path.join(path, f))), None)
        if found is None:
            raise FileNotFoundError(f"mhc: {path!r} holds none of {', '.join(_HF_FILES)}")
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mhc: no checkpoint at {path!r}")
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(os.path.dirname(path), s) for s in shards]
    return [path]


def read_site_tensors(checkpoint: Mapping | str | os.PathLike) -> dict:
    """The mHC site entries (``is_site_key``) of a state dict, a checkpoint file or a Hugging Face directory.

    ``.safetensors`` files are read key by key (only the sites' tensors are loaded); other files go through
    ``torch.load(weights_only=True)``."""
    if isinstance(checkpoint, Mapping):
        return {k: v for k, v in checkpoint.items() if is_site_key(k)}
    out = {}
    for file in _checkpoint_files(os.fspath(checkpoint)):
        if file.endswith(".safetensors"):
            from safetensors import safe_open  # installed with transformers, whose files these are

            with safe_open(file, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if is_site_key(k)})
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in state.items() if is_site_key(k)})
    return out


def load_sites(model: nn.Module, checkpoint: Mapping | str | os.PathLike, *, strict: bool = True) -> list[str]:
    """Load a converted checkpoint's mHC sites into ``model``, creating the sites it lacks; returns their paths.

    For models whose other weights are already loaded, typically by Hugging Face's ``from_pretrained``, which
    drops the mHC tensors it does not know. ``checkpoint`` is a state dict, a checkpoint file (``.safetensors``
    or ``torch.save``), or a ``save_pretrained`` directory. Only the sites' entries are read and loaded.
    Raises ValueError when the checkpoint holds no site, on a layout mismatch, and (``strict``) when the model
    has sites the checkpoint lacks or a site's tensor is missing.
    """
    state = read_site_tensors(checkpoint)
    sites = checkpoint_sites(state)
    if not sites:
        raise ValueError("mhc: the checkpoint holds no mHC site (no '<...>.mhc_<name>._extra_state' entry with a "
                         "site layout): it was saved from a model that was not converted")
    sites_from_checkpoint(model, state, strict=strict)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if is_site_key(k)]
    if unexpected:
        raise ValueError(f"mhc: checkpoint entries with no site to load into: {', '.join(unexpected[:4])}")
    missing = [k for k in missing if is_site_key(k)]
    if strict and missing:
        raise ValueError(f"mhc: the checkpoint lacks these site tensors: {', '.join(missing[:4])}")
    return sorted(sites)


# --- the record in a Hugging Face-style config ----------------------------------------------------------------


# Configs this process recorded the conversion in, by id (configs define __eq__ and are unhashable). A config
# with the record that is not here came from a file: its model was saved converted.
_MARKED: dict[int, weakref.ref] = {}


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    return config if config is not None and callable(getattr(config, "to_dict", None)) else None


def _marked_here(config) -> bool:
    ref = _MARKED.get(id(config))
    return ref is not None and ref() is config


def mark_config(model: nn.Module, n: int, mode: str) -> None:
    """Record the conversion in ``model.config`` (when it has a Hugging Face-style one), for config.json."""
    config = _config_of(model)
    if config is None:
        return
    setattr(config, CONFIG_KEY, {"n": n, "mode": mode})
    _MARKED[id(config)] = weakref.ref(config, lambda _, key=id(config): _MARKED.pop(key, None))


def check_not_dropped(model: nn.Module, path: str) -> None:
    """Raise before creating site ``path`` afresh on a model whose config says it was saved converted."""
    config = _config_of(model)
    saved = getattr(config, CONFIG_KEY, None) if config is not None else None
    if saved is None or _marked_here(config):
        return
    raise MHCConversionError(
        f"mhc: this model's config records a conversion ({CONFIG_KEY}={saved}): it was saved from a converted "
        f"model, but it has no mHC site at {path!r}, so the checkpoint's sites were dropped (Hugging Face's "
        f"from_pretrained drops weights its model class does not have). Load them before compiling: "
        f"mhc_compile.load_sites(model, <the checkpoint directory or file>). To convert afresh instead, delete "
        f"the record: del model.config.{CONFIG_KEY}"
    )
