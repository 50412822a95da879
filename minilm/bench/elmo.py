"""ELMo training step: minilm's biLM vs the same model written with stock PyTorch parts, in one run.

    python -m minilm.bench elmo [--device cpu|cuda] [--json] [--preset small] [--batch_size 16] [--unroll_steps 20]
                                [--vocab_size 8192] [--iters N]

The peer is what a user would otherwise write: the char-CNN as `char_cnn_reference` (embedding →
Conv1d per width → max → activation), and per direction and layer an `nn.LSTM(P, C, proj_size=P)`
(cuDNN/ATen's fused LSTMP; it cannot clip the cell or the projection, so the peer runs without the
±3 clips — slightly less work than the real model). Everything else (highway, projection, skip
connections, shared full softmax, loss ×unroll_steps, Adagrad) is the same code path, and the peer
starts from minilm's weights. A step is train_elmo.py's (BiLM.stream_losses): each direction reads its
own stream, so the token encoder runs on 2 × batch × unroll_steps tokens (all of them: the bench calls
stream_losses without token_index, as its random tokens are all distinct anyway). Reported: ms
per training step (forward + backward + optimizer), tokens/s, model GFLOP/s
(minilm.elmo.estimate_flops_per_token), and the token encoder alone. The two models are timed in
alternating rounds (common.time_interleaved: the median of each one's steps).
"""
import torch
import torch.nn as nn

from minilm.bench.common import Reporter, device_name, peak_mib, positive_int, threads_note, time_interleaved
from minilm.elmo import PRESETS, BiLM, estimate_flops_per_token, preset
from minilm.ops import char_cnn_reference


def add_arguments(p):
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="ELMo preset (default small: 1024/128, 2048 filters)")
    p.add_argument("--batch_size", type=positive_int, default=None, help="rows per step (default 16 on cpu, 128 on cuda)")
    p.add_argument("--unroll_steps", type=positive_int, default=20)
    p.add_argument("--vocab_size", type=positive_int, default=8192, help="full-softmax vocabulary (default 8192)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed steps (default 5 on cpu, 20 on cuda)")


class CompositeBiLM(nn.Module):
    """The biLM from stock parts: char_cnn_reference and one nn.LSTM(proj_size=P) per direction and layer."""

    def __init__(self, bilm):
        super().__init__()
        self.bilm = bilm            # shares the token encoder's and softmax's parameters with a copy of minilm's model
        c = bilm.config
        self.forward_lstms = nn.ModuleList(nn.LSTM(c.projection_dim, c.lstm_dim, proj_size=c.projection_dim,
                                                   batch_first=True) for _ in range(c.n_layers))
        self.backward_lstms = nn.ModuleList(nn.LSTM(c.projection_dim, c.lstm_dim, proj_size=c.projection_dim,
                                                    batch_first=True) for _ in range(c.n_layers))
        with torch.no_grad():       # same weights; gate order i, f, g, o in PyTorch vs TF's i, j, f, o
            for ours, theirs in ((bilm.forward_layers, self.forward_lstms), (bilm.backward_layers, self.backward_lstms)):
                for layer, lstm in zip(ours, theirs):
                    def reorder(w):
                        i, j, f, o = w.chunk(4, 0)
                        return torch.cat([i, f, j, o])
                    lstm.weight_ih_l0.copy_(reorder(layer.input_linearity.weight))
                    lstm.weight_hh_l0.copy_(reorder(layer.state_linearity.weight))
                    b = layer.state_linearity.bias.clone()
                    b[2 * c.lstm_dim: 3 * c.lstm_dim] += 1.0        # TF's forget bias, added at run time by minilm
                    lstm.bias_hh_l0.copy_(reorder(b))
                    lstm.bias_ih_l0.zero_()
                    lstm.weight_hr_l0.copy_(layer.state_projection.weight)

    def token_embedding(self, char_ids):
        m, (B, T, L) = self.bilm, char_ids.shape
        x = char_cnn_reference(char_ids.reshape(B * T, L), m.char_embed.weight, [c.weight for c in m.char_cnn],
                               [c.bias for c in m.char_cnn], activation=m.config.activation)
        for hw in m.highway:
            x = hw(x)
        return m.projection(x).view(B, T, -1)

    def forward(self, char_ids, targets):
        # BiLM.stream_losses with stock parts: (2, B, T, 50) streams, each direction reading its own left to right
        _, B, T, L = char_ids.shape
        x = self.token_embedding(char_ids.reshape(2 * B, T, L)).view(2, B, T, -1)
        losses = []
        for d, lstms in enumerate((self.forward_lstms, self.backward_lstms)):
            inp = x[d]
            for k, lstm in enumerate(lstms):
                h, _ = lstm(inp)
                inp = h + inp if (k > 0 and self.bilm.config.use_skip_connections) else h
            losses.append(self.bilm.lm_loss(inp, targets[d]))
        return torch.stack(losses)


