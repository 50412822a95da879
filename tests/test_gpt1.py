"""GPT-1 model: the paper's size, parity with Hugging Face's OpenAIGPTLMHeadModel, learning, sampling, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from minilm.gpt1 import GPT1, GPT1Config, config_from_preset



def test_default_config_is_the_paper_with_116534784_parameters():
    with torch.device("meta"):  # shapes only: no 466 MB allocation
        model = GPT1(GPT1Config())
    c = model.config
    assert (c.vocab_size, c.n_ctx, c.n_layer, c.n_head, c.n_embd) == (40478, 512, 12, 12, 768)
    assert model.h[0].mlp.c_fc.out_features == 3072
    assert model.num_params() == 116_534_784
    assert model.lm_head.weight is model.tokens_embed.weight


def _hf_model(vocab=101, n_ctx=16, n_embd=32, n_layer=2, n_head=4, scale=10.0):
    """A random HF OpenAIGPTLMHeadModel with weights scaled up so the test can tell GELU variants apart."""
    transformers = pytest.importorskip("transformers")  # only the Hugging Face comparisons need it
    cfg = transformers.OpenAIGPTConfig(vocab_size=vocab, n_positions=n_ctx, n_embd=n_embd, n_layer=n_layer,
                                       n_head=n_head, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    hf = transformers.OpenAIGPTLMHeadModel(cfg).eval()
    # At the N(0, 0.02) init, pre-activations are so small that tanh- and erf-GELU differ by ~1e-7, below
    # fp32 noise. Scaling every matrix by 10 (and giving LayerNorms non-trivial gains and biases) makes the
    # MLP inputs O(1): swapping our tanh-GELU for erf-GELU then moves the logits by 1.3e-4 relative
    # (observed with this seed and config), against 2.7e-7 for the model as written.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
            else:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return hf


def _assert_logits_match(hf, ours, vocab=101, T=16):
    idx = torch.randint(0, vocab, (3, T))
    ours.eval()
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = ours(idx)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    # fp32: HF masks with -1e4 and we with -inf (exp underflows to 0 either way), and matmuls group sums
    # differently, so ~3e-7 relative is what agreement looks like; a wrong GELU is ~1e-4.
    assert rel < 2e-6, rel


def test_logits_match_huggingface_model_object():
    hf = _hf_model()
    _assert_logits_match(hf, GPT1.from_huggingface(hf))


def test_logits_match_huggingface_state_dict_and_base_model():
    hf = _hf_model()
    # The bare OpenAIGPTModel's state dict (no "transformer." prefix, no lm_head); n_head from overrides.
    _assert_logits_match(hf, GPT1.from_huggingface(hf.transformer.state_dict(), n_head=4))
    _assert_logits_match(hf, GPT1.from_huggingface(hf.state_dict(), n_head=4))


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_logits_match_huggingface_saved_directory(tmp_path, weights_file):
    hf = _hf_model(n_head=8)  # config.json must supply n_head=8 (the default would be 12)
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    if weights_file == "pytorch_model.bin":  # the older format, as older checkpoints ship it
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = GPT1.from_huggingface(tmp_path)
    assert model.config.n_head == 8
    _assert_logits_match(hf, model)


def test_from_huggingface_rejects_wrong_weights():
    hf = _hf_model()
    sd = hf.state_dict()
    with pytest.raises(ValueError, match="contradicts"):
        GPT1.from_huggingface(sd, n_head=4, n_embd=64)
    bad = dict(sd)
    bad.pop("transformer.h.1.ln_2.bias")
    with pytest.raises(ValueError, match="missing weights"):
        GPT1.from_huggingface(bad, n_head=4)
    with pytest.raises(ValueError, match="OpenAI GPT"):
        GPT1.from_huggingface({"wte.weight": torch.zeros(3, 4)})


def test_from_huggingface_names_a_damaged_file_in_one_line(tmp_path):
    pytest.importorskip("safetensors")
    for name, content, message in (("config.json", b"{", "config.json is not a JSON config"),
                                   ("config.json", b"[1]", "config.json holds a list, not a JSON object"),
                                   ("model.safetensors", b"garbage!", "cannot read .*model.safetensors"),
                                   ("pytorch_model.bin", b"garbage!", "cannot read .*pytorch_model.bin")):
        folder = tmp_path / f"{name}-{len(content)}"
        folder.mkdir()
        (folder / name).write_bytes(content)
        if name == "config.json":
            torch.save({}, folder / "pytorch_model.bin")
        with pytest.raises(ValueError, match=message) as info:
            GPT1.from_huggingface(folder)
        assert "\n" not in str(info.value)


def test_attention_dropout_drops_the_probabilities_without_bias(monkeypatch):
    # attn_pdrop 0.5, resid_pdrop 0, so the only noise is the dropout on the attention probabilities,
    # inside the fused kernel.
    import minilm.gpt1
    from minilm.gpt1 import CausalSelfAttention

    fused_calls = []
    real_causal_attention = minilm.gpt1.causal_attention

    def counting_causal_attention(*args, **kwargs):
        fused_calls.append(kwargs.get("dropout_p"))
        return real_causal_attention(*args, **kwargs)

    monkeypatch.setattr(minilm.gpt1, "causal_attention", counting_causal_attention)
    attn = CausalSelfAttention(config_from_preset("cpu-tiny", vocab_size=50, attn_pdrop=0.5))
    x = torch.randn(1, 12, 32)
    want = attn.eval()(x)[0]  # (T, C)
    N = 4000  # the same sequence N times: N independent dropout masks in one call
    out = attn.train()(x.expand(N, -1, -1))
    assert fused_calls == [0.0, 0.5]  # eval without dropout, training with it
    assert (out - want).abs().amax(dim=(1, 2)).min() > 1e-3  # every sample differs from eval
    # Inverted dropout is unbiased and the rest of the layer is linear in the probabilities, so the mean
    # output over the masks is the eval output (within 5 standard errors, element-wise).
    stderr = out.std(0) / N ** 0.5
    assert ((out.mean(0) - want).abs() <= 5 * stderr + 1e-6).all(), ((out.mean(0) - want).abs() / stderr).max()


def test_attention_dropout_changes_training_outputs_but_not_eval():
    torch.manual_seed(0)
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=50, attn_pdrop=0.5))
    idx = torch.randint(0, 50, (2, 32))
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])


def _assert_inverted_dropout(train_out, eval_out, p):
    """train_out is eval_out with each element zeroed with probability p and the rest scaled by 1/(1-p)."""
    dropped = train_out == 0
    assert abs(dropped.float().mean().item() - p) < 0.05, dropped.float().mean()
    torch.testing.assert_close(train_out[~dropped], eval_out[~dropped] / (1 - p))


def test_embedding_dropout_drops_the_summed_embeddings():
    # With no blocks, hidden_states is the dropped-out h_0 = U W_e + W_p itself.
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=50, n_layer=0, embd_pdrop=0.5))
    idx = torch.randint(0, 50, (4, 32))
    want = model.eval().hidden_states(idx)
    torch.testing.assert_close(want, model.tokens_embed(idx) + model.positions_embed.weight, rtol=0, atol=0)
    _assert_inverted_dropout(model.train().hidden_states(idx), want, 0.5)
    # and in the whole model (the other dropouts 0): training outputs differ from eval
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=50, embd_pdrop=0.5))
    assert not torch.allclose(model.train()(idx)[0], model.eval()(idx)[0])


def test_mlp_residual_dropout_drops_the_mlp_output():
    from minilm.gpt1 import MLP

    mlp = MLP(config_from_preset("cpu-tiny", resid_pdrop=0.5))
    x = torch.randn(4, 32, 32)
    _assert_inverted_dropout(mlp.train()(x), mlp.eval()(x), 0.5)


def test_attention_residual_dropout_drops_the_attention_output():
    from minilm.gpt1 import CausalSelfAttention

    attn = CausalSelfAttention(config_from_preset("cpu-tiny", attn_pdrop=0.0, resid_pdrop=0.5))
    x = torch.randn(4, 32, 32)
    _assert_inverted_dropout(attn.train()(x), attn.eval()(x), 0.5)


def test_loss_falls_on_a_tiny_corpus():
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog. " * 20
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=len(vocab)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(60):
        ix = torch.randint(0, len(data) - 33, (8,))
        x = torch.stack([data[i:i + 32] for i in ix])
        y = torch.stack([data[i + 1:i + 33] for i in ix])
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.9 * math.log(len(vocab))  # starts near uniform
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_loss_equals_cross_entropy_and_ignores_minus_one():
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=30)).eval()
    idx = torch.randint(0, 30, (2, 10))
    tgt = torch.randint(0, 30, (2, 10))
    tgt[0, :4] = -1
    logits, loss = model(idx, tgt)
    keep = tgt != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], tgt[keep]))


def test_generate_shapes_crop_and_top_k():
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=40))
    idx = torch.randint(0, 40, (3, 30))
    out = model.generate(idx, max_new_tokens=10)  # 30 + 10 > n_ctx=32: the context is cropped
    assert out.shape == (3, 40) and out.dtype == torch.long
    assert torch.equal(out[:, :30], idx)
    # top_k=1 is greedy: every new token is the argmax of the logits given the (cropped) prefix.
    out = model.generate(idx[:, :5], max_new_tokens=4, top_k=1)
    for t in range(5, 9):
        logits, _ = model(out[:, :t][:, -32:])
        assert torch.equal(out[:, t], logits[:, -1].argmax(-1))
    assert model.training  # generate restores the mode it found


def test_generate_crops_a_prompt_longer_than_n_ctx_as_documented():
    # The docstring promises the context is cropped to the last n_ctx tokens: a 50-token prompt (n_ctx 32)
    # is accepted, kept in the output, and continued exactly as its last 32 tokens alone would be.
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=40))
    idx = torch.randint(0, 40, (2, 50))
    out = model.generate(idx, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 55) and torch.equal(out[:, :50], idx)
    tail = model.generate(idx[:, -32:], max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:, 50:], tail[:, 32:])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):  # ids are still checked
        model.generate(torch.full((1, 50), 40), 1)


def _sharp_model(vocab=40):
    """A cpu-tiny GPT1 in eval mode whose logits are spread out (std ~0.7 rather than ~0.1 at init, the
    likeliest token ~0.3): a change to the sampling distribution then changes the samples."""
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=vocab)).eval()
    with torch.no_grad():
        model.tokens_embed.weight.mul_(5)  # tied: the output layer too
    return model


def test_generate_samples_from_the_softmax_of_logits_over_temperature():
    model = _sharp_model()
    idx = torch.randint(0, 40, (64, 5))
    for temperature in (0.5, 2.0):
        out = model.generate(idx, 3, temperature=temperature, generator=torch.Generator().manual_seed(7))
        g, want = torch.Generator().manual_seed(7), idx
        for _ in range(3):  # the same draws, from softmax(logits / T), with the same generator
            logits = model(want)[0][:, -1].float()
            nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=g)
            want = torch.cat((want, nxt), dim=1)
        assert torch.equal(out, want), temperature
        assert not torch.equal(out, model.generate(idx, 3, top_k=1))  # and it is sampling, not greedy
    # a temperature so small that logits / T overflows: greedy decoding, not NaN probabilities
    for tiny in (1e-40, 1e-300, 5e-324):
        assert torch.equal(model.generate(idx, 3, temperature=tiny), model.generate(idx, 3, top_k=1))


def test_generate_top_k_samples_among_the_k_largest_logits_only():
    # At init the logits are nearly uniform: the three largest are about equally likely, the rest would
    # be drawn often (37 of 40 tokens) if top_k let them through.
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=40)).eval()
    prompt = torch.randint(0, 40, (1, 6))
    top3 = set(model(prompt)[0][0, -1].topk(3).indices.tolist())
    out = model.generate(prompt.expand(300, -1), 1, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(out[:, -1].tolist()) == top3  # only those three, and each of them


def test_generate_feeds_the_model_the_last_n_ctx_tokens():
    model = _sharp_model()
    idx = torch.randint(0, 40, (16, 50))  # longer than n_ctx = 32
    lengths = []
    hook = model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    out = model.generate(idx, 3, generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert lengths == [32, 32, 32]  # the full context, cropped to its last n_ctx tokens
    g = torch.Generator().manual_seed(3)
    for t in range(50, 53):  # each token drawn from the model run on exactly the 32 tokens before it
        probs = F.softmax(model(out[:, t - 32:t])[0][:, -1].float(), dim=-1)
        assert torch.equal(out[:, t], torch.multinomial(probs, 1, generator=g)[:, 0])


def test_bad_input_gives_clear_errors():
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=40))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match=r"token ids must be in"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="targets must hold integer token ids"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 3.7))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown GPT-1 preset"):
        config_from_preset("gpt9")
    with pytest.raises(ValueError, match="divisible"):
        GPT1(config_from_preset("cpu-tiny", n_head=3))
    for temperature in (0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            model.generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=temperature)


def test_gpu_peak_flops_for_mfu():
    from minilm.gpt1 import gpu_peak_flops
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12  # not the A10's
    assert gpu_peak_flops("NVIDIA L40S") == 362e12 and gpu_peak_flops("NVIDIA L4") == 121e12
    assert gpu_peak_flops("Some Future GPU") is None  # no MFU rather than a wrong one


@pytest.mark.parametrize("field, value", [("n_layer", -1), ("n_head", 0), ("n_embd", 2.5), ("vocab_size", True),
                                          ("resid_pdrop", float("nan")), ("attn_pdrop", 1.5), ("weight_dropout", "0.1")])
def test_a_bad_config_value_is_refused_when_the_config_is_made(field, value):
    with pytest.raises(ValueError, match=f"GPT1Config: {field} must be"):
        GPT1Config(**{field: value})


def test_a_config_takes_numpy_numbers_and_the_bounds_themselves():
    import numpy as np
    config = GPT1Config(n_layer=np.int64(2), n_embd=np.int32(64), attn_pdrop=1.0, resid_pdrop=np.float32(0.5),
                        embd_pdrop=0)
    assert config.n_layer == 2 and config.attn_pdrop == 1.0


def test_int32_targets_are_token_ids_too():
    model = GPT1(config_from_preset("cpu-tiny", vocab_size=40)).eval()
    idx = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(model(idx, idx.int())[1], model(idx, idx)[1])


def test_from_huggingface_refuses_a_weight_file_that_is_no_state_dict_and_lets_memory_errors_through(tmp_path,
                                                                                                      monkeypatch):
    import minilm.gpt1 as g
    (tmp_path / "a").mkdir()
    torch.save([1, 2], tmp_path / "a" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        GPT1.from_huggingface(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.safetensors").write_bytes(b"x")

    def out_of_memory(path):
        raise MemoryError

    monkeypatch.setattr(g, "_load_safetensors", out_of_memory)
    with pytest.raises(MemoryError):
        GPT1.from_huggingface(tmp_path / "b")
