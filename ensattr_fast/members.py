"""Ensembles: M denoisers evaluated together, each on its own batch.

An :class:`Ensemble` maps x [M, B, *data_shape] and timesteps t [M, B] (or [B], shared) to
noise predictions [M, B, *data_shape] with one call: member m sees only x[m]. Built in:

- :class:`StackedMLP`: a residual MLP denoiser with a time embedding whose weights are stacked
  [M, ...] and applied with batched matmuls (the demo's default);
- :class:`VmapEnsemble`: any ``nn.Module`` with ``forward(x, t)`` (for example
  :class:`UNetMember`), its parameters stacked and the module vmapped over members.

Members share initial weights when ``shared_init`` is set (common random numbers: two members
then differ only by what they were trained on).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["Ensemble", "StackedMLP", "VmapEnsemble", "UNetMember", "DiffusersMember", "PackedLayout",
           "build_ensemble", "diffusers_ensemble"]


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [..., dim] of integer timesteps t [...]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class PackedLayout:
    """Where each packed row [P] sits in a padded member batch [M, n_max].

    Packed rows are grouped by member: ``counts[m]`` consecutive rows for member m. Padding to
    a multiple of 8 rows keeps matrix products off the small-batch kernels whose rounding
    differs, so a trajectory's member output does not depend on what else is in the batch.
    """

    def __init__(self, counts: Tensor):
        self.counts = counts.cpu()
        self.n_members = len(self.counts)
        self.n_packed = int(self.counts.sum())
        largest = int(self.counts.max()) if self.n_members else 0
        self.n_max = max(8, 8 * math.ceil(largest / 8))
        self.member = torch.repeat_interleave(torch.arange(self.n_members), self.counts)
        starts = torch.cumsum(self.counts, 0) - self.counts
        self.position = torch.arange(self.n_packed) - starts[self.member]
        self._on_device: dict = {}

    def _index(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        """(member, position) on ``device``, copied there once per sampling run."""
        if device not in self._on_device:
            self._on_device[device] = (self.member.to(device), self.position.to(device))
        return self._on_device[device]

    def pad(self, packed: Tensor) -> Tensor:
        out = packed.new_zeros((self.n_members, self.n_max, *packed.shape[1:]))
        out[self._index(packed.device)] = packed
        return out

    def unpad(self, padded: Tensor) -> Tensor:
        return padded[self._index(padded.device)]


class Ensemble(nn.Module):
    """Base class: ``n_members`` denoisers over data of shape ``data_shape``."""

    n_members: int
    data_shape: Tuple[int, ...]

    def spec(self) -> dict:
        """JSON-able description from which :func:`build_ensemble` rebuilds the architecture."""
        raise NotImplementedError

    def forward_packed(self, x_packed: Tensor, t: int, layout: PackedLayout) -> Tensor:
        """Member outputs for packed rows x_packed [P, *data_shape], all at timestep t."""
        padded = layout.pad(x_packed)
        steps = torch.full(padded.shape[:2], t, dtype=torch.long, device=x_packed.device)
        return layout.unpad(self(padded, steps))

    def parameters_per_member(self) -> int:
        return sum(p.numel() for p in self.parameters()) // self.n_members

    def select(self, members: range) -> "Ensemble":
        """A new ensemble of the members ``members`` (a shard for one rank of a distributed
        run): every parameter and buffer is stacked over members along dim 0."""
        part = _select_module(self, members)
        part.n_members = len(members)
        return part


class _StackedLinear(nn.Module):
    """M independent linear maps: y[m] = x[m] @ W[m] + b[m]."""

    def __init__(self, members: int, fan_in: int, fan_out: int, init_scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out))
        self.init_scale = init_scale

    def reset(self, generator: torch.Generator, shared: bool) -> None:
        bound = self.init_scale / math.sqrt(self.weight.shape[1])
        with torch.no_grad():
            for p in (self.weight, self.bias):
                draw = torch.empty_like(p[:1] if shared else p).uniform_(-bound, bound, generator=generator)
                p.copy_(draw.expand_as(p))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class _StackedLayerNorm(nn.Module):
    def __init__(self, members: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class StackedMLP(Ensemble):
    """Residual MLP denoisers on flattened data, weights stacked over members.

    h = W_in x; per block: h += W_2 silu(W_1 silu(LN(h)) + W_t e(t)); eps = W_out silu(LN(h)),
    with e(t) = silu(W_e sinusoidal(t)).
    """

    def __init__(
        self,
        n_members: int,
        data_shape: Sequence[int],
        hidden: int = 256,
        blocks: int = 3,
        time_dim: int = 128,
        shared_init: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.n_members, self.data_shape = n_members, tuple(data_shape)
        self.hidden, self.blocks, self.time_dim = hidden, blocks, time_dim
        self.shared_init, self.seed = shared_init, seed
        dim, M = math.prod(self.data_shape), n_members
        self.time = _StackedLinear(M, time_dim, time_dim)
        self.inp = _StackedLinear(M, dim, hidden)
        self.norms = nn.ModuleList([_StackedLayerNorm(M, hidden) for _ in range(blocks)])
        self.lin1 = nn.ModuleList([_StackedLinear(M, hidden, hidden) for _ in range(blocks)])
        self.temb = nn.ModuleList([_StackedLinear(M, time_dim, hidden) for _ in range(blocks)])
        self.lin2 = nn.ModuleList([_StackedLinear(M, hidden, hidden, 0.5) for _ in range(blocks)])
        self.out_norm = _StackedLayerNorm(M, hidden)
        self.out = _StackedLinear(M, hidden, dim, init_scale=0.1)
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, _StackedLinear):
                module.reset(generator, shared_init)

    def spec(self) -> dict:
        return dict(kind="mlp", n_members=self.n_members, data_shape=list(self.data_shape),
                    hidden=self.hidden, blocks=self.blocks, time_dim=self.time_dim,
                    shared_init=self.shared_init, seed=self.seed)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        M, B = x.shape[:2]
        e = timestep_embedding(t, self.time_dim).to(x.dtype)
        if e.dim() == 2:  # timesteps shared by all members
            e = e.expand(M, B, self.time_dim)
        e = F.silu(self.time(e))
        h = self.inp(x.reshape(M, B, -1))
        for norm, lin1, temb, lin2 in zip(self.norms, self.lin1, self.temb, self.lin2):
            h = h + lin2(F.silu(lin1(F.silu(norm(h))) + temb(e)))
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)


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


class DiffusersMember(nn.Module):
    """A diffusers ``UNet2DModel`` built from its config, as a member: ``forward(x, t)``
    returns the predicted noise (``pip install ensattr_fast[diffusers]``)."""

    def __init__(self, config: dict):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise ImportError("diffusers members need diffusers: pip install ensattr_fast[diffusers]") from None
        self.unet = UNet2DModel(**config)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


def diffusers_ensemble(config: dict, n_members: int, shared_init: bool = False, seed: int = 0) -> "VmapEnsemble":
    """M ``UNet2DModel`` members of one config, their parameters stacked. torch's vmap cannot
    batch diffusers' GroupNorm layers yet, so the members run one after another."""
    size = config.get("sample_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    shape = (config.get("in_channels", 3), *size)
    spec = dict(kind="diffusers", config=config, n_members=n_members, data_shape=list(shape),
                shared_init=shared_init, seed=seed)
    return VmapEnsemble(lambda: DiffusersMember(config), n_members, shape, shared_init, seed, spec, vectorize=False)


def _select_module(module: nn.Module, members: range) -> nn.Module:
    """A copy of ``module`` whose member-stacked parameters and buffers keep ``members``."""
    part = copy.copy(module)
    part._modules = {k: _select_module(v, members) for k, v in module._modules.items()}
    part._parameters = {k: nn.Parameter(v.detach()[members.start : members.stop].clone(), v.requires_grad)
                        for k, v in module._parameters.items()}
    part._buffers = {k: v[members.start : members.stop].clone() for k, v in module._buffers.items()}
    return part


def _key(name: str) -> str:
    return name.replace(".", "__")


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(groups, cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(time_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(min(groups, cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNetMember(nn.Module):
    """A small UNet denoiser for images of 8x8 to 32x32: two resolutions, residual blocks
    with a time embedding, skip connections. ``forward(x [B, C, H, W], t [B])``."""

    def __init__(self, channels: int = 1, width: int = 32, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU())
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = _ResBlock(width, width, time_dim)
        self.pool = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = _ResBlock(2 * width, 2 * width, time_dim)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec = _ResBlock(2 * width, width, time_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        h0 = self.down(self.inp(x), e)
        h = self.up(self.mid(self.pool(h0), e))
        return self.out(self.dec(torch.cat([h, h0], 1), e))


def build_ensemble(spec: dict) -> Ensemble:
    """Rebuild a built-in ensemble from :meth:`Ensemble.spec`."""
    kind = spec.get("kind")
    args = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "mlp":
        return StackedMLP(**args)
    if kind == "unet":
        unet_args = {k: args.pop(k) for k in ("width", "time_dim") if k in args}
        channels = args["data_shape"][0]
        return VmapEnsemble(lambda: UNetMember(channels, **unet_args), spec=spec, **args)
    if kind == "diffusers":
        return diffusers_ensemble(args["config"], args["n_members"], args.get("shared_init", False),
                                  args.get("seed", 0))
    raise ValueError(f"unknown ensemble kind {kind!r} (built in: 'mlp', 'unet', 'diffusers')")
