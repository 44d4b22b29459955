"""The per-site mHC parameters: ordinary ``nn.Parameter``s on the user's modules.

Each residual site gets an ``MHCSite`` submodule on the module that owns its add (e.g.
``transformer.h.0.mhc_attn``), so ``model.parameters()``, ``state_dict()``, optimizers, DDP/FSDP and
checkpointing see them like any other weight. This module also keeps the registry of converted models
and the optimizer check that catches an optimizer built before lazily created parameters existed.

Initialisation (DESIGN.md section 2, the contract):
* phi = 0: the dynamic part is exactly zero at init, so the map is the static one, H = f(b).
* H_post = 1 (b_post = 0 in mhc since 2 sigmoid(0) = 1; b_post = 1 in hc) and rows of H_res sum to 1
  (Sinkhorn ends on a row normalisation; identity in hc): with all n streams equal to x at the head,
  every stream stays equal to the original residual stream through the chain, and the collapse (mean)
  returns it. sum_i H_pre[i] = 1 makes the sublayer input x_in equal x. Function preserved.
* Symmetry broken: H_pre leans on stream (k mod n) at site k (mhc: weight (n+1)/2n there, 1/2n on the
  others; hc: one-hot as in Zhu et al.), so later sites read different streams, the gradients of the
  streams' H_post differ, and the streams drift apart under training.
* Gates small: alpha = alpha_init (paper 0.01) for the pre, post and res groups.
* H_res starts near the identity (mhc: diagonal 0.9 of each row), keeping streams apart as HC does.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import nn

from mhc_compile import distributed
from mhc_compile.errors import MHCConversionError
from mhc_compile.kernels.reference import num_coeffs

log = logging.getLogger("mhc_compile")

RES_DIAG_INIT = 0.9

# --- a site's layout in its checkpoint: [version, n, width, mode] ----------------------------------

LAYOUT_VERSION = 1
LAYOUT_MODES = ("mhc", "hc", "residual")  # append only: a mode's index is in saved checkpoints


def encode_layout(layout: dict) -> torch.Tensor:
    return torch.tensor([LAYOUT_VERSION, layout["n"], layout["width"], LAYOUT_MODES.index(layout["mode"])],
                        dtype=torch.int64)


def decode_layout(state) -> dict | None:
    """The {"n", "width", "mode"} a site's saved extra state holds, or None when it is not a site's.

    Reads the tensor this version writes and the dict that checkpoints before it hold."""
    if isinstance(state, dict):
        return dict(state) if set(state) == {"n", "width", "mode"} else None
    if (isinstance(state, torch.Tensor) and state.dtype == torch.int64 and state.shape == (4,)
            and int(state[0]) == LAYOUT_VERSION and 0 <= int(state[3]) < len(LAYOUT_MODES)):
        _, n, width, mode = (int(v) for v in state.tolist())
        return {"n": n, "width": width, "mode": LAYOUT_MODES[mode]}
    return None


class MHCSite(nn.Module):
    """Learned parameters of one residual site: phi [n*C, n^2+2n], bias [n^2+2n], alpha [3]."""

    # Class-level defaults for sites pickled (torch.save of a whole model) before these attributes existed.
    needs_init = False
    alpha_init = 0.01

    def __init__(self, n: int, width: int, mode: str, index: int, alpha_init: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.n, self.width, self.mode, self.index, self.alpha_init = n, width, mode, index, float(alpha_init)
        m = num_coeffs(n)
        self.phi = nn.Parameter(torch.zeros(n * width, m, dtype=dtype, device=device))
        self.bias = nn.Parameter(init_bias(n, mode, index).to(dtype=dtype, device=device))
        self.alpha = nn.Parameter(torch.full((3,), self.alpha_init, dtype=dtype, device=device))
        # A site made on the meta device (a model built there, torchtitan-style) has no values, and to_empty()
        # gives it memory, not values: it must be initialised (reset_parameters, init_sites) or loaded before it
        # runs. get_or_create_site checks, so that it never trains from whatever that memory held.
        self.needs_init = self.phi.is_meta

    def extra_repr(self) -> str:
        return f"n={self.n}, width={self.width}, mode={self.mode!r}"

    # The layout (n, width, mode) travels with the checkpoint, so that loading into a model
    # converted with other options fails loudly instead of giving a silently different model.
    # It is an int64 tensor, not a dict: safetensors, Hugging Face's save_pretrained and
    # torch.distributed.checkpoint keep only tensors.
    def get_extra_state(self) -> torch.Tensor:
        return encode_layout(self.layout())

    def set_extra_state(self, state) -> None:
        theirs, mine = decode_layout(state), self.layout()
        if theirs != mine:
            raise ValueError(
                f"mHC checkpoint mismatch: the checkpoint's site was converted with {theirs}, this model's "
                f"with {mine}; prepare the model with the same n and mode as the checkpoint"
            )

    def layout(self) -> dict:
        return {"n": self.n, "width": self.width, "mode": self.mode}

    def reset_parameters(self, alpha_init: float | None = None) -> None:
        """The initialisation of the contract (module docstring), in place; parameters sharded by FSDP2 too.
        ``model.apply``-style initialisers that call every module's ``reset_parameters()`` reach it."""
        if alpha_init is not None:
            self.alpha_init = float(alpha_init)
        with torch.no_grad():
            self.phi.zero_()
            distributed.copy_full_into(self.bias, init_bias(self.n, self.mode, self.index))
            self.alpha.fill_(self.alpha_init)
        self.needs_init = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if any(prefix + name in state_dict for name in ("phi", "bias", "alpha")):
            self.needs_init = False


