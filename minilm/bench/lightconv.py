"""LightConv vs attention GPT-1: training-step tokens/s at equal width and depth.

Two GPT-1 models that differ only in `arch` ("attention": minilm's fused causal attention;
"lightconv": Wu et al. 2019's lightweight convolution) train on the same random token batches in the
same process: one step is forward, loss, backward and an AdamW update. The two are timed in
alternating rounds so that load on a shared machine falls on both alike; the table reports the best
round of each (the one least disturbed by other work) and the ratio. A second table times the replaced sublayer alone (attention vs
Linear → GLU → LightConv → Linear, forward + backward), which is where the models differ: at a small
width the tied output layer (vocab × n_embd) dominates the whole step and hides the difference.

Dropout is off in both models (the CPU presets have none anyway): this benchmark is about the architectures,
not about dropout (which the GPT-1 model applies inside its fused attention kernel).
"""
import torch

from minilm.bench.common import Reporter, device_name, peak_mib, positive_int, sync, threads_note, time_ms
from minilm.gpt1 import GPT1, CausalSelfAttention, config_from_preset
from minilm.lightconv import LightConvLayer

ARCHS = ("attention", "lightconv")
NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, weight_dropout=0.0)


def add_arguments(p):
    p.add_argument("--preset", default=None,
                   help="GPT-1 preset for width and depth (default: cpu-small on a CPU, gpt1 on CUDA)")
    p.add_argument("--batch_size", type=positive_int, default=None, help="sequences per step (default 8 CPU, 16 CUDA)")
    p.add_argument("--seq_lens", default=None,
                   help="comma-separated sequence lengths (default 128,512 on a CPU, 512,2048 on CUDA)")
    p.add_argument("--vocab_size", type=positive_int, default=8000,
                   help="default 8000: what `python -m minilm.data` trains on a corpus (GPT-1 itself: 40478)")
    p.add_argument("--rounds", type=positive_int, default=5, help="alternating timing rounds per model (best is reported)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast (default fp32 on a CPU, bf16 on CUDA)")


def _positive_ints(text, name):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"minilm.bench lightconv: {name} must be positive integers separated by commas, got {text!r}")
    return values


def _interleaved_ms(fns, device, rounds):
    """Best ms per call of each fn over alternating rounds (A B A B ...); each round is one warmup
    call (new shapes and allocator growth cost the first call) and two timed calls."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        try:
            fn()
        except (RuntimeError, NotImplementedError) as e:  # e.g. an op with no kernel for this device
            raise SystemExit(f"minilm.bench lightconv: the {name} model failed on {device}: "
                             f"{str(e).strip().splitlines()[0]}") from None
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device=device, warmup=1, iters=2))
    return {name: min(ts) for name, ts in times.items()}


def run(args):
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    preset = args.preset or ("gpt1" if on_cuda else "cpu-small")
    batch = args.batch_size or (16 if on_cuda else 8)
    seq_lens = _positive_ints(args.seq_lens or ("512,2048" if on_cuda else "128,512"), "--seq_lens")
    dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    try:
        base = config_from_preset(preset, vocab_size=args.vocab_size, n_ctx=max(seq_lens), **NO_DROPOUT)
    except ValueError as e:
        raise SystemExit(f"minilm.bench lightconv: {e}")
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    rep = Reporter(args.json)
    rep.note(f"# LightConv vs attention GPT-1 training step on {device_name(device)}; {threads_note()}")
    rep.note(f"# preset {preset} (n_layer={base.n_layer}, n_embd={base.n_embd}, n_head={base.n_head}), "
             f"vocab {base.vocab_size}, batch {batch}, {dtype}, best of {args.rounds} alternating rounds")

    # 1. The whole training step.
    models, opts = {}, {}
    for arch in ARCHS:
        torch.manual_seed(0)
        models[arch] = GPT1(config_from_preset(preset, vocab_size=args.vocab_size, n_ctx=max(seq_lens),
                                               arch=arch, **NO_DROPOUT)).to(device).train()
        opts[arch] = torch.optim.AdamW(models[arch].parameters(), lr=1e-4, **({"fused": True} if on_cuda else {}))
    params = {arch: models[arch].num_params() for arch in ARCHS}
    rep.note(f"# parameters: attention {params['attention']:,}, lightconv {params['lightconv']:,}")
    if not args.json:
        print(f"{'part':>9} {'T':>6} {'impl':>10} {'ms':>9} {'tokens/s':>10} {'vs attn':>8} {'peak_mib':>9}", flush=True)

    def row(part, T, arch, ms, peak, ratio):
        record = dict(op="lightconv", device=torch.device(device).type, device_name=device_name(device), dtype=dtype, shape=[batch, T], preset=preset,
                      **{"pass": part}, impl=arch, ms=ms, tokens_per_s=batch * T / ms * 1e3, peak_mib=peak,
                      speedup_vs_attention=ratio, params=params[arch] if part == "step" else None)
        if args.json:
            rep.row(record)
        else:
            pk = "-" if peak is None else f"{peak:.0f}"
            print(f"{part:>9} {T:>6} {arch:>10} {ms:>9.2f} {record['tokens_per_s']:>10.0f} {ratio:>7.2f}x {pk:>9}",
                  flush=True)

    for T in seq_lens:
        g = torch.Generator().manual_seed(T)
        idx = torch.randint(0, args.vocab_size, (batch, T + 1), generator=g).to(device)
        x, y = idx[:, :-1], idx[:, 1:]

        def make_step(arch):
            model, opt = models[arch], opts[arch]

            def step():
                with autocast:
                    _, loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        steps = {arch: make_step(arch) for arch in ARCHS}
        ms = _interleaved_ms(steps, device, args.rounds)
        for arch in ARCHS:
            row("step", T, arch, ms[arch], peak_mib(steps[arch], device), ms["attention"] / ms[arch])

    # 2. The sublayer that LightConv replaces, alone (the last layer's kernel width, the widest).
    cfg = models["lightconv"].config
    kernel = models["lightconv"].h[-1].lightconv.conv.kernel_size
    del models, opts
    mixers = {"attention": CausalSelfAttention(cfg).to(device).train(),
              "lightconv": LightConvLayer(cfg.n_embd, cfg.n_head, kernel, cfg.weight_dropout).to(device).train()}
    rep.note(f"# sublayer alone, forward + backward (lightconv kernel width {kernel})")
    for T in seq_lens:
        h = torch.randn(batch, T, cfg.n_embd, device=device, requires_grad=True)
        grad = torch.randn_like(h)

        def make_fb(arch):
            def fb():
                with autocast:
                    out = mixers[arch](h)
                out.backward(grad.to(out.dtype))
            return fb

        fbs = {arch: make_fb(arch) for arch in ARCHS}
        ms = _interleaved_ms(fbs, device, args.rounds)
        for arch in ARCHS:
            row("sublayer", T, arch, ms[arch], peak_mib(fbs[arch], device), ms["attention"] / ms[arch])
    sync(device)
