"""The whole Show, Attend and Tell model (Xu et al. 2015, soft attention), top to bottom.

Image side: a grid of R regions x C channels from a pretrained CNN (computed once, cached on disk).
Text side: an LSTMCell that, at every step, attends over the regions (Bahdanau attention), gates the
context with a scalar beta, and predicts the next word.

With `concept_input` the decoder also reads what the photo shows by name (semantic attributes, Yao et al. 2017
LSTM-A; You et al. 2016): the encoder's own frozen ImageNet classifier gives 1,000 class probabilities from the
pooled grid, embedded into one more "region" the attention can pick when it writes a word, and into the initial
state. ImageNet's labels come from 1.2 M photos, so they know cats, cups and pizzas Flickr8k's 6,000 barely show.

With `pyramid` k the attention also sees the grid at a coarser scale: its k x k average pooling (a spatial pyramid,
He et al. 2014), projected like the grid's own regions, so one region can stand for a whole object or the scene.

Shapes: B images, N captions (several per image), R regions, C feature channels, T steps, V words.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.config import Config
from captioner.features.encoder import HEAD_CHANNELS, encoder_top, get_spec, spec_parts

# The decoder state threaded through `step`: projected features (B,R,D) and their attention keys
# (B,R,A), one per image, then h and c (B*K,H), K hypotheses per image (beams; K=1 in training).
State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh as 2 sigmoid(2x) - 1 (the same to 2e-7): torch 2.13's CPU tanh is not vectorised, 4x slower here than
    this on the (B, K, R, A) attention tensor, the largest of a decoder step (benchmarks/decode_speed.py).
    ONNX graphs keep Tanh, which onnxruntime runs fast."""
    if torch.onnx.is_in_onnx_export():
        return torch.tanh(x)
    y = torch.sigmoid(2 * x)
    return 2 * y - 1 if y.requires_grad else y.mul_(2).sub_(1)