def _logit(p: float) -> float:
    if p >= 1.0:
        return 20.0  # sigmoid(20) = 1 - 2e-9: 1 to fp32 rounding
    return math.log(p / (1.0 - p))


def init_bias(n: int, mode: str, index: int) -> torch.Tensor:
    """Static part b = [pre n | post n | res n*n] meeting the initialisation contract."""
    lead = index % n
    if mode == "hc":
        pre = torch.zeros(n, dtype=torch.float64)
        pre[lead] = 1.0
        post = torch.ones(n, dtype=torch.float64)
        res = torch.eye(n, dtype=torch.float64)
    else:
        p_lo = 1.0 / (2 * n)
        probs = torch.full((n,), p_lo, dtype=torch.float64)
        probs[lead] = 1.0 - (n - 1) * p_lo
        pre = torch.tensor([_logit(float(p)) for p in probs], dtype=torch.float64)
        post = torch.zeros(n, dtype=torch.float64)
        diag = 0.0 if n == 1 else math.log(RES_DIAG_INIT * (n - 1) / (1 - RES_DIAG_INIT))
        res = torch.eye(n, dtype=torch.float64) * diag
    return torch.cat([pre, post, res.reshape(-1)]).float()


# --- registry of converted models ---------------------------------------------------------------


@dataclass
class ModelRecord:
    """What the backend added to one user model."""

    n: int
    mode: str
    sites: dict[str, MHCSite] = field(default_factory=dict)  # "h.0.mhc_attn" -> site module
    created_lazily: list[str] = field(default_factory=list)
    strict: bool = False
    warned_optimizers: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)
    use_checked: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)  # optimizers _check_sites_used saw

    def param_ids(self) -> set[int]:
        return {id(p) for s in self.sites.values() for p in s.parameters()}


_RECORDS: "weakref.WeakKeyDictionary[nn.Module, ModelRecord]" = weakref.WeakKeyDictionary()


def record_for(root: nn.Module) -> ModelRecord | None:
    return _RECORDS.get(root)


def ensure_record(root: nn.Module, n: int = 0, mode: str = "") -> ModelRecord:
    if root not in _RECORDS:
        _RECORDS[root] = ModelRecord(n=n, mode=mode)
    return _RECORDS[root]


def lift_to_known_root(module: nn.Module) -> tuple[nn.Module, str]:
    """(root, path of ``module`` in it) for the outermost converted model that contains ``module``.

    After a graph break Dynamo compiles the rest of a block's forward as its own frame, whose ``self``
    is the block; its sites must land on the same modules under the same names as in the whole model.
    """
    for root in list(_RECORDS.keys()):
        if root is module:
            continue
        for path, sub in root.named_modules():
            if sub is module:
                return root, path
    return module, ""


