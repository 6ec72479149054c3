"""The hyper-network: the student's plan-free reading of a query -> a latent guidance vector g.

What trains in PILOT, saved on its own (safetensors + JSON config). It reads layer
``read_layer`` of an unguided pass over the query; :mod:`pilot.guidance.injection` adds g to
layer ``inject_layer`` (and to ``extra_inject_layers``, each its own slice of g). Layer
numbering: "layer i" is the output of decoder block i (0-based), the residual stream after block i.

The paper's components, each a switch (all off: an added vector at one layer):

- ``modulation: film``: per site, g holds a per-dimension scale and shift of the hidden state
  (FiLM), not only an added vector;
- ``prior: true``: a learned, query-independent "proto-thought" p that the query-conditioned
  part modulates: g = p * (1 + m(q)) + a(q);
- ``extra_inject_layers``: further injection sites;
- ``reader: none``: the query taken out -- the network reads nothing and its output is one learned
  vector (the trained query-free controls among the compared methods);
- ``scaling: none`` (not a guidance parameter; the controls set it): the injector adds ``g`` itself,
  a plain bias, instead of scaling it by the hidden state's RMS norm.

Every output starts at zero, so an untrained hyper-network leaves the student unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pilot.artifacts import atomic_folder, verify_folder
from pilot.invariant import LayerNorm, softmax
from pilot.config import GuidanceParams


Reader = Literal["mean", "attention", "none"]
Modulation = Literal["add", "film"]
Scaling = Literal["rms", "none"]


# The guidance parameters' defaults (conf/base, checked by tests/test_defaults.py) are the only ones.
_SITE = GuidanceParams()


@dataclass
class HyperNetConfig:
    """Shape and placement of the guidance. ``hidden_size``/``num_layers`` are the student's; the
    rest is the guidance parameters' (:meth:`from_site`), their defaults included."""

    hidden_size: int
    num_layers: int
    read_layer: int = _SITE.read_layer
    inject_layer: int = _SITE.inject_layer
    reader: Reader = _SITE.reader
    mlp_hidden: int = _SITE.mlp_hidden
    attention_heads: int = _SITE.attention_heads
    guidance_scale: float = _SITE.guidance_scale
    init_log_std: float = _SITE.init_log_std
    extra_inject_layers: list[int] = field(default_factory=lambda: list(_SITE.extra_inject_layers))
    modulation: Modulation = _SITE.modulation
    prior: bool = _SITE.prior
    # How the injector sizes the added part: "rms" (energy-aligned, PILOT's) or "none" (g added as it is).
    scaling: Scaling = "rms"

    @classmethod
    def from_site(cls, site: GuidanceParams, hidden_size: int, num_layers: int) -> HyperNetConfig:
        """The configured site's hyper-network for a student of this shape (the read layer made non-negative)."""
        shape = {"hidden_size": hidden_size, "num_layers": num_layers}
        values = site.model_dump(include={f.name for f in fields(cls)} - shape.keys())
        return cls(**shape, **{**values, "read_layer": site.read_layer % num_layers})

    @property
    def inject_layers(self) -> list[int]:
        """Every injection site, ``inject_layer`` first."""
        return [self.inject_layer, *self.extra_inject_layers]

    @property
    def guidance_size(self) -> int:
        """Length of one guidance vector g: per site, one hidden-size block (two with FiLM)."""
        return len(self.inject_layers) * self.hidden_size * (2 if self.modulation == "film" else 1)

    def check_fits(self, hidden_size: int | None, num_layers: int | None, where: str = "") -> None:
        """Raise if this hyper-network was built for a student of another shape."""
        problems = []
        if hidden_size is not None and self.hidden_size != hidden_size:
            problems.append(f"hidden size {self.hidden_size} != student's {hidden_size}")
        if num_layers is not None and self.num_layers != num_layers:
            problems.append(f"layer count {self.num_layers} != student's {num_layers}")
        if problems:
            raise ValueError(
                f"The hyper-network {where} was trained for a different student: {'; '.join(problems)}; "
                "retrain it for this student with `kedro run --pipelines stage1`."
            )

    def resolved_read_layer(self) -> int:
        return self.read_layer % self.num_layers

    def validate(self) -> None:
        if not -self.num_layers <= self.read_layer < self.num_layers:
            raise ValueError(
                f"read_layer={self.read_layer} is outside the student's layers "
                f"(allowed {-self.num_layers}..{self.num_layers - 1})."
            )
        for layer in self.inject_layers:
            if not 0 <= layer < self.num_layers:
                raise ValueError(
                    f"injection layer {layer} is outside the student's layers (allowed 0..{self.num_layers - 1})."
                )
        if len(set(self.inject_layers)) != len(self.inject_layers):
            raise ValueError(f"Injection layers {self.inject_layers} repeat a layer; list each once.")
        if self.modulation not in ("add", "film"):
            raise ValueError(f"modulation='{self.modulation}' is unknown; use 'add' or 'film'.")
        if self.reader not in ("mean", "attention", "none"):
            raise ValueError(f"reader='{self.reader}' is unknown; use 'mean', 'attention' or 'none'.")
        if self.scaling not in ("rms", "none"):
            raise ValueError(f"scaling='{self.scaling}' is unknown; use 'rms' or 'none'.")
        if self.reader == "attention" and self.hidden_size % self.attention_heads:
            raise ValueError(
                f"attention_heads={self.attention_heads} must divide the student's hidden size "
                f"{self.hidden_size}."
            )