class Attention(nn.Module):
    """Additive attention: score_r = w . tanh(K_r + W h). K is precomputed once per image and
    shared by that image's K hypotheses, so beams never copy the image tensors."""

    def __init__(self, feature_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(decoder_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, values, keys, h):
        B, N = keys.size(0), h.size(0)
        q = self.query(h).view(B, N // B, -1)  # (B, K, A)
        e = self.score(_tanh(keys.unsqueeze(1) + q.unsqueeze(2))).squeeze(3)  # (B, K, R)
        alpha = torch.softmax(e, dim=2)
        context = torch.bmm(alpha, values)  # (B, K, D)
        return context.view(N, -1), alpha.view(N, -1)


class ShowAttendTell(nn.Module):
    def __init__(self, config: Config, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        D = config.project_dim
        H = config.decoder_dim
        # A "-cutK" encoder leaves its top K blocks and head to the model, which fine-tunes them.
        spec = get_spec(config.encoder)
        self.top = encoder_top(spec) if any(cut for _, cut in spec_parts(spec)) else None
        # Projecting the 1280-channel grid once per image keeps every per-step product small.
        self.project = nn.Sequential(nn.Linear(HEAD_CHANNELS if self.top else config.feature_dim, D), nn.ReLU(),
                                     nn.Dropout(config.dropout))
        self.attention = Attention(D, H, config.attention_dim)
        self.grid = spec.grid  # (gh, gw): where each region lies, for the pyramid and the attention maps
        if config.concept_input:
            self.imagenet = nn.Linear(HEAD_CHANNELS, 1000).requires_grad_(False)  # load_imagenet() fills it
            self.concept_embed = nn.Sequential(nn.Linear(1000, D), nn.ReLU(), nn.Dropout(config.dropout))
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H)
        self.beta = nn.Linear(H, 1)  # the gating scalar: how much the image matters for this word
        if config.aoa:  # attention on attention (Huang et al. 2019): an information vector and a gate from [context; h]
            self.aoa = nn.Linear(D + H, 2 * D)
        self.embed = nn.Embedding(vocab_size, config.embed_dim)
        self.lstm = nn.LSTMCell(config.embed_dim + D, H)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(H, vocab_size)
        if config.tie_weights:
            if config.embed_dim != H:
                raise ValueError("tie_weights needs embed_dim == decoder_dim")
            self.out.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self):
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)
        if not self.config.tie_weights:
            nn.init.uniform_(self.out.weight, -0.1, 0.1)

    def load_imagenet(self) -> None:
        """Copy the pretrained Lite2 classifier into a new concept-input model (its checkpoints carry it)."""
        from captioner.features.encoder import imagenet_classifier
        self.imagenet.load_state_dict(imagenet_classifier())

    def init_state(self, features: torch.Tensor) -> State:
        """Everything that depends only on the image, computed once per image: (B,R,C) -> State."""
        grid = features if self.top is None else self.top(features)
        regions = grid
        if self.config.pyramid:
            b, r, c = grid.shape
            coarse = F.adaptive_avg_pool2d(grid.transpose(1, 2).reshape(b, c, *self.grid), self.config.pyramid)
            regions = torch.cat([grid, coarse.flatten(2).transpose(1, 2)], 1)
        values = self.project(regions)
        mean = values[:, :grid.size(1)].mean(dim=1)
        if self.config.concept_input:
            concepts = torch.softmax(self.imagenet(grid[..., :HEAD_CHANNELS].float().mean(1)), 1)
            semantic = self.concept_embed(concepts.to(values.dtype))
            values = torch.cat([values, semantic.unsqueeze(1)], 1)  # the last region: the named concepts
            mean = mean + semantic
        keys = self.attention.key(values)
        return values, keys, torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    @staticmethod
    def select_state(state: State, rows: torch.Tensor, images: torch.Tensor | None = None) -> State:
        """Keep hypotheses `rows` of h and c, and images `images` of the per-image tensors."""
        values, keys, h, c = state
        if images is not None:
            values, keys = values.index_select(0, images), keys.index_select(0, images)
        return values, keys, h.index_select(0, rows), c.index_select(0, rows)

    def step(self, tokens: torch.Tensor, state: State):
        """One word: previous tokens (N,) -> logits (N,V), attention (N,R), next state."""
        values, keys, h, c = state
        context, alpha = self.attention(values, keys, h)
        if self.config.aoa:
            context = F.glu(self.aoa(torch.cat([context, h], 1)), dim=1)  # information * sigmoid(gate)
        context = torch.sigmoid(self.beta(h)) * context
        h, c = self.lstm(torch.cat([self.embed(tokens), context], dim=1), (h, c))
        logits = self.out(self.dropout(h))
        # attention maps show the grid; the coarse and concept regions have no place in it
        alpha = alpha[:, :self.grid[0] * self.grid[1]]
        return logits, alpha, (values, keys, h, c)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, image_index: torch.Tensor):
        """Teacher forcing. features (B,R,C); captions (N,L) = <start> words <end> <pad>...;
        image_index (N,) says which image each caption describes. Returns logits (N,L-1,V) and
        attention (N,L-1,R) for predicting captions[:, 1:]."""
        state = self.select_state(self.init_state(features), image_index, image_index)
        logits, alphas = [], []
        for t in range(captions.size(1) - 1):
            step_logits, alpha, state = self.step(captions[:, t], state)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)

    @torch.no_grad()
    def attention_weights(self, features, captions, image_index=None) -> torch.Tensor:
        """Per-step attention (N,L-1,R) for given captions, for visualisation."""
        if image_index is None:
            image_index = torch.arange(captions.size(0))
        return self(features, captions, image_index)[1]


class _FixedRange(nn.Module):
    """A dynamically quantised layer made batch-independent. PyTorch's dynamic int8 picks the activation scale
    from the min and max of the whole batch, so one photo's caption changed with the other photos in its batch.
    Here every input is clipped to a fixed [lo, hi] and one extra row spanning exactly [lo, hi] joins the batch:
    the scale is then the same for every batch, the int8 products are exact, and each row's result depends on
    that row alone."""

    def __init__(self, layer: nn.Module, lo: float, hi: float, h_range: tuple[float, float] | None = None):
        super().__init__()
        self.layer, self.lo, self.hi, self.h_range = layer, lo, hi, h_range
        width = layer.input_size if h_range else layer.in_features
        self.anchor = self._anchor(width, lo, hi)
        if h_range:
            self.h_anchor = self._anchor(layer.hidden_size, *h_range)
            self.c_anchor = torch.zeros(1, layer.hidden_size)

    @staticmethod
    def _anchor(width: int, lo: float, hi: float) -> torch.Tensor:
        row = torch.zeros(1, width)
        row[0, 0], row[0, -1] = lo, hi
        return row

    def forward(self, x, state=None):
        if x.dim() != 2:  # (B, R, C) grids
            return self(x.reshape(-1, x.size(-1))).reshape(*x.shape[:-1], -1)
        if self.lo != -1 or self.hi != 1:  # inputs in [-1, 1] are tanh/sigmoid outputs: in range already
            x = x.clamp(self.lo, self.hi)
        x = torch.cat([x, self.anchor])
        if state is None:  # Linear
            return self.layer(x)[:-1]
        h, c = state  # LSTMCell: the hidden state (tanh output, already in range) gets its own anchor
        h, c = self.layer(x, (torch.cat([h, self.h_anchor]), torch.cat([c, self.c_anchor])))
        return h[:-1], c[:-1]