_TENSOR_NAMES: "weakref.WeakKeyDictionary[nn.Module, dict[int, str]]" = weakref.WeakKeyDictionary()


def find_tensor(t: torch.Tensor) -> tuple[nn.Module, str] | None:
    """(converted model, name) of a parameter or buffer of a model the backend converted, else None.

    The name index of each model is cached and rebuilt once when a lookup misses (modules added since)."""
    for refresh in (False, True):
        for root in list(_RECORDS.keys()):
            names = None if refresh else _TENSOR_NAMES.get(root)
            if names is None:
                names = {}
                for name, tensor in (*root.named_parameters(remove_duplicate=False),
                                     *root.named_buffers(remove_duplicate=False)):
                    names.setdefault(id(tensor), name)
                _TENSOR_NAMES[root] = names
            name = names.get(id(t))
            if name is not None and _get_tensor(root, name) is t:
                return root, name
    return None


def _get_tensor(root: nn.Module, name: str):
    owner, _, attr = name.rpartition(".")
    try:
        return getattr(root.get_submodule(owner) if owner else root, attr)
    except AttributeError:
        return None


def get_or_create_site(root: nn.Module, owner_path: str, name: str, *, n: int, mode: str, width: int,
                       index: int, alpha_init: float, device: torch.device, lazily: bool) -> tuple[MHCSite, bool]:
    """Return the site's parameters, creating them on the owner module if missing.

    Returns (site, created). Existing parameters are reused only if they match (n, width, mode); a
    mismatch raises rather than silently re-initialising or dropping trained weights.
    """
    owner = root.get_submodule(owner_path) if owner_path else root
    path = f"{owner_path}.{name}" if owner_path else name
    existing = getattr(owner, name, None)
    record = ensure_record(root, n, mode)
    if existing is not None:
        if isinstance(existing, MHCSite) and existing.needs_init and not existing.phi.is_meta:
            raise MHCConversionError(
                f"mhc: the mHC site {path!r} was made on the meta device and has not been initialised since "
                f"to_empty() gave it memory: it would train from whatever that memory held. Initialise the sites "
                f"with mhc_compile.init_sites(model) after the model's own init_weights / reset_parameters, or "
                f"load a checkpoint into them")
        if not isinstance(existing, MHCSite):
            hint = (" (PEFT's modules_to_save wraps the modules it names: leave the sites out of it and unfreeze "
                    "them instead, README 'PEFT')" if type(existing).__name__ == "ModulesToSaveWrapper" else "")
            raise ValueError(f"mhc: cannot add site parameters at {path!r}: the attribute exists and is a "
                             f"{type(existing).__name__}{hint}")
        if (existing.n, existing.width, existing.mode) != (n, width, mode):
            raise ValueError(
                f"mhc: {path!r} was prepared with n={existing.n}, width={existing.width}, mode={existing.mode!r} "
                f"but is now compiled with n={n}, width={width}, mode={mode!r}; convert a fresh model or use the same options"
            )
        record.sites[path] = existing
        return existing, False
    distributed.check_can_create(root, path)
    from mhc_compile.runtime import checkpoint  # it builds on this module

    checkpoint.check_not_dropped(root, path)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in owner.parameters()) else torch.float32
    site = add_site(root, owner, path, MHCSite(n, width, mode, index, alpha_init, dtype=dtype, device=device))
    if lazily:
        record.created_lazily.append(path)
    return site, True


def add_site(root: nn.Module, owner: nn.Module, path: str, site: MHCSite) -> MHCSite:
    """Put a new site on its owner module and in ``root``'s record, and record the conversion in ``root``'s config
    (``checkpoint.mark_config``). Every site the package creates comes here, after ``distributed.check_can_create``."""
    from mhc_compile.runtime import checkpoint  # it builds on this module

    owner.add_module(path.rpartition(".")[2], site)
    record = ensure_record(root, site.n, site.mode)
    record.sites[path] = site
    record.n, record.mode = site.n, site.mode
    checkpoint.mark_config(root, site.n, site.mode)
    return site