def last_token_states(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The state of each row's last real token, for right- or left-padded batches."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).argmax(dim=1)
    return states[torch.arange(states.shape[0], device=states.device), last]


class HyperNetwork(nn.Module):
    """Maps the student's plan-free reading of a query to a latent guidance vector g.

    ``mean`` pools the query's token states and applies an MLP (as in the paper);
    ``attention`` lets the last query token attend over all query tokens first; ``none`` reads
    nothing: its output is one learned vector (``output``, the size the MLP's last layer would
    emit), the same for every query, with no norm, attention or MLP beside it. The output is
    ``config.guidance_size`` long (see the module's switches); the output layer (and the prior)
    start at zero, so an untrained hyper-network leaves the student unchanged. ``log_std`` is
    the spread of the Gaussian policy used by the latent-RL terms.
    """

    def __init__(self, config: HyperNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        out = config.guidance_size * (2 if config.prior else 1)   # with a prior: (m, a) per dimension
        if config.reader == "none":   # the query taken out: only what the output layer would emit, learned
            self.output = nn.Parameter(torch.zeros(out))
        else:
            self.norm = LayerNorm(d)   # nn.LayerNorm whose gradients do not follow the thread count
            if config.reader == "attention":
                self.attention = nn.MultiheadAttention(d, config.attention_heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, config.mlp_hidden), nn.GELU(), nn.Linear(config.mlp_hidden, out))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        if config.prior:
            self.prior = nn.Parameter(torch.zeros(config.guidance_size))
        self.log_std = nn.Parameter(torch.tensor(float(config.init_log_std)))

    def forward(self, query_states: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        out = self._read(query_states, query_mask)
        if not self.config.prior:
            return out
        modulation, added = out.chunk(2, dim=-1)
        return self.prior * (1 + modulation) + added

    def _read(self, query_states: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """What the output layer emits for each query: (B, out); with ``reader: none`` the one learned
        vector for every row, whatever the states."""
        if self.config.reader == "none":
            return self.output.expand(len(query_states), -1)
        states = self.norm(query_states.to(self.norm.weight.dtype))
        mask = query_mask.to(states.dtype)
        if self.config.reader == "mean":
            pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        else:
            query = last_token_states(states, query_mask)
            pooled = self._attention_pool(query, states, query_mask.bool()) + query
        return self.mlp(pooled)

    def _attention_pool(self, query: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``self.attention(query, states, states)`` for one query per row, without projecting every token.

        With a single query the key and value projections can be absorbed: ``q . (W_k x_t + b_k)``
        ranks tokens like ``(W_k^T q) . x_t`` (the bias term is the same for every t), and the
        attention-weighted values are ``W_v (sum_t a_t x_t) + b_v``. That costs O(T d) per head
        instead of O(T d^2) -- the hyper-network is one small call per query, not a second reading
        of the prompt. Same parameters and outputs as ``nn.MultiheadAttention`` (a test checks).
        """
        attention, heads = self.attention, self.config.attention_heads
        batch, d = query.shape
        head_dim = d // heads
        w_q, w_k, w_v = attention.in_proj_weight.split(d)
        b_q, _, b_v = attention.in_proj_bias.split(d)
        q = (query @ w_q.T + b_q).view(batch, heads, head_dim) * head_dim**-0.5
        q_in = torch.einsum("bhe,hed->bhd", q, w_k.view(heads, head_dim, d))       # W_k^T q, per head
        scores = torch.einsum("bhd,btd->bht", q_in, states).masked_fill(~mask[:, None, :], float("-inf"))
        # sum_t a_t x_t, per head; pilot.invariant's softmax: its backward's bits never follow the thread count
        pooled_states = torch.einsum("bht,btd->bhd", softmax(scores), states)
        values = torch.einsum("bhd,hed->bhe", pooled_states, w_v.view(heads, head_dim, d)) + b_v.view(heads, head_dim)
        return attention.out_proj(values.reshape(batch, d))

    def sample(self, mean: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None):
        """Draw guidance vectors from N(mean, std^2 I); returns (samples, log-probabilities).

        Samples are detached actions; the log-probabilities carry gradients to ``mean`` and
        ``log_std`` for REINFORCE / GRPO. They are averaged over the dimensions, not summed, so the
        policy gradient (of size ~ noise / std per dimension) does not grow with the hidden size
        and swamp the supervised terms it shares a clipped step with. ``noise`` (standard normal,
        one row per sample) replaces the draw: a data-parallel rank passes its rows of the draw
        one process would make.
        """
        std = self.log_std.exp()
        expanded = mean.repeat_interleave(num_samples, dim=0)
        # Drawn on the CPU from a seeded generator (the same numbers on any device), then moved.
        if noise is None:
            noise = torch.randn(expanded.shape, generator=generator, dtype=expanded.dtype)
        noise = noise.to(expanded.device, expanded.dtype)
        actions = (expanded + std * noise).detach()
        log_prob = torch.distributions.Normal(expanded, std).log_prob(actions).mean(-1)
        return actions, log_prob

    def settings(self) -> dict:
        """The config as saved and fingerprinted; ``scaling`` only where it is not the default, so the
        files and fingerprints of hyper-networks from before the switch are unchanged."""
        settings = asdict(self.config)
        if settings["scaling"] == "rms":
            del settings["scaling"]
        return settings

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """``hypernet.safetensors`` + ``hypernet_config.json``, written atomically with their checksums."""
        with atomic_folder(path) as folder:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                      folder / "hypernet.safetensors")
            (folder / "hypernet_config.json").write_text(json.dumps(self.settings(), indent=2))

    @classmethod
    def load(cls, path: str | Path, student_hidden_size: int | None = None, student_num_layers: int | None = None,
             rebuild: str = "kedro run --pipelines stage1") -> HyperNetwork:
        """Load a saved hyper-network: checksums verified, and checked to fit the student it will guide."""
        path = Path(path)
        config_file, weights_file = path / "hypernet_config.json", path / "hypernet.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(f"No hyper-network at '{path}' (needs hypernet_config.json and hypernet.safetensors).")
        verify_folder(path, rebuild)
        config = HyperNetConfig(**json.loads(config_file.read_text()))
        config.check_fits(student_hidden_size, student_num_layers, where=f"at '{path}'")
        network = cls(config)
        try:
            network.load_state_dict(load_file(weights_file))
        except Exception as error:  # safetensors raises its own error types on corrupt files
            raise ValueError(
                f"Hyper-network weights at '{weights_file}' are unreadable ({error}); "
                f"retrain with `{rebuild}`."
            ) from error
        return network


def make_hypernet(site: GuidanceParams, hidden_size: int, num_layers: int, seed: int) -> HyperNetwork:
    """A fresh hyper-network for a student of this shape, at the configured read/injection site."""
    torch.manual_seed(seed)
    return HyperNetwork(HyperNetConfig.from_site(site, hidden_size, num_layers))
