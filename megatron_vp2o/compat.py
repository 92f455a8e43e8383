"""Every difference between the megatron-core releases we support, in one place.

Supported and tested: megatron-core **0.16.1** (the default install on Python 3.10/3.11) and
**0.19.2** (the newest release; Python 3.12, NVIDIA's PyTorch containers). ``make test`` runs the
whole suite on the first, ``make test-latest`` on the second. 0.17 and 0.18 sit between the two;
every gate below tests for the feature, not the version number, so they take whichever side they
have, but they are not run in CI.

| # | what differs | 0.16.1 | 0.19.2 | handled by |
|---|---|---|---|---|
| 1 | the MoE ``mlp`` entry of a layer spec | ``ModuleSpec(module=MoELayer, submodules=MoESubmodules)``; ``TransformerLayer`` passes ``pg_collection`` only to classes it knows by identity (a subclass gets a warning and the default groups) | ``functools.partial(MoELayer, submodules=...)``; ``TransformerLayer`` always passes ``pg_collection`` | :func:`swap_moe_layer` (a subclass and a router class in either form; on 0.16 the entry becomes the subclass with its submodules and the model-parallel ``pg_collection`` bound, so megatron neither warns nor drops them) |
| 2 | ``MoELayer.__init__`` arguments | ``config, submodules, layer_number, pg_collection`` | adds ``is_mtp_layer``, ``name`` | ``VP2OMoELayer.__init__`` forwards ``**kwargs`` (no gate needed) |
| 3 | legacy ``GroupedMLP`` (``moe.grouped_gemm_util``, ``TransformerConfig.moe_use_legacy_grouped_gemm``, ``experts.weight1/weight2``) | present: ``expert_impl: grouped`` | **removed**: the local backend builds ``SequentialMLP`` for ``moe_grouped_gemm=True``; grouped GEMMs are ``TEGroupedMLP`` (``expert_impl: te_grouped``, Transformer Engine) | :data:`HAS_LEGACY_GROUPED_MLP`, :func:`grouped_gemm_kwargs` (``expert_impl: grouped`` is a config error there, naming ``te_grouped`` / ``sequential``), :func:`grouped_gemm_util` (the CPU layer's redirect 9 only where the module exists) |
| 4 | ``moe_utils.te_general_gemm`` without Transformer Engine | undefined (NameError in the router's GEMM choice) | defined as ``None`` | the CPU layer's ``hasattr`` guard (redirect 6) |
| 5 | dist checkpoint common state | ``common.pt`` | a ``common_state`` ShardedObject; reads ``common.pt`` too | nothing to do: 0.16 checkpoints (``checkpoints/tiny_policy``) load on 0.19; **0.19 checkpoints do not load on 0.16** (documented in docs/conversion.md) |
| 6 | router / aux-loss numerics | top-k on the router dtype; aux loss under ``calculate_per_token_loss`` scaled 1/(TP*CP) too small | top-k on fp32 scores; aux loss scaled by local tokens x TP*CP | nothing: tests compare runs of the same version (layouts against one process), never golden values across versions |
| 7 | ``DistributedDataParallel`` | no ``full_param_layout`` | ``full_param_layout`` (auto-computed with a WARNING when absent) | nothing (the warning is harmless) |

Nothing else in the project checks megatron-core's version; a new difference gets a row here and a
function below.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import pathlib
from importlib import metadata

# megatron-core is imported inside the functions that need it: the config checks (row 3) run at
# config-load time, before the ~7 s megatron import.

try:
    MCORE_VERSION = metadata.version("megatron-core")
except metadata.PackageNotFoundError:  # a source checkout of megatron-core on PYTHONPATH
    MCORE_VERSION = "unknown"

#: Tested ends of the supported range (setup.py's ``install_requires`` says the same).
TESTED_VERSIONS = ("0.16.1", "0.19.2")


def _megatron_core_file(relative: str) -> bool:
    """Whether megatron-core's package holds ``relative`` (found without importing megatron.core)."""
    spec = importlib.util.find_spec("megatron")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return any((pathlib.Path(root) / "core" / relative).is_file() for root in roots)


