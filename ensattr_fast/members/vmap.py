"""Any ``nn.Module`` with ``forward(x, t)`` as an ensemble: parameters stacked over members and
the module vmapped over them."""

from __future__ import annotations

import copy
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .base import Ensemble


class VmapEnsemble(Ensemble):
    """Any ``nn.Module`` with ``forward(x [B, *data_shape], t [B])`` as an ensemble.

    ``factory()`` builds one member; M of them are built (one, copied M times, with
    ``shared_init``), their parameters stacked, and the module vmapped over members.
    ``vectorize=False`` calls the members one after another instead (on the same stacked
    parameters), for modules that ``vmap`` cannot batch; everything else is the same.
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
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            first = factory()
            members = [first] + [
                copy.deepcopy(first) if shared_init else factory() for _ in range(n_members - 1)
            ]
        params, buffers = stack_module_state(members)
        self.params = nn.ParameterDict({_key(k): nn.Parameter(v) for k, v in params.items()})
        for k, v in buffers.items():
            self.register_buffer("buffer__" + _key(k), v)
        self._names = {_key(k): k for k in params} | {_key(k): k for k in buffers}
        self._base = [copy.deepcopy(first).to("meta")]  # a list: not a submodule

    def spec(self) -> dict:
        if self._spec is None:
            raise ValueError("this ensemble was built from a user factory: pass it when loading")
        return dict(self._spec, n_members=self.n_members)

    def _stacked(self) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        params = {self._names[k]: v for k, v in self.params.items()}
        buffers = {self._names[k[len("buffer__"):]]: v for k, v in self.named_buffers()
                   if k.startswith("buffer__")}
        return params, buffers

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        base = self._base[0]

        def call(params, buffers, x_m, t_m):
            return functional_call(base, (params, buffers), (x_m, t_m))

        params, buffers = self._stacked()
        t_dim = 0 if t.dim() == 2 else None
        if self.vectorize:
            return vmap(call, in_dims=(0, 0, 0, t_dim))(params, buffers, x, t)
        return torch.stack([
            call({k: v[m] for k, v in params.items()}, {k: v[m] for k, v in buffers.items()}, x[m],
                 t[m] if t_dim == 0 else t)
            for m in range(self.n_members)
        ])


def _key(name: str) -> str:
    return name.replace(".", "__")
