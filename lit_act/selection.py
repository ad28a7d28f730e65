"""One home for module selection: which tensors of any ``nn.Module`` a lit-act callback, ``swap_activations`` or
``kanify`` looks at (timm ``create_act`` / TransformerLens ``hook_points`` style: one table, one filter type,
normalised at one entry point, :func:`select_sites`)::

    select_modules(model)                          # every activation module ("activations" preset)
    select_modules(model, "encoder.layer.*")       # BERT's 6 layers (``*`` stays within one dotted segment)
    select_modules(model, "**.mlp")                # every module called ``mlp``, at any depth
    select_sites(model, "mlp_hidden")              # the neurons feeding each MLP's down-projection
    residual_stream(model)                         # ['transformer.h.0', 'transformer.h.1', ...]

**Selectors** (:data:`ModuleSelector`):

* a string equal to a preset name (:data:`PRESETS`) is that preset;
* any other string is a name glob on ``named_modules()`` names (:func:`match_glob`): ``*`` matches within one dotted
  segment, ``**`` across dots (as a whole segment: zero or more segments), ``?`` one character, ``[..]`` a class; a
  name without wildcards is an exact name;
* a list (or tuple) of such strings: the union, and every entry must match something;
* an ``nn.Module`` type or tuple of types (``isinstance``);
* a predicate ``(name, module) -> bool``;
* ``None``: the caller's ``default`` preset.

**Presets**:

* ``"activations"``: modules of an activation class (:func:`activation_types`): torch.nn's element-wise activations,
  every class of ``transformers.activations`` (recognised by ``type(m).__module__``; lit-act never imports
  transformers), lit-act's own (:mod:`lit_act.activations`), and classes added with :func:`register_activation_type`.
* ``"residual_stream"``: the blocks of every repeated-block stack (:func:`residual_stream`).
* ``"mlp_hidden"``: the hidden neurons of every MLP, i.e. the input of its down-projection (:func:`mlp_hidden`).

A selection is a ``{name: Site}`` dict in ``named_modules()`` order: a :class:`Site` is a module's output (or, for
``mlp_hidden`` on gated MLPs and functional activations, the first input of the down-projection).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.modules.activation as _torch_activation
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

__all__ = ["PRESETS", "ModuleSelector", "Site", "activation_types", "default_preset", "down_projection",
           "is_activation", "linear_features", "linear_weight", "match_glob", "mlp_hidden",
           "register_activation_type", "residual_stream", "select_modules", "select_sites"]

ModuleSelector = None | str | Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...] | Callable[
    [str, nn.Module], bool]

PRESETS = ("activations", "residual_stream", "mlp_hidden")

PORTS = ("output", "input")


@dataclass(frozen=True)
class Site:
    """One observed tensor: the output (``port="output"``) or the first positional input (``port="input"``) of
    module ``name``.

    Example::

        Site("transformer.h.0.mlp.act", act)                       # GPT-2: the activation's output
        Site("model.layers.0.mlp.down_proj", down_proj, "input")   # LLaMA: act_fn(gate) * up, fed to down_proj
    """

    name: str  # the module's name in named_modules(); logging keys use it
    module: nn.Module
    port: str = "output"  # "output" | "input"

    def __post_init__(self) -> None:
        if self.port not in PORTS:
            raise ValueError(f"Site port must be one of {PORTS}, got {self.port!r}")

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {type(self.module).__name__}, port={self.port!r})"


# ----------------------------------------------------------------------------------------------- activation table

# torch.nn.modules.activation also holds modules that are not element-wise activations
_TORCH_NOT_ELEMENTWISE = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)
_TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = tuple(
    cls for cls in vars(_torch_activation).values()
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == _torch_activation.__name__
    and cls not in _TORCH_NOT_ELEMENTWISE)
# packages whose nn.Module classes are all activations; looked up in sys.modules, never imported from here
_ACTIVATION_PACKAGES = ("transformers.activations", "lit_act.activations")
_REGISTERED: list[type[nn.Module]] = []


def register_activation_type(*types: type[nn.Module]) -> None:
    """Make ``types`` (your own activation classes) part of the ``"activations"`` preset, and so of every default
    selection, ``swap_activations`` and the statistics callbacks.

    Example::

        class Squareplus(nn.Module): ...
        register_activation_type(Squareplus)
    """
    for cls in types:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_activation_type expects nn.Module subclasses, got {cls!r}")
        if cls not in _REGISTERED:
            _REGISTERED.append(cls)


_PACKAGE_CLASSES: dict[str, tuple[int, list[type[nn.Module]]]] = {}  # package -> (len(sys.modules), its classes)


def _classes_of_package(package: str) -> list[type[nn.Module]]:
    """The ``nn.Module`` classes defined in the loaded modules of ``package``. A scan walks every loaded module (1-2 ms
    with transformers imported), so the last one is reused while no module was loaded or unloaded and each class found
    is still the one its module holds (``importlib.reload`` replaces them)."""
    cached = _PACKAGE_CLASSES.get(package)
    if cached is not None and cached[0] == len(sys.modules) and all(
            getattr(sys.modules.get(c.__module__), c.__name__, None) is c for c in cached[1]):
        return cached[1]
    found = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == package or name.startswith(package + ".")):
            continue
        found.extend(cls for cls in vars(mod).values()
                     if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == name)
    _PACKAGE_CLASSES[package] = (len(sys.modules), found)
    return found


def activation_types() -> tuple[type[nn.Module], ...]:
    """The activation table, looked up at call time: torch.nn's element-wise activations (softmax-like modules and
    ``MultiheadAttention`` excluded), the ``nn.Module`` classes of lit-act's activation registry and of
    ``lit_act.activations``, those of ``transformers.activations`` when transformers is loaded, and the classes added
    with :func:`register_activation_type`. ``nn.Identity`` is never an activation."""
    import lit_act.activations  # noqa: F401  (its modules register themselves; imported lazily: it imports us)
    from lit_act.activations.registry import available, get

    registry = [f for f in map(get, available()) if isinstance(f, type) and issubclass(f, nn.Module)]
    candidates = [*_TORCH_ACTIVATIONS, *registry, *(c for p in _ACTIVATION_PACKAGES for c in _classes_of_package(p)),
                  *_REGISTERED]
    return tuple(dict.fromkeys(c for c in candidates if c is not nn.Identity))


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a class of the activation table (:func:`activation_types`)."""
    return isinstance(module, activation_types())