#: Whether ``expert_impl: grouped`` (megatron's legacy GroupedMLP) exists in this release (row 3).
HAS_LEGACY_GROUPED_MLP: bool = _megatron_core_file("transformer/moe/grouped_gemm_util.py")


def grouped_gemm_util():
    """megatron's legacy grouped-GEMM module (row 3), or None where the release removed it."""
    if not HAS_LEGACY_GROUPED_MLP:
        return None
    return importlib.import_module("megatron.core.transformer.moe.grouped_gemm_util")


def check_expert_impl(expert_impl: str) -> None:
    """Refuse ``expert_impl: grouped`` where the legacy GroupedMLP is gone (the local backend would
    otherwise build SequentialMLP without a word; row 3). Called by the CLI pre-flight
    (``cli.checks.load_run_config``) and when the model is built."""
    if expert_impl == "grouped" and not HAS_LEGACY_GROUPED_MLP:
        from megatron_vp2o.config.loader import ConfigError

        raise ConfigError(
            f"model.expert_impl=grouped: megatron-core {MCORE_VERSION} has no legacy GroupedMLP; "
            "use te_grouped (Transformer Engine grouped GEMM, GPU) or sequential")


def grouped_gemm_kwargs(expert_impl: str) -> dict:
    """``TransformerConfig`` arguments selecting the experts' implementation (row 3)."""
    check_expert_impl(expert_impl)
    kwargs = {"moe_grouped_gemm": expert_impl != "sequential"}
    if HAS_LEGACY_GROUPED_MLP:
        kwargs["moe_use_legacy_grouped_gemm"] = expert_impl == "grouped"
    return kwargs


def moe_layer_class(mlp_spec):
    """The MoE layer class a layer spec's ``mlp`` entry builds (either form of row 1), or None."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp_spec, ModuleSpec):
        cls = mlp_spec.module
    elif isinstance(mlp_spec, functools.partial):
        cls = mlp_spec.func
    else:
        cls = mlp_spec
    return cls if isinstance(cls, type) and issubclass(cls, MoELayer) else None


def swap_moe_layer(mlp_spec, moe_layer_cls, router_cls=None):
    """``mlp_spec`` building ``moe_layer_cls`` (and ``router_cls`` as its router) instead of megatron's
    MoE layer; any other entry (a dense MLP layer) is returned unchanged (row 1)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if moe_layer_class(mlp_spec) is None:
        return mlp_spec
    if isinstance(mlp_spec, functools.partial):  # 0.19: TransformerLayer passes pg_collection itself
        keywords = dict(mlp_spec.keywords)
        if router_cls is not None and keywords.get("submodules") is not None:
            keywords["submodules"] = dataclasses.replace(keywords["submodules"], router=router_cls)
        return functools.partial(moe_layer_cls, *mlp_spec.args, **keywords)
    submodules = mlp_spec.submodules
    if router_cls is not None and submodules is not None:
        submodules = dataclasses.replace(submodules, router=router_cls)
    if moe_layer_cls is MoELayer:
        return dataclasses.replace(mlp_spec, submodules=submodules)
    # 0.16's TransformerLayer hands pg_collection only to the MoE classes it knows by identity and
    # warns ("Unknown MLP type") for any other ModuleSpec; an entry that is a class gets no extra
    # arguments and no warning. So the entry is a class with docs/method.md's submodules and params bound.
    return _bound_layer_class(moe_layer_cls, submodules, dict(mlp_spec.params))


def _bound_layer_class(moe_layer_cls, bound_submodules, params: dict):
    """``moe_layer_cls`` whose constructor defaults ``submodules``, ``pg_collection`` (the model
    parallel groups megatron itself would pass) and docs/method.md's other ``params`` (row 1, 0.16)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    bound_groups = params.pop("pg_collection", None) or ProcessGroupCollection.use_mpu_process_groups()

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        moe_layer_cls.__init__(self, config, submodules if submodules is not None else bound_submodules,
                               layer_number, pg_collection if pg_collection is not None else bound_groups,
                               **{**params, **kwargs})

    return type(moe_layer_cls.__name__, (moe_layer_cls,),
                {"__init__": __init__, "__module__": moe_layer_cls.__module__,
                 "__qualname__": moe_layer_cls.__qualname__})