# --- optimizer check ------------------------------------------------------------------------------


class MissingMHCParametersError(RuntimeError):
    pass


def _check_sites_used(optimizer, opt_ids: set[int], root: nn.Module, record: ModelRecord) -> None:
    """Once per optimizer and model, at the first step after a backward reached the model: if no mHC parameter
    got a gradient while the model's other parameters did, the step ran without mHC. That happens when Dynamo
    runs the blocks eagerly (it skips a frame it cannot trace: transformers 5.25's checkpointed decoder layers,
    README) or when the prepared model is called without the backend. Training would go on as a plain residual
    model without a word; say so."""
    if optimizer in record.use_checked:
        return
    site_params = [p for site in record.sites.values() for p in site.parameters() if p.requires_grad
                   and id(p) in opt_ids]
    if not site_params:
        return
    mhc_ids = record.param_ids()
    if not any(p.grad is not None for p in root.parameters() if id(p) in opt_ids and id(p) not in mhc_ids):
        return  # no backward has reached the model yet: decide at a later step
    record.use_checked.add(optimizer)
    if any(p.grad is not None for p in site_params):
        return
    warnings.warn(
        f"mhc: {type(optimizer).__name__} steps a {type(root).__name__} whose parameters got gradients, but none of "
        f"the mHC parameters of its {len(record.sites)} residual site(s) did (e.g. {next(iter(record.sites))!r}): "
        f"the step ran without mHC. Was the model called without torch.compile(..., backend='mhc'), or did Dynamo "
        f"run its blocks eagerly (a frame it could not trace; TORCH_LOGS=graph_breaks lists them)?", stacklevel=4)


def _optimizer_step_pre_hook(optimizer, args, kwargs) -> None:
    opt_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    told: set[int] = set()  # sites named already: a model wrapped by another (PEFT) is two roots with the same sites
    for root, record in list(_RECORDS.items()):
        _check_sites_used(optimizer, opt_ids, root, record)
        if optimizer in record.warned_optimizers:
            continue
        mhc_ids = record.param_ids()
        model_ids = {id(p) for p in root.parameters()} - mhc_ids
        missing = [path for path, site in record.sites.items() if any(id(p) not in opt_ids for p in site.parameters())]
        if not missing or not (opt_ids & model_ids):
            continue
        record.warned_optimizers.add(optimizer)
        if all(id(record.sites[path]) in told for path in missing):
            continue
        told.update(id(record.sites[path]) for path in missing)
        frozen = all(not p.requires_grad for path in missing for p in record.sites[path].parameters())
        msg = (
            f"mhc: {type(optimizer).__name__} steps parameters of a converted {type(root).__name__} but not the mHC "
            f"parameters of {len(missing)} residual site(s) (e.g. {missing[0]!r}); they will never train. " + (
                "They are frozen (requires_grad=False; PEFT's get_peft_model freezes every weight it does not add): "
                "unfreeze them before building the optimizer, for p in mhc_compile.mhc_parameters(model): "
                "p.requires_grad_(True)" if frozen else
                "Call mhc_compile.prepare(model, *example_inputs) before building the optimizer, or add them with "
                "optimizer.add_param_group({'params': mhc_compile.mhc_parameters(model)})")
        )
        if record.strict:
            raise MissingMHCParametersError(msg)
        warnings.warn(msg, stacklevel=3)


_HOOK_HANDLE = register_optimizer_step_pre_hook(_optimizer_step_pre_hook)


def init_sites(model: nn.Module) -> list[str]:
    """Initialise every mHC site of ``model`` (``MHCSite.reset_parameters``); returns their paths.

    For models built on the meta device: after ``to_empty()``, beside the model's own weight initialisation."""
    sites = [(path, m) for path, m in model.named_modules() if isinstance(m, MHCSite)]
    for _, site in sites:
        site.reset_parameters()
    return [path for path, _ in sites]


def mhc_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All mHC parameters of a converted model (e.g. to add them to an existing optimizer)."""
    return [p for m in model.modules() if isinstance(m, MHCSite) for p in m.parameters()]