# ----------------------------------------------------------------------------------------------------- name globs

@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**", i):
            j = i + 2
            whole_segment = (i == 0 or pattern[i - 1] == ".") and (j == n or pattern[j] == ".")
            if whole_segment and j < n:  # "**." : zero or more leading segments
                out.append(r"(?:.*\.)?")
                i = j + 1
            elif whole_segment and out and out[-1] == r"\.":  # "a.**" : a and everything below it
                out[-1] = r"(?:\..*)?"
                i = j
            else:  # "**" alone or inside a segment: any characters, dots included
                out.append(".*")
                i = j
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "[" and (end := _class_end(pattern, i)) > 0:
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(r"\." if pattern[i] == "." else re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def _class_end(pattern: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``start`` (-1: none, the ``[`` is literal)."""
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    end = pattern.find("]", j)
    return end


def match_glob(pattern: str, name: str) -> bool:
    """Whether module name ``name`` matches ``pattern``: ``*`` matches within one dotted segment, ``**`` across dots
    (as a whole segment it stands for zero or more segments), ``?`` one character other than a dot, ``[..]`` /
    ``[!..]`` a character class; everything else is literal (a name without wildcards matches only itself).

    Example::

        match_glob("encoder.layer.*", "encoder.layer.3")              # True
        match_glob("encoder.layer.*", "encoder.layer.3.output")       # False
        match_glob("**.mlp", "blocks.0.mlp") and match_glob("**.mlp", "mlp")   # True
    """
    return _glob_regex(pattern).fullmatch(name) is not None


# ---------------------------------------------------------------------------------------- structure: stacks, MLPs

def _inside(name: str, scope: str) -> bool:
    """``name`` lies strictly below module ``scope`` (``""`` is the root)."""
    return name != scope and (scope == "" or name.startswith(scope + "."))


def _child(scope: str, child: str) -> str:
    return f"{scope}.{child}" if scope else child


def _is_stack(module: nn.Module) -> bool:
    """An ``nn.ModuleList`` / ``nn.Sequential`` of >= 2 composite blocks of one class, each holding parameters."""
    if not isinstance(module, nn.ModuleList | nn.Sequential):
        return False
    kids = list(module.children())
    return (len(kids) >= 2 and len({type(k) for k in kids}) == 1
            and all(next(k.children(), None) is not None and next(k.parameters(), None) is not None for k in kids))


def _stacks(model: nn.Module) -> list[str]:
    """Names of the outermost repeated-block stacks, in ``named_modules()`` order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not any(_inside(name, outer) for outer in found) and _is_stack(module):
            found.append(name)
    return found


def _blocks(model: nn.Module) -> list[str]:
    return [_child(stack, child) for stack in _stacks(model) for child, _ in model.get_submodule(stack).named_children()]


def residual_stream(model: nn.Module) -> list[str]:
    """Names of the blocks of every repeated-block stack: an ``nn.ModuleList`` / ``nn.Sequential`` whose children are
    >= 2 composite modules of the same class holding parameters (BERT ``encoder.layer.N``, GPT-2 ``transformer.h.N``,
    LLaMA ``model.layers.N``, ``nn.Transformer``'s encoder *and* decoder layers, ``TransformerLM`` ``blocks.N``).
    Stacks nested inside another stack's blocks are not counted. Their outputs are the residual stream.

    Raises:
        ValueError: the model has no such stack (the message lists the modules that hold submodules and asks for
            ``modules=``).
    """
    blocks = _blocks(model)
    if not blocks:
        composite = [n for n, m in model.named_modules() if n and next(m.children(), None) is not None]
        candidates = composite or [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"{type(model).__name__} has no repeated-block stack (an nn.ModuleList or nn.Sequential of >= 2 blocks "
            "of the same class with parameters, like GPT-2's transformer.h or BERT's encoder.layer), so its residual "
            "stream cannot be found from its structure; pass modules= with the modules whose outputs you want "
            f"(names, a glob, a type or a predicate). Candidates: {_shortlist(candidates)}")
    return blocks


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like layer: ``nn.Linear`` (and subclasses) or Hugging Face's
    ``Conv1D`` (GPT-2; recognised by class name and module, weight stored transposed as ``(in, out)``); else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    cls = type(module)
    weight = getattr(module, "weight", None)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and isinstance(weight, Tensor) \
            and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear-like layer in ``nn.Linear`` layout ``(out_features, in_features)`` (a transposed view
    for Hugging Face's ``Conv1D``): ``W_out`` for CETT.

    Raises:
        TypeError: ``module`` is not linear-like (:func:`linear_features`).
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if linear_features(module) is not None:
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear-like layer (nn.Linear or transformers' Conv1D)")


@dataclass(frozen=True)
class _MLP:
    site: Site
    down_name: str
    down: nn.Module


def _mlps(model: nn.Module) -> list[_MLP]:
    """Every MLP in the blocks of the stacks (in the whole model when it has none), by its down-projection."""
    named = dict(model.named_modules())
    types = activation_types()
    found: dict[str, _MLP] = {}
    blocks = _blocks(model)
    for scope in blocks or [""]:
        inside = [(n, m) for n, m in named.items() if _inside(n, scope)]
        linears = [(n, m, f) for n, m in inside if (f := linear_features(m)) is not None]
        # the model width d is the more common width of the pair among a block's linear layers (attention
        # projections are d -> d); on a tie, and outside blocks, the smaller one (MLPs expand)
        counts = Counter(w for _, _, f in linears for w in f) if blocks else Counter()
        for down_name, down, (hidden, width) in linears:
            ups = [u for u, _, f in linears if f == (width, hidden)]
            if hidden == width or not ups or (counts[width], -width) < (counts[hidden], -hidden):
                continue
            parent = down_name
            while not any(_inside(u, parent) for u in ups):  # smallest scope holding the down- and up-projections
                parent = parent.rpartition(".")[0]
            ups = [u for u in ups if _inside(u, parent)]
            acts = [(n, m) for n, m in inside if _inside(n, parent) and isinstance(m, types)]
            if len(ups) == 1 and len(acts) == 1:
                site = Site(*acts[0])
            else:  # gated (two up-projections) or functional activation: the down-projection's input
                site = Site(down_name, down, "input")
            found.setdefault(site.name, _MLP(site, down_name, down))
    order = {name: i for i, name in enumerate(named)}
    return sorted(found.values(), key=lambda mlp: order[mlp.site.name])


def mlp_hidden(model: nn.Module) -> dict[str, Site]:
    """The neuron activations feeding each MLP's down-projection (Sparsing Law's CETT measures these).

    Inside each block of the stacks (:func:`residual_stream`; in the whole model when it has none) a
    down-projection is a linear-like layer (:func:`linear_features`) mapping a hidden width ``h`` to the model width
    ``d != h`` with an up-projection ``d -> h`` in the same block (the smallest module holding both is the MLP);
    ``d`` is the width of the two that more of the block's linear layers read or write (attention projections are
    ``d -> d``), the smaller one on a tie and in models without blocks (MLPs expand).
    With one up-projection and one activation module in the MLP (``fc_in -> act -> fc_out``, GPT-2
    ``c_fc -> act -> c_proj``, BERT ``intermediate.dense -> intermediate_act_fn -> output.dense``) the site is the
    activation's output; for gated MLPs (LLaMA ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``) and functional
    activations (``nn.TransformerEncoderLayer``'s ``linear1 -> F.relu -> dropout -> linear2``) it is the input of the
    down-projection.

    Raises:
        ValueError: no MLP found (lists the linear-like layers with their widths and asks for ``modules=``).
    """
    sites = {mlp.site.name: mlp.site for mlp in _mlps(model)}
    if not sites:
        linears = [f"{n} ({f[0]}->{f[1]})" for n, m in model.named_modules() if (f := linear_features(m))]
        raise ValueError(
            f"the \"mlp_hidden\" preset found no MLP in {type(model).__name__} (a down-projection h->d with an "
            "up-projection d->h, h != d, in the same block); pass modules= with the modules whose outputs you want. "
            "Linear layers: "
            f"{_shortlist(linears)}")
    return sites


def down_projection(model: nn.Module, site: str | Site) -> nn.Module:
    """The linear-like down-projection ``W_out`` fed by an :func:`mlp_hidden` site (for an input-port site, the
    module itself). Use :func:`linear_weight` for its weight in ``(out, in)`` layout.

    Raises:
        ValueError: ``site`` is not an ``mlp_hidden`` site (lists them).
    """
    name = site.name if isinstance(site, Site) else site
    mlps = {mlp.site.name: mlp for mlp in _mlps(model)}
    if name not in mlps:
        raise ValueError(f"{name!r} is not an mlp_hidden site of {type(model).__name__}, so its down-projection is "
                         f"unknown; mlp_hidden sites: {_shortlist(list(mlps)) if mlps else 'none'}")
    return mlps[name].down


def default_preset(model: nn.Module) -> str:
    """``"mlp_hidden"`` for models with repeated blocks containing MLPs (transformers), else ``"activations"``."""
    return "mlp_hidden" if _stacks(model) and _mlps(model) else "activations"


# ------------------------------------------------------------------------------------------------------ selection

def _shortlist(names: Sequence[str], limit: int = 25) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _activation_sites(model: nn.Module) -> dict[str, Site]:
    types = activation_types()
    return {name: Site(name, m) for name, m in model.named_modules() if name and isinstance(m, types)}


def _preset(model: nn.Module, preset: str) -> dict[str, Site]:
    if preset == "activations":
        sites = _activation_sites(model)
        if not sites:
            hint = ("; this model's MLP activations are functional, the \"mlp_hidden\" preset observes their outputs "
                    "at the down-projections' inputs" if _mlps(model) else "")
            raise ValueError(
                f"no module of {type(model).__name__} matches the \"activations\" preset (the default activation "
                "types: torch.nn, transformers.activations, lit_act.activations and register_activation_type's)"
                f"{hint}; register your activation class with lit_act.selection.register_activation_type or pass "
                f"modules= as a glob, type or predicate; available modules: {_shortlist(_names(model))}")
        return sites
    if preset == "residual_stream":
        return {name: Site(name, model.get_submodule(name)) for name in residual_stream(model)}
    return mlp_hidden(model)


def _glob_sites(model: nn.Module, pattern: str) -> dict[str, Site]:
    sites = {name: Site(name, m) for name, m in model.named_modules() if name and match_glob(pattern, name)}
    if sites:
        return sites
    names = _names(model)
    old = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    crossing = (f"; `*` stays within one dotted segment (use `**` to cross dots: it would match "
                f"{_shortlist(old, 5)})" if old else "")
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.0)
    raise ValueError(f"module glob(s) [{pattern!r}] match no module of {type(model).__name__}{crossing}; closest "
                     f"names: {', '.join(close) or 'none'}; available modules: {_shortlist(names)}")


def _is_type_selector(selector) -> bool:
    return isinstance(selector, type) or (isinstance(selector, tuple) and bool(selector)
                                          and all(isinstance(t, type) for t in selector))


def _describe(selector) -> str:
    if _is_type_selector(selector):
        types = selector if isinstance(selector, tuple) else (selector,)
        return "modules of type " + " | ".join(t.__name__ for t in types)
    return f"modules accepted by predicate {getattr(selector, '__name__', selector)!r}"


def _warn_outside_blocks(model: nn.Module, sites: dict[str, Site]) -> None:
    """The default activation selection found only modules outside the repeated blocks (e.g. BERT's pooler)."""
    blocks = _blocks(model)
    if not blocks or any(_inside(name, block) for name in sites for block in blocks):
        return
    skip = (nn.Dropout, nn.Identity, nn.LayerNorm)
    unknown = sorted({type(m).__name__ for n, m in model.named_modules()
                      if any(_inside(n, b) for b in blocks) and next(m.children(), None) is None
                      and next(m.parameters(), None) is None and not isinstance(m, skip)})
    rank_zero_warn(
        f"the default activation selection found only {_shortlist(list(sites), 5)}, outside the repeated blocks of "
        f"{type(model).__name__} ({_shortlist(blocks, 3)}): the MLP activations were not recognised"
        + (f" (parameter-free modules in the blocks: {', '.join(unknown)})" if unknown else "")
        + ". Register the activation class with lit_act.selection.register_activation_type, or pass modules= "
          "(e.g. \"mlp_hidden\" or a glob)")


def select_sites(model: nn.Module, selector: ModuleSelector = None, *,
                 default: str = "activations") -> dict[str, Site]:
    """The observed tensors of ``model`` chosen by ``selector`` (see the module docstring), as ``{name: Site}`` in
    ``named_modules()`` order.

    Args:
        model: any ``nn.Module`` (names as in its ``named_modules()``).
        selector: a preset name, a glob or list of globs/presets, a type or tuple of types, a predicate, or ``None``
            for the ``default`` preset.
        default: the preset used for ``None`` (:func:`default_preset` picks one from the model's structure).

    Raises:
        ValueError: nothing matched, or one of several globs matched nothing (the message names what was asked and
            lists candidates); ``default`` is not a preset.
        TypeError: ``selector`` is none of the above.

    Example::

        select_sites(llama, "mlp_hidden")["model.layers.0.mlp.down_proj"].port   # "input"
    """
    if default not in PRESETS:
        raise ValueError(f"default must be one of the presets {PRESETS}, got {default!r}")
    if selector is None:
        sites = _preset(model, default)
        if default == "activations":
            _warn_outside_blocks(model, sites)
        return sites
    if isinstance(selector, str) or (isinstance(selector, list | tuple) and not _is_type_selector(selector)):
        strings = [selector] if isinstance(selector, str) else list(selector)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise TypeError(f"module globs must be non-empty strings, got {selector!r}")
        sites: dict[str, Site] = {}
        for s in strings:
            for name, site in (_preset(model, s) if s in PRESETS else _glob_sites(model, s)).items():
                sites.setdefault(name, site)
        order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
        return dict(sorted(sites.items(), key=lambda item: order[item[0]]))
    if _is_type_selector(selector):
        sites = {name: Site(name, m) for name, m in model.named_modules() if name and isinstance(m, selector)}
    elif callable(selector):
        sites = {name: Site(name, m) for name, m in model.named_modules() if name and selector(name, m)}
    else:
        raise TypeError(f"modules must be None, a preset {PRESETS}, a glob, a list of globs, an nn.Module type (or "
                        f"tuple of types) or a predicate (name, module) -> bool; got {selector!r}")
    if not sites:
        present = sorted({type(m).__name__ for _, m in model.named_modules()})
        raise ValueError(f"no module of {type(model).__name__} matches {_describe(selector)}; pass modules= as a "
                         f"preset, glob, type or predicate; module types present: {', '.join(present)}; available "
                         f"modules: {_shortlist(_names(model))}")
    return sites


def select_modules(model: nn.Module, selector: ModuleSelector = None, *,
                   default: str = "activations") -> dict[str, nn.Module]:
    """``{name: module}`` of :func:`select_sites` for selections that observe module outputs (every selector but
    ``mlp_hidden`` on gated MLPs / functional activations).

    Raises:
        ValueError: as :func:`select_sites`, and when the selection holds input-port sites.

    Example::

        select_modules(model, "blocks.*.mlp.act")   # {"blocks.0.mlp.act": GELU(), "blocks.1.mlp.act": GELU()}
    """
    sites = select_sites(model, selector, default=default)
    inputs = [name for name, site in sites.items() if site.port != "output"]
    if inputs:
        asked = default if selector is None else selector
        raise ValueError(f"the selection {asked!r} observes the inputs of {_shortlist(inputs, 5)} (down-"
                         "projections of gated MLPs or of MLPs with a functional activation), which select_modules "
                         "cannot express; use lit_act.selection.select_sites and observe each Site's port")
    return {name: site.module for name, site in sites.items()}