def run(args):
    dev = args.device
    on_gpu = dev.startswith("cuda")
    B = args.batch_size or (128 if on_gpu else 16)
    T = args.unroll_steps
    iters = args.iters or (20 if on_gpu else 5)
    V = args.vocab_size
    rep = Reporter(args.json)
    torch.manual_seed(0)
    config = preset(args.preset, vocab_size=V, dropout=0.0, n_negative_samples=0)   # full softmax, no dropout
    minilm_model = BiLM(config).to(dev)
    peer_base = BiLM(config).to(dev)
    peer_base.load_state_dict(minilm_model.state_dict())
    peer = CompositeBiLM(peer_base).to(dev)
    chars = torch.randint(1, config.n_characters, (2, B, T, config.max_characters_per_token), device=dev)
    targets = torch.randint(0, V, (2, B, T), device=dev)
    rep.note(f"ELMo training step, preset {args.preset} ({sum(p.numel() for p in minilm_model.parameters()):,} params "
             f"with a {V}-word softmax), batch {B} × {T} tokens, fp32, {device_name(dev)}; {threads_note()}")

    flops = estimate_flops_per_token(config, V) * B * T
    steps, enc_steps = {}, {}
    for impl, model in (("minilm", minilm_model), ("composite", peer)):
        opt = torch.optim.Adagrad(model.parameters(), lr=0.2, initial_accumulator_value=1.0)
        forward = (lambda m=model: m.stream_losses(chars, targets)[0]) if impl == "minilm" else (lambda m=model: m(chars, targets))

        def step(model=model, opt=opt, forward=forward):
            loss = forward().mean()
            opt.zero_grad(set_to_none=True)
            (loss * T).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()

        def enc_step(model=model):
            model.zero_grad(set_to_none=True)
            model.token_embedding(chars.view(2 * B, T, -1)).sum().backward()    # both streams, as a step encodes them

        steps[impl], enc_steps[impl] = step, enc_step

    results = time_interleaved(steps, dev, warmup=1, iters=iters)
    mems = {impl: peak_mib(step, dev) for impl, step in steps.items()}
    for impl, ms in results.items():
        rep.row({"op": "elmo", "dtype": "fp32", "shape": [B, T], "pass": "train", "impl": impl, "ms": ms,
                 "gflops": flops / ms / 1e6, "peak_mib": mems[impl], "tokens_per_s": B * T / ms * 1e3,
                 "device": torch.device(dev).type, "device_name": device_name(dev), "preset": args.preset})
    for impl, ms_enc in time_interleaved(enc_steps, dev, warmup=1, iters=iters).items():
        rep.row({"op": "token_enc", "dtype": "fp32", "shape": [2 * B, T], "pass": "fwd+bwd", "impl": impl, "ms": ms_enc,
                 "gflops": None, "peak_mib": None, "tokens_per_s": 2 * B * T / ms_enc * 1e3,
                 "device": torch.device(dev).type, "device_name": device_name(dev), "preset": args.preset})
    rep.note(f"tokens/s: minilm {B * T / results['minilm'] * 1e3:,.0f}, composite {B * T / results['composite'] * 1e3:,.0f}; "
             f"minilm / composite speed = {results['composite'] / results['minilm']:.2f}×")
