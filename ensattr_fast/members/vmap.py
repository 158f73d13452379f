"""Any ``nn.Module`` with ``forward(x, t)`` as an ensemble: parameters stacked over members and
the module vmapped over them. The stacked state (``params.<name>``, ``buffer__<name>``) is also
that of the ensembles that run the same members another way (:mod:`.folded`, :mod:`.unet`)."""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .base import Ensemble


class VmapEnsemble(Ensemble):
    """Any ``nn.Module`` with ``forward(x [B, *data_shape], t [B])`` as an ensemble.

    ``factory()`` builds one member; M of them are built (one, copied M times, with
    ``shared_init``), their parameters stacked, and the module vmapped over members.
    ``vectorize=False`` calls the members one after another instead (on the same stacked
    parameters), for modules that ``vmap`` cannot batch; everything else is the same. Random
    layers (dropout) draw for each member on its own, as members called one by one do.
    :meth:`member` gives member m back as a plain module.
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        n_members: int,
        data_shape: Sequence[int],
        shared_init: bool = False,
        seed: int = 0,
        spec: dict | None = None,
        vectorize: bool = True,
    ):
        super().__init__()
        self.n_members, self.data_shape, self._spec = n_members, tuple(data_shape), spec
        self.vectorize = vectorize
        members = build_member_modules(factory, n_members, shared_init, seed)
        params, buffers = stack_module_state(members)
        self.params = nn.ParameterDict({_key(k): nn.Parameter(v) for k, v in params.items()})
        for k, v in buffers.items():
            self.register_buffer("buffer__" + _key(k), v)
        self._names = {_key(k): k for k in params} | {_key(k): k for k in buffers}
        self._base = [copy.deepcopy(members[0]).to("meta")]  # a list: not a submodule

    def spec(self) -> dict:
        if self._spec is None:
            raise ValueError("this ensemble was built from a user factory: pass it when loading")
        return dict(self._spec, n_members=self.n_members)

    def _stacked(self) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        params = {self._names[k]: v for k, v in self.params.items()}
        buffers = {self._names[k[len("buffer__"):]]: v for k, v in self.named_buffers()
                   if k.startswith("buffer__")}
        return params, buffers

    def stacked_parameters(self) -> Dict[str, Tensor]:
        """{a member's parameter name: the members' parameters stacked [M, ...]}."""
        return self._stacked()[0]

    def load_stacked(self, state: Dict[str, Tensor]) -> None:
        """Copy in the members' weights: ``state`` maps every parameter and buffer name of a
        member to the M members' values stacked [M, ...]."""
        params, buffers = self._stacked()
        mine = params | buffers
        if set(state) != set(mine):
            missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
            raise KeyError(f"load_stacked: state lacks {missing[:3]} and has unknown {extra[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                mine[k].copy_(v)

    def member(self, m: int) -> nn.Module:
        """Member m as a plain module (a copy of its weights)."""
        params, buffers = self._stacked()
        module = copy.deepcopy(self._base[0]).to_empty(device=next(iter(params.values())).device)
        module.load_state_dict({k: v[m] for k, v in (params | buffers).items()})
        return module.train(self.training)

    def _on_stacked(self, module: nn.Module, *args) -> Tensor:
        """``module(*args)`` with the stacked parameters and buffers in place of its own (a
        skeleton that is not a submodule: it follows the ensemble's train or eval mode here)."""
        if module.training != self.training:
            module.train(self.training)
        return functional_call(module, self._stacked(), args)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Member outputs [M, B, ...] for x [M, B, ...], t [M, B] or [B] and, for members whose
        forward takes them, ``labels`` [M, B] or [B]."""
        conditions = (t,) if labels is None else (t, labels)
        return self._vmapped(x, conditions, [c.dim() == 2 for c in conditions])

    def _vmapped(self, x: Tensor, conditions: Tuple[Tensor, ...], per_member: Sequence[bool]) -> Tensor:
        """The members on x [M, B, ...] with the further arguments ``conditions``, each one a
        row per member (``per_member``: [M, B, ...]) or one for all ([B, ...])."""
        base = self._base[0]
        if base.training != self.training:
            base.train(self.training)

        def call(params, buffers, x_m, *conditions_m):
            return functional_call(base, (params, buffers), (x_m, *conditions_m))

        params, buffers = self._stacked()
        dims = [0 if each else None for each in per_member]
        if self.vectorize:
            # randomness: each member draws its own dropout masks, as when called one by one
            return vmap(call, in_dims=(0, 0, 0, *dims), randomness="different")(params, buffers, x, *conditions)
        return torch.stack([
            call({k: v[m] for k, v in params.items()}, {k: v[m] for k, v in buffers.items()}, x[m],
                 *(c[m] if d == 0 else c for c, d in zip(conditions, dims)))
            for m in range(self.n_members)
        ])


def build_member_modules(factory: Callable[[], nn.Module], n_members: int, shared_init: bool,
                         seed: int) -> List[nn.Module]:
    """``n_members`` new members drawn from ``seed`` (one, copied, with ``shared_init``),
    leaving the global random state as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        first = factory()
        return [first] + [copy.deepcopy(first) if shared_init else factory() for _ in range(n_members - 1)]


def _key(name: str) -> str:
    return name.replace(".", "__")