def int8_ranges(model: ShowAttendTell, features: torch.Tensor) -> dict:
    """The fixed activation range of the LSTM input (word embedding and attended context), measured on some
    training grids (B, R, C) with a 25% margin. Saved in the checkpoint's metadata by tools/ship_model.py."""
    with torch.no_grad():
        values = model.init_state(features)[0]
        emb = model.embed.weight.detach()
    return {"lstm_lo": float(min(emb.min(), 0)) * 1.25, "lstm_hi": float(max(emb.max(), values.max())) * 1.25}


def quantize_int8(model: ShowAttendTell, ranges: dict | None = None) -> nn.Module:
    """A copy whose Linear and LSTMCell layers run with int8 weights.

    At batch 1 a decoder step is bound by reading ~7 M weights, so int8 decodes several times faster on a CPU.
    Activations are quantised over fixed ranges (_FixedRange): tanh/sigmoid outputs lie in [-1, 1], the grid in
    [0, 6], the LSTM input and the projected grid in `ranges` (int8_ranges), so captions never depend on the
    batch. Without `ranges` (a checkpoint from before they were saved) the float model is returned: exact,
    slower."""
    import copy
    import warnings
    if not ranges:
        return model
    # torch.ao quantisation is deprecated in favour of torchao, which has no int8 LSTMCell; the pinned
    # torch 2.13 still has it, and tests/test_api.py fails if that ever changes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic
        q = copy.deepcopy(model).eval()
        # input ranges: tanh/sigmoid outputs in [-1, 1]; the grid is ReLU6 output in [0, 6]; the projected grid
        # is ReLU output, bounded like the LSTM input. attention.score (256 -> 1) stays float: quantising its
        # (B*K*R, 256) input every step costs more than its 256 weights save.
        values = (0.0, ranges["lstm_hi"])
        layers = {"attention.query": (-1, 1), "beta": (-1, 1), "out": (-1, 1), "attention.key": values,
                  "init_h": values, "init_c": values}
        if q.top is None:
            layers["project.0"] = (0.0, 6.0)
        for name, (lo, hi) in layers.items():
            parent, _, attr = name.rpartition(".")
            owner = q.get_submodule(parent) if parent else q
            setattr(owner, attr, _FixedRange(quantize_dynamic(nn.Sequential(getattr(owner, attr)), {nn.Linear},
                                                              dtype=torch.qint8)[0], lo, hi))
        lstm = quantize_dynamic(nn.Sequential(q.lstm), {nn.LSTMCell}, dtype=torch.qint8)[0]
        q.lstm = _FixedRange(lstm, ranges["lstm_lo"], ranges["lstm_hi"], h_range=(-1.0, 1.0))
        return q


def caption_loss(logits, alphas, captions, config: Config, pad_id: int = 0):
    """Cross-entropy on the next word plus the doubly stochastic attention regulariser.
    Returns (total, cross-entropy). Kept outside the module so DistributedDataParallel wraps forward only."""
    targets = captions[:, 1:]
    xent = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=pad_id, label_smoothing=config.label_smoothing)
    mask = (targets != pad_id).unsqueeze(2).to(alphas.dtype)
    # Pushes every region to receive about one unit of attention over the whole caption.
    reg = ((1.0 - (alphas * mask).sum(1)) ** 2).mean()
    return xent + config.alpha_c * reg, xent
