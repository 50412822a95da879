import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import minilm.elmo
from minilm.elmo import (BiLM, ELMo, ELMoConfig, ScalarMix, batch_to_ids, load_bilm, log_uniform_candidates, preset,
                         reverse_padded, word_to_char_ids)


def tiny_config(**kw):
    base = dict(char_embed_dim=4, filters=((1, 4), (2, 8), (3, 8)), n_highway=2, lstm_dim=24, projection_dim=8,
                n_layers=2, cell_clip=3.0, proj_clip=3.0, dropout=0.0)
    return ELMoConfig(**{**base, **kw})


def make_model(**kw):
    torch.manual_seed(0)
    return BiLM(tiny_config(**kw)).eval()


# -- character vocabulary ----------------------------------------------------------------------

def test_word_char_ids_are_bytes_between_bow_and_eow_shifted_by_one():
    ids = word_to_char_ids("cat")
    assert len(ids) == 50
    # bilm-tf: [BOW 258, c, a, t, EOW 259, PAD 260 ...]; +1 everywhere so 0 can mark a padding token
    assert ids[:6] == [259, ord("c") + 1, ord("a") + 1, ord("t") + 1, 260, 261]
    assert set(ids[5:]) == {261}


def test_sentence_markers_and_multibyte_words():
    assert word_to_char_ids("<S>")[:4] == [259, 257, 260, 261]      # BOW, BOS, EOW, PAD
    assert word_to_char_ids("</S>")[:4] == [259, 258, 260, 261]     # BOW, EOS, EOW, PAD
    han = word_to_char_ids("한")                                     # 3 UTF-8 bytes
    assert han[:5] == [259] + [b + 1 for b in "한".encode()] + [260]
    long = word_to_char_ids("가" * 30)                                # 90 bytes → first 48 kept (16 syllables)
    assert long[0] == 259 and long[1:49] == [b + 1 for b in ("가" * 16).encode()] and long[49] == 260
    assert word_to_char_ids("é\ud800") == word_to_char_ids("é")       # unencodable: dropped (bilm-tf's "ignore")


def test_batch_to_ids_adds_markers_and_pads_with_zero_rows():
    ids = batch_to_ids([["a", "b", "c"], ["d"]])
    assert ids.shape == (2, 5, 50) and ids.dtype == torch.long
    assert ids[1, 0].tolist() == word_to_char_ids("<S>") and ids[1, 2].tolist() == word_to_char_ids("</S>")
    assert (ids[1, 3:] == 0).all() and (ids[0] > 0).any(-1).all()
    with pytest.raises(TypeError, match="list of str tokens"):
        batch_to_ids(["not split"])
    with pytest.raises(ValueError, match="non-empty"):
        batch_to_ids([])


# -- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [("small", 13_593_312), ("medium", 28_027_744), ("original", 93_600_864)])
def test_released_model_sizes_without_softmax(name, expected):
    with torch.device("meta"):
        model = BiLM(preset(name))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_char_cnn_starts_from_bilm_tfs_initialisers(activation):
    # bilm-tf training.py make_convolutions: relu filters U(-0.05, 0.05) ("Kim et al 2015"), tanh filters
    # N(0, 1/(width·char_dim)) ("glorot init"); biases 0
    torch.manual_seed(0)
    config = preset("small", activation=activation)
    model = BiLM(config)
    for conv, (w, n) in zip(model.char_cnn, config.filters):
        W = conv.weight.detach()
        assert W.shape == (n, config.char_embed_dim, w) and not conv.bias.any()
        if activation == "relu":
            assert W.abs().max() <= 0.05 and W.std().item() == pytest.approx(0.1 / math.sqrt(12), rel=0.15)
        else:
            assert W.std().item() == pytest.approx(math.sqrt(1 / (w * config.char_embed_dim)), rel=0.15)
            assert W.abs().max() > 0.05


def test_bad_input_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match=r"\(B, T, 50\)"):
        model(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 3, 50, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 262\)"):
        model(torch.full((1, 3, 50), 262))
    with pytest.raises(ValueError, match="no softmax"):
        model(batch_to_ids([["a"]]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_empty_batches_and_empty_sequences_give_empty_outputs():
    model = make_model()
    elmo = ELMo(model, dropout=0.0)
    D = 2 * model.config.projection_dim
    for B, T in ((0, 4), (2, 0), (2, 1)):
        char_ids = torch.zeros(B, T, 50, dtype=torch.long)
        layers, mask, _ = model(char_ids)
        assert [tuple(h.shape) for h in layers] == [(B, T, D)] * 3 and mask.shape == (B, T)
        reps, mask = elmo(char_ids)
        assert reps.shape == (B, max(T - 2, 0), D) and mask.shape == (B, max(T - 2, 0))


# -- the biLM is two language models, not a bidirectional LSTM ----------------------------------

def test_no_direction_peeks():
    model = make_model()
    words = "the quick brown fox jumps over the lazy dog".split()
    t = 5                                                   # position in the (B, T+2) sequence
    changed_after = words[:t] + ["CHANGED", "words", "here"]             # positions 1..t kept (0 is <S>)
    changed_before = ["Other", "start", "ok", "then"] + words[t - 1:]   # positions t.. kept, same length
    with torch.no_grad():
        base, _, _ = model(batch_to_ids([words]))
        after, _, _ = model(batch_to_ids([changed_after]))
        before, _, _ = model(batch_to_ids([changed_before]))
    P = model.config.projection_dim
    for j in range(1, 3):
        # forward half up to t unchanged by later tokens; the backward half does change
        torch.testing.assert_close(after[j][0, : t + 1, :P], base[j][0, : t + 1, :P], rtol=0, atol=0)
        assert not torch.allclose(after[j][0, t, P:], base[j][0, t, P:])
        # backward half from t on unchanged by earlier tokens; the forward half does change
        torch.testing.assert_close(before[j][0, t:, P:], base[j][0, t:, P:], rtol=0, atol=0)
        assert not torch.allclose(before[j][0, t, :P], base[j][0, t, :P])


def test_documents_that_torch_stacked_bidirectional_lstm_peeks_and_our_bilm_does_not():
    """Documents torch's nn.LSTM, not a minilm bug: why BiLM keeps two stacks. In nn.LSTM(bidirectional=True,
    num_layers=2) the layer-2 forward output at t depends on x[t+1:] (through layer 1's backward half); with
    one layer it does not. The same gradient probe on minilm's BiLM (2 layers): its forward half at t sees
    no later input and its backward half no earlier one."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4, requires_grad=True)
    for num_layers, peeks in ((2, True), (1, False)):
        lstm = nn.LSTM(4, 5, num_layers=num_layers, bidirectional=True, batch_first=True)
        out, _ = lstm(x)
        (grad,) = torch.autograd.grad(out[0, 2, :5].sum(), x)      # forward half at t = 2
        assert (grad[0, 3:].abs().sum() > 0).item() is peeks
    model = make_model()
    P, t = model.config.projection_dim, 2
    ids = batch_to_ids([["four", "words", "in", "all"]])                  # 6 positions with <S>, </S>
    x = torch.randn(1, 6, P, requires_grad=True)
    model.token_embedding = lambda char_ids: x                           # the biLM reads x as its token layer
    top = model(ids)[0][-1]                                               # (1, 6, 2P) = [h_fwd; h_bwd] of layer 2
    (fwd,) = torch.autograd.grad(top[0, t, :P].sum(), x, retain_graph=True)
    (bwd,) = torch.autograd.grad(top[0, t, P:].sum(), x)
    assert (fwd[0, t + 1:] == 0).all() and (fwd[0, : t + 1].abs().sum(-1) > 0).all()   # left context only
    assert (bwd[0, :t] == 0).all() and (bwd[0, t:].abs().sum(-1) > 0).all()           # right context only


def test_padding_never_changes_a_real_tokens_output():
    model = make_model()
    short, long = "a short one".split(), "a much longer sentence with many more words in it".split()
    with torch.no_grad():
        alone, _, _ = model(batch_to_ids([short]))
        batched, mask, _ = model(batch_to_ids([long, short]))
    n = len(short) + 2
    assert mask[1].tolist() == [True] * n + [False] * (len(long) - len(short))
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b[1, :n], a[0], rtol=1e-5, atol=1e-6)   # same math, different batch shapes
        assert (b[1, n:] == 0).all()


def test_carried_state_continues_each_row_where_the_last_call_left_it():
    # With state (bilm-tf's dumps, allennlp's Elmo), sentence B after sentence A in the same row is read
    # as if the forward LM had read A then B, and the backward LM reverse(B) after reverse(A): so its
    # forward half equals B's positions in the single sequence A·B, its backward half B's positions
    # in B·A, both from zero states. Rows of different lengths: each row's state is the one after its
    # own last token, not after the padding.
    model = make_model()
    A = ["a much longer first sentence".split(), "short".split()]
    B = ["then another one".split(), "and the second row goes on for longer".split()]
    P = model.config.projection_dim
    state = {}
    with torch.no_grad():
        first, _, _ = model(batch_to_ids(A), state=state)
        zero, _, _ = model(batch_to_ids(A))
        for a, b in zip(first, zero):
            assert torch.equal(a, b)                                   # an empty dict: zero states
        second, mask, _ = model(batch_to_ids(B), state=state)
        for r in range(2):
            a, b = batch_to_ids([A[r]]), batch_to_ids([B[r]])
            ab, _, _ = model(torch.cat([a, b], 1))
            ba, _, _ = model(torch.cat([b, a], 1))
            n = b.shape[1]
            assert mask[r].sum() == n
            for k in range(1, len(second)):                            # the LSTM layers
                torch.testing.assert_close(second[k][r, :n, :P], ab[k][0, -n:, :P], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(second[k][r, :n, P:], ba[k][0, :n, P:], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(second[-1][r, :n], model(b)[0][-1][0])    # the state did change them
        with pytest.raises(ValueError, match="state holds 2 rows, this batch has 1"):
            model(batch_to_ids(B[:1]), state=state)
        with pytest.raises(TypeError, match="state must be a dict"):
            model(batch_to_ids(B), state=[])
        for bad in ({"forward": []}, {"forward": 1, "backward": 2}, {"forward": {}, "backward": {}},
                    {"forward": state["forward"][:-1], "backward": state["backward"][:-1]},   # another model's layers
                    {**state, "extra": state["forward"]}):
            with pytest.raises(ValueError, match="only BiLM calls of this model have filled"):
                model(batch_to_ids(B), state=bad)
    state = {}
    for batch in (A, B):   # carried state is detached: the second backward does not reach into the first graph
        model(batch_to_ids(batch), state=state)[0][-1].sum().backward()
    model.double()
    assert model(batch_to_ids(A), state=state)[0][-1].dtype == torch.float64   # the state follows the model
    assert state["backward"][-1][1].dtype == torch.float64


def test_stream_losses_are_forwards_losses_when_the_backward_stream_is_the_forward_one_reversed():
    # one unpadded row per sentence: BiLM.forward's backward LM reads the row right to left, which is
    # stream_losses with the flipped row as the backward stream and the flipped previous words as targets
    model = make_model(vocab_size=30, n_negative_samples=0)
    ids = batch_to_ids([["one", "two", "three", "four", "five"], ["six", "seven", "eight", "nine", "ten"]])
    nxt, prev = torch.randint(0, 30, (2, 2, ids.shape[1]))
    with torch.no_grad():
        _, _, expected = model(ids, nxt, prev)
        losses, _ = model.stream_losses(torch.stack([ids, ids.flip(1)]), torch.stack([nxt, prev.flip(1)]))
    torch.testing.assert_close(losses, expected)


def test_stream_losses_carry_each_rows_state_into_the_next_batch():
    # bilm-tf's training: a row's stream cut into two batches of T1 and T2 steps, with the first call's
    # state carried into the second, scores exactly what one call over T1 + T2 steps does
    model = make_model(vocab_size=30, n_negative_samples=0)
    torch.manual_seed(1)
    chars = torch.randint(1, 262, (2, 3, 9, 50))
    targets = torch.randint(0, 30, (2, 3, 9))
    with torch.no_grad():
        whole, last = model.stream_losses(chars, targets)
        first, state = model.stream_losses(chars[:, :, :4], targets[:, :, :4])
        second, state = model.stream_losses(chars[:, :, 4:], targets[:, :, 4:], state)
        restart, _ = model.stream_losses(chars[:, :, 4:], targets[:, :, 4:])
    torch.testing.assert_close((4 * first + 5 * second) / 9, whole)
    assert not torch.allclose(restart, second)                        # the carried state did matter
    for (m1, c1), (m2, c2) in zip(sum(last, []), sum(state, [])):
        torch.testing.assert_close((m2, c2), (m1, c1))
    model.train()
    losses, state = model.stream_losses(chars[:, :, :4], targets[:, :, :4])
    losses.sum().backward()                                           # the returned state is detached
    assert all(not t.requires_grad for layer in sum(state, []) for t in layer)
    # the distinct words encoded once and picked by token_index: the same losses and gradients
    words = torch.randint(1, 262, (5, 50))
    where = torch.randint(0, 5, (2, 3, 9))
    grads = []
    for args in ((words[where], targets), (words, targets, None, where)):
        model.zero_grad()
        torch.manual_seed(2)                                          # the same dropout masks
        losses, _ = model.stream_losses(*args)
        losses.sum().backward()
        grads.append((losses.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"must be \(2, B, T, 50\)"):
        model.stream_losses(chars[0], targets[0])
    with pytest.raises(ValueError, match="pick one of the 5 rows"):
        model.stream_losses(words, targets, None, where + 1)
    with pytest.raises(ValueError, match=r"char_ids must be \(U, 50\)"):
        model.stream_losses(words[None], targets, None, where)
    with pytest.raises(ValueError, match="state must be None or what it returned for 2 rows"):
        model.stream_losses(chars[:, :2], targets[:, :2], state)                   # a state of 3 rows
    with pytest.raises(ValueError, match="state must be None or what it returned"):
        model.stream_losses(chars, targets, {"forward": []})
    with pytest.raises(ValueError, match="character ids must lie in"):
        model.stream_losses(chars + 300, targets)

def test_reverse_padded_reverses_within_each_length():
    x = torch.arange(10.0).view(2, 5, 1)
    out = reverse_padded(x, torch.tensor([5, 3]))
    assert out[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    torch.testing.assert_close(reverse_padded(out, torch.tensor([5, 3])), x)


# -- loss ------------------------------------------------------------------------------------

def test_eval_loss_is_full_softmax_cross_entropy_and_training_lowers_it():
    torch.manual_seed(0)
    V = 12
    model = BiLM(tiny_config(vocab_size=V, n_negative_samples=0))
    # a repetitive "corpus": each word id determines its neighbours
    words = [f"w{i}" for i in range(V)]
    seq = torch.tensor([list(range(s, s + 8)) for s in range(4)]) % V               # (4, 8) word ids
    ids = batch_to_ids([[words[i] for i in row[1:-1]] for row in seq.tolist()])[:, 1:-1]   # no markers
    nxt, prv = seq[:, 2:], seq[:, :-2]                                              # (4, 6)
    model.eval()
    layers, _, losses = model(ids, nxt, prv)
    P = model.config.projection_dim
    manual_fwd = nn.functional.cross_entropy(model.softmax(layers[-1][..., :P]).reshape(-1, V), nxt.reshape(-1))
    manual_bwd = nn.functional.cross_entropy(model.softmax(layers[-1][..., P:]).reshape(-1, V), prv.reshape(-1))
    torch.testing.assert_close(losses, torch.stack([manual_fwd, manual_bwd]))
    start = losses.mean().item()
    model.train()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.2, initial_accumulator_value=1.0)
    for _ in range(60):
        _, _, losses = model(ids, nxt, prv)
        opt.zero_grad()
        (losses.mean() * nxt.shape[1]).backward()     # bilm-tf: gradient of loss × unroll_steps
        opt.step()
    model.eval()
    with torch.no_grad():
        end = model(ids, nxt, prv)[2].mean().item()
    assert end < 0.5 * start


def test_sampled_softmax_trains_the_full_softmax_loss_down():
    torch.manual_seed(0)
    V = 200
    model = BiLM(tiny_config(vocab_size=V, n_negative_samples=20))
    words = [f"w{i}" for i in range(V)]
    seq = torch.randint(0, 10, (8, 12))                                             # frequent ids only
    seq[:, 1::2] = (seq[:, 0::2] + 1) % 10                                          # some structure
    ids = batch_to_ids([[words[i] for i in row[1:-1]] for row in seq.tolist()])[:, 1:-1]
    nxt, prv = seq[:, 2:], seq[:, :-2]
    model.eval()
    with torch.no_grad():
        start = model(ids, nxt, prv)[2].mean().item()
    model.train()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.2, initial_accumulator_value=1.0)
    for _ in range(30):
        loss = model(ids, nxt, prv)[2].mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        (loss * nxt.shape[1]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = model(ids, nxt, prv)[2].mean().item()
    assert end < start - 1.0


def _tf_log_uniform_sample(V, K, rng):
    """TF's LogUniformSampler with unique=True, one draw at a time: (the K distinct ids, num_tries)."""
    ids, tries = [], 0
    while len(ids) < K:
        k = int(np.exp(rng.random() * np.log(V + 1))) - 1
        tries += 1
        if k not in ids:
            ids.append(k)
    return ids, tries


def test_log_uniform_candidates_are_distinct_and_distributed_as_tfs_sequential_sampler():
    V, K, runs = 30, 8, 2000
    rng = np.random.default_rng(0)
    ours, theirs = np.zeros(V), np.zeros(V)
    our_tries = their_tries = 0
    for _ in range(runs):
        ids, tries = log_uniform_candidates(V, K)
        assert len(set(ids.tolist())) == K and 0 <= ids.min() and ids.max() < V and tries >= K
        ours[ids.numpy()] += 1
        our_tries += tries
        ids, tries = _tf_log_uniform_sample(V, K, rng)
        theirs[ids] += 1
        their_tries += tries
    # how often each id is among the K: the same process, so equal up to sampling noise (σ ≤ 0.016)
    np.testing.assert_allclose(ours / runs, theirs / runs, atol=0.07)
    assert our_tries / runs == pytest.approx(their_tries / runs, rel=0.05)
    torch.manual_seed(5)
    a = log_uniform_candidates(1000, 100)
    torch.manual_seed(5)
    b = log_uniform_candidates(1000, 100)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]                    # a function of the generator's state


@pytest.mark.parametrize("tries", [9, 6])                         # 6 == K: every draw was new
def test_sampled_softmax_loss_is_tfs_with_unique_sampling_and_accidental_hits_removed(monkeypatch, tries):
    V, K = 50, 6
    model = BiLM(tiny_config(vocab_size=V, n_negative_samples=K)).train()
    sampled = torch.tensor([0, 3, 7, 1, 20, 4])
    monkeypatch.setattr(minilm.elmo, "log_uniform_candidates", lambda V_, K_, device: (sampled, tries))
    h = torch.randn(5, model.config.projection_dim)
    targets = torch.tensor([3, 10, 0, 49, 3])                    # rows 0, 2 and 4 hit a sampled id
    loss = model._sampled_softmax_loss(h, targets)
    # TF: logits − log Q, Q = 1 − (1 − p)^num_tries (unique sampling; p·K when num_tries == K), hits set
    # to −FLOAT_MAX; in float64
    W, b = model.softmax.weight.detach().double().numpy(), model.softmax.bias.detach().double().numpy()
    hh = h.double().numpy()
    p = lambda k: np.log((k + 2) / (k + 1)) / np.log(V + 1)
    log_q = lambda k: np.log(p(k) * K if tries == K else 1 - (1 - p(k)) ** tries)
    expected = []
    for n, t in enumerate(targets.tolist()):
        logits = [hh[n] @ W[t] + b[t] - log_q(t)]
        logits += [hh[n] @ W[s] + b[s] - log_q(s) if s != t else -np.finfo(np.float32).max for s in sampled.tolist()]
        logits = np.array(logits)
        expected.append(np.logaddexp.reduce(logits) - logits[0])
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_training_uses_the_sampled_softmax_only_when_the_vocabulary_is_larger_than_k():
    model = BiLM(tiny_config(vocab_size=50, n_negative_samples=6)).train()
    h = torch.randn(2, 4, model.config.projection_dim)
    targets = torch.tensor([[3, 10, -1, 49], [0, -1, 7, 7]])           # −1: no target, left out
    keep = targets >= 0
    with torch.no_grad():
        torch.manual_seed(3)
        loss = model.lm_loss(h, targets)
        torch.manual_seed(3)
        sampled = model._sampled_softmax_loss(h[keep], targets[keep])
        full = nn.functional.cross_entropy(model.softmax(h[keep]), targets[keep])
        assert torch.equal(loss, sampled) and not torch.allclose(loss, full)
        model.eval()                                                     # evaluation: always the full softmax
        torch.testing.assert_close(model.lm_loss(h, targets), full)
        small = BiLM(tiny_config(vocab_size=50, n_negative_samples=50)).train()   # K ≥ V: full softmax
        torch.testing.assert_close(small.lm_loss(h, targets),
                                   nn.functional.cross_entropy(small.softmax(h[keep]), targets[keep]))


def test_a_training_step_gives_the_same_gradients_every_time_on_several_threads():
    # A batch's tokens repeat their words (in token_index) and their targets (in the softmax): torch's CPU backward of
    # an index like words[token_index] adds repeated rows with parallel atomics, in an order that changes from call to
    # call, and a run of one seed then drifted from itself (and from its own resume) after a few dozen steps. Sizes
    # past torch's parallel grain (2 · 16 · 40 tokens × 64 wide) so that several threads share that work.
    torch.manual_seed(0)
    model = BiLM(tiny_config(vocab_size=3000, n_negative_samples=256, projection_dim=64, lstm_dim=96)).train()
    words = batch_to_ids([[f"w{i}" for i in range(50)]])[0]                       # (50, 50) distinct words' char ids
    token_index = torch.randint(0, 50, (2, 16, 40))
    targets = torch.randint(0, 50, (2, 16, 40))                                     # few ids: every row repeats
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        first = None
        for _ in range(6):
            torch.manual_seed(1)                                                   # the same candidates each time
            model.zero_grad()
            model.stream_losses(words, targets, token_index=token_index)[0].sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            first = first or grads
            for n in grads:
                assert torch.equal(grads[n], first[n]), n
    finally:
        torch.set_num_threads(threads)


# -- ELMo --------------------------------------------------------------------------------------

def test_scalar_mix_starts_as_an_average_and_layer_norm_uses_unmasked_elements():
    layers = [torch.randn(2, 4, 6) * (j + 1) + j for j in range(3)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    mix = ScalarMix(3)
    torch.testing.assert_close(mix(layers, mask), sum(layers) / 3)
    with torch.no_grad():
        mix.scalar_parameters.copy_(torch.tensor([0.0, 1.0, 2.0]))
        mix.gamma.fill_(2.0)
    s = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    torch.testing.assert_close(mix(layers, mask), 2.0 * sum(w * h for w, h in zip(s, layers)))
    ln = ScalarMix(3, do_layer_norm=True)
    expected = 0
    for h in layers:
        real = h[mask]                                            # (n_real, 6): every unmasked element
        expected = expected + (h - real.mean()) / real.var(unbiased=False).sqrt() / 3
    torch.testing.assert_close(ln(layers, mask), expected, rtol=1e-5, atol=1e-5)


def test_elmo_strips_markers_and_trains_only_the_mix():
    bilm = make_model()
    for bad in (float("nan"), 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="ELMo: dropout must be a number in"):
            ELMo(bilm, dropout=bad)
    ELMo(bilm, dropout=1.0), ELMo(bilm, dropout=0)   # the bounds themselves are dropouts
    elmo = ELMo(bilm, dropout=0.0)
    sents = [["I", "saw", "a", "play"], ["Let", "us", "play"]]
    ids = batch_to_ids(sents)
    reps, mask = elmo(ids)
    assert reps.shape == (2, 4, 2 * bilm.config.projection_dim)
    assert mask.sum(1).tolist() == [4, 3] and (reps[1, 3] == 0).all()
    layers, _, _ = bilm(ids)
    torch.testing.assert_close(reps[1, :3], (sum(layers) / 3)[1, 1:4])   # w = 0, γ = 1: plain average
    reps.sum().backward()
    assert elmo.scalar_mix.scalar_parameters.grad is not None and elmo.scalar_mix.gamma.grad is not None
    assert all(p.grad is None for p in bilm.parameters())
    elmo.train()
    assert not bilm.training


def _assert_dropped_out(dropped, full, p):
    """dropped is nn.Dropout(p) of full in training: each element either 0 or full / (1 − p), about p of them 0."""
    assert (full != 0).all()
    kept = dropped != 0
    assert 0.3 < kept.float().mean().item() < 0.7, kept.float().mean()          # p = 0.5, hundreds of elements
    torch.testing.assert_close(dropped[kept], full[kept] / (1 - p))


def test_elmo_applies_its_output_dropout_in_training_only():
    elmo = ELMo(make_model(), dropout=0.5)
    ids = batch_to_ids([["The", "cat", "sat", "on", "the", "mat", "."], ["Hello", "world"]])
    with torch.no_grad():
        ref, mask = elmo.eval()(ids)
        torch.manual_seed(0)
        out, _ = elmo.train()(ids)
    _assert_dropped_out(out[mask], ref[mask], 0.5)
    assert (out[~mask] == 0).all()


def test_bilm_drops_out_each_lstm_layers_input_and_the_softmax_input_in_training_only():
    # bilm-tf: DropoutWrapper(input_keep_prob) around every LSTM cell, and dropout on the top output
    # before the softmax. Hooks see what each LSTMP layer and the softmax actually receive.
    model = make_model(dropout=0.5, vocab_size=20, n_negative_samples=0)
    ids = batch_to_ids([["a", "sentence", "long", "enough", "to", "count", "dropped", "values"]])
    nxt = prv = torch.zeros(1, ids.shape[1], dtype=torch.long)
    seen = {}
    named = {"f0": model.forward_layers[0], "f1": model.forward_layers[1],
             "b0": model.backward_layers[0], "b1": model.backward_layers[1], "softmax": model.softmax}
    for name, module in named.items():
        module.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, []).append(
            (inp[0], out[0] if isinstance(out, tuple) else out)))                  # an LSTMP returns (m, state)
    P = model.config.projection_dim
    with torch.no_grad():
        x = model.token_embedding(ids)
        lengths = torch.tensor([ids.shape[1]])
        for training in (True, False):
            seen.clear()
            torch.manual_seed(0)
            layers, _, _ = model.train(training)(ids, nxt, prv)
            undropped = {"f0": x, "f1": seen["f0"][0][1], "b0": reverse_padded(x, lengths), "b1": seen["b0"][0][1]}
            tops = [layers[-1][0, :, :P], layers[-1][0, :, P:]]           # the softmax reads fwd, then bwd
            received = {**{name: seen[name][0][0] for name in undropped}, "softmax": [i for i, _ in seen["softmax"]]}
            for name, full in undropped.items():
                if training:
                    _assert_dropped_out(received[name], full, 0.5)
                else:
                    assert torch.equal(received[name], full), name
            for got, top in zip(received["softmax"], tops):
                if training:
                    _assert_dropped_out(got, top, 0.5)
                else:
                    assert torch.equal(got, top)


def test_bilm_stream_losses_drop_out_the_softmax_input_in_training_only():
    # train_elmo.py's path (stream_losses): the top layer's output is dropped out before the softmax there too
    model = make_model(dropout=0.5, vocab_size=20, n_negative_samples=0)
    seen = {}
    for name, module in (("f1", model.forward_layers[1]), ("b1", model.backward_layers[1]), ("softmax", model.softmax)):
        module.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, []).append(
            (inp[0], out[0] if isinstance(out, tuple) else out)))                  # an LSTMP returns (m, state)
    ids = batch_to_ids([["a", "sentence", "long", "enough", "to", "count", "dropped", "values"]])   # (1, T, 50)
    char_ids = torch.stack([ids, ids.flip(1)])                                     # (2, 1, T, 50)
    targets = torch.zeros(2, 1, ids.shape[1], dtype=torch.long)
    P = model.config.projection_dim
    with torch.no_grad():
        for training in (True, False):
            seen.clear()
            model.train(training).stream_losses(char_ids, targets)
            # each direction's top output: the last LSTMP's, plus its (dropped) input with skip connections
            skip = model.config.use_skip_connections
            tops = [(out + inp if skip else out).reshape(-1, P) for inp, out in (seen["f1"][0], seen["b1"][0])]
            for (got, _), top in zip(seen["softmax"], tops):
                if training:
                    _assert_dropped_out(got, top, 0.5)
                else:
                    assert torch.equal(got, top)


def _strip_by_hand(layers, mask):
    """<S>, </S> and padding removed from each sentence, one sentence at a time: [(B, T, D)], (B, T)."""
    B, T2, D = layers[0].shape
    lengths = mask.sum(1).tolist()
    out = [torch.zeros(B, T2 - 2, D) for _ in layers]
    new_mask = torch.zeros(B, T2 - 2, dtype=torch.bool)
    for b, n in enumerate(lengths):
        for h, o in zip(layers, out):
            o[b, : n - 2] = h[b, 1: n - 1]
        new_mask[b, : n - 2] = True
    return out, new_mask


def test_layer_norm_statistics_leave_out_sentence_markers_as_bilm_tf():
    # bilm-tf strips <S>/</S> from every layer, then weight_layers normalises over the words only
    bilm = make_model()
    elmo = ELMo(bilm, dropout=0.0, do_layer_norm=True)
    with torch.no_grad():
        elmo.scalar_mix.scalar_parameters.copy_(torch.tensor([0.5, -1.0, 2.0]))
    ids = batch_to_ids([["The", "cat", "sat", "on", "the", "mat", "."], ["Hello", "world"]])
    with torch.no_grad():
        reps, mask = elmo(ids)
        layers, full_mask, _ = bilm(ids)
        stripped, stripped_mask = _strip_by_hand(layers, full_mask)
        s = torch.softmax(elmo.scalar_mix.scalar_parameters, 0)
        expected = 0
        for w, h in zip(s, stripped):
            real = h[stripped_mask]                                   # (n_words, D): words only
            expected = expected + w * (h - real.mean()) / real.var(unbiased=False).sqrt()
        expected = expected * stripped_mask.unsqueeze(-1)
    assert torch.equal(mask, stripped_mask)
    torch.testing.assert_close(reps, expected, rtol=1e-5, atol=1e-5)


# -- bilm-tf weight files ------------------------------------------------------------------------

def _tf_arrays(cfg, rng):
    """Random weights in bilm-tf's hdf5 layout (the format of allennlp's downloads)."""
    E, D, P, C = cfg.char_embed_dim, cfg.n_filters, cfg.projection_dim, cfg.lstm_dim
    a = {"char_embed": rng.normal(size=(261, E))}
    for i, (w, n) in enumerate(cfg.filters):
        a[f"CNN/W_cnn_{i}"] = rng.normal(scale=0.5, size=(1, w, E, n))
        a[f"CNN/b_cnn_{i}"] = rng.normal(scale=0.1, size=(n,))
    for k in range(cfg.n_highway):
        for name, shape in (("W_carry", (D, D)), ("W_transform", (D, D)), ("b_carry", (D,)), ("b_transform", (D,))):
            a[f"CNN_high_{k}/{name}"] = rng.normal(scale=0.3, size=shape)
    a["CNN_proj/W_proj"] = rng.normal(scale=0.3, size=(D, P))
    a["CNN_proj/b_proj"] = rng.normal(scale=0.1, size=(P,))
    for d in range(2):
        for l in range(cfg.n_layers):
            p = f"RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/"
            a[p + "W_0"] = rng.normal(scale=0.4, size=(2 * P, 4 * C))
            a[p + "B"] = rng.normal(scale=0.2, size=(4 * C,))
            a[p + "W_P_0"] = rng.normal(scale=1.5, size=(C, P))     # large enough that proj_clip is hit
    return {k: v.astype(np.float32) for k, v in a.items()}


def _numpy_bilm_top_layer(a, cfg, words):
    """bilm-tf's forward pass written independently in NumPy, TF layouts as stored: (T, 2P) top layer.

    Both clips (cell and projection, ±3) must change some values, or the comparison would not test them."""
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))
    chars = np.array([word_to_char_ids(w) for w in ["<S>", *words, "</S>"]]) - 1   # bilm-tf ids
    emb = a["char_embed"][chars]                                                    # (T, 50, E)
    feats = []
    for i, (w, n) in enumerate(cfg.filters):
        W = a[f"CNN/W_cnn_{i}"][0]                                                  # (w, E, n)
        conv = np.stack([np.einsum("tke,ken->tn", emb[:, s:s + w], W) for s in range(50 - w + 1)], 1)
        feats.append(np.maximum(conv.max(1) + a[f"CNN/b_cnn_{i}"], 0))            # relu after max
    x = np.concatenate(feats, -1)
    for k in range(cfg.n_highway):
        g = sig(x @ a[f"CNN_high_{k}/W_carry"] + a[f"CNN_high_{k}/b_carry"])
        x = g * np.maximum(x @ a[f"CNN_high_{k}/W_transform"] + a[f"CNN_high_{k}/b_transform"], 0) + (1 - g) * x
    x = x @ a["CNN_proj/W_proj"] + a["CNN_proj/b_proj"]
    C, P = cfg.lstm_dim, cfg.projection_dim
    tops, clipped = [], {"cell": 0, "proj": 0}
    for d in range(2):
        h = x if d == 0 else x[::-1]
        for l in range(cfg.n_layers):
            p = f"RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/"
            m, c, out = np.zeros(P), np.zeros(C), []
            for t in range(len(h)):
                z = np.concatenate([h[t], m]) @ a[p + "W_0"] + a[p + "B"]
                i, j, f, o = np.split(z, 4)
                c = sig(f + 1.0) * c + sig(i) * np.tanh(j)
                clipped["cell"] += int((np.abs(c) > 3).sum())
                c = np.clip(c, -3, 3)
                m = (sig(o) * np.tanh(c)) @ a[p + "W_P_0"]
                clipped["proj"] += int((np.abs(m) > 3).sum())
                m = np.clip(m, -3, 3)
                out.append(m)
            h = np.array(out) + (h if l > 0 else 0)                                 # skip connection from layer 2 on
        tops.append(h if d == 0 else h[::-1])
    assert clipped["cell"] > 0 and clipped["proj"] > 0, f"a clip is never hit: {clipped}"
    return np.concatenate(tops, -1)


def _write_arrays(path, arrays):
    """An hdf5 file at path holding arrays ({dataset name: array})."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr)


def _write_weight_file(path, cfg):
    """A synthetic bilm-tf dump of cfg's shapes at path; returns its arrays."""
    a = _tf_arrays(cfg, np.random.default_rng(0))
    _write_arrays(path, a)
    return a


def _options(cfg, **lstm):
    return {"lstm": {"dim": cfg.lstm_dim, "projection_dim": cfg.projection_dim, "n_layers": cfg.n_layers,
                     "cell_clip": 3, "proj_clip": 3, "use_skip_connections": True, **lstm},
            "char_cnn": {"activation": "relu", "embedding": {"dim": cfg.char_embed_dim},
                         "filters": [list(f) for f in cfg.filters], "n_highway": cfg.n_highway,
                         "n_characters": 262, "max_characters_per_token": 50}}


def test_load_bilm_matches_an_independent_numpy_bilm_on_a_synthetic_weight_file(tmp_path):
    cfg = tiny_config()
    a = _write_weight_file(tmp_path / "weights.hdf5", cfg)
    (tmp_path / "options.json").write_text(json.dumps(_options(cfg)))
    model = load_bilm(tmp_path / "options.json", tmp_path / "weights.hdf5")
    sents = [["Hello", "world", "!"], ["A", "longer", "sentence", "in", "this", "batch", "."]]
    with torch.no_grad():
        layers, _, _ = model(batch_to_ids(sents))
    for b, words in enumerate(sents):
        expected = _numpy_bilm_top_layer(a, cfg, words)
        np.testing.assert_allclose(layers[-1][b, : len(words) + 2].numpy(), expected, rtol=1e-4, atol=2e-5)


def test_load_bilm_reads_big_endian_and_float64_datasets_as_the_same_weights(tmp_path):
    cfg = tiny_config()
    a = _write_weight_file(tmp_path / "native.hdf5", cfg)
    _write_arrays(tmp_path / "other.hdf5", {name: arr.astype(">f4" if i % 2 else "<f8") for i, (name, arr)
                                            in enumerate(a.items())})
    (tmp_path / "options.json").write_text(json.dumps(_options(cfg)))
    native = load_bilm(tmp_path / "options.json", tmp_path / "native.hdf5").state_dict()
    other = load_bilm(tmp_path / "options.json", tmp_path / "other.hdf5").state_dict()
    assert all(torch.equal(native[k], other[k]) for k in native)


def test_load_bilm_refuses_options_nested_past_the_json_parser_in_one_line(tmp_path):
    (tmp_path / "options.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "w.hdf5").write_bytes(b"")
    with pytest.raises(ValueError, match="not a bilm-tf options file .RecursionError"):
        load_bilm(tmp_path / "options.json", tmp_path / "w.hdf5")


def test_load_bilm_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_bilm(tmp_path / "options.json", tmp_path / "w.hdf5")
    (tmp_path / "options.json").write_text("{}")
    (tmp_path / "w.hdf5").write_bytes(b"")
    with pytest.raises(ValueError, match="not a bilm-tf options file"):
        load_bilm(tmp_path / "options.json", tmp_path / "w.hdf5")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        load_bilm(tmp_path / "options.json", tmp_path / "w.hdf5")


@pytest.mark.parametrize("fewer", [dict(n_highway=1), dict(n_layers=1)])
def test_load_bilm_refuses_weights_the_options_do_not_ask_for(tmp_path, fewer):
    # (fewer filters cannot pass silently: they change the highway and projection shapes)
    _write_weight_file(tmp_path / "weights.hdf5", tiny_config())            # 2 highway, 2 LSTM layers
    (tmp_path / "options.json").write_text(json.dumps(_options(tiny_config(**fewer))))
    with pytest.raises(ValueError, match="does not ask for") as e:
        load_bilm(tmp_path / "options.json", tmp_path / "weights.hdf5")
    assert "\n" not in str(e.value) and "weights.hdf5" in str(e.value)


@pytest.mark.parametrize("lstm,message", [({"cell_clip": "3"}, "cell_clip must be a number"),
                                          ({"projection_dim": -1}, "projection_dim must be an integer ≥ 1"),
                                          ({"n_layers": 2.5}, "n_layers must be an integer")])
def test_load_bilm_checks_the_type_and_range_of_numeric_options(tmp_path, lstm, message):
    cfg = tiny_config()
    _write_weight_file(tmp_path / "weights.hdf5", cfg)
    (tmp_path / "options.json").write_text(json.dumps(_options(cfg, **lstm)))
    with pytest.raises(ValueError, match=message) as e:
        load_bilm(tmp_path / "options.json", tmp_path / "weights.hdf5")
    assert "\n" not in str(e.value) and "options.json" in str(e.value)


def test_load_bilm_names_a_weight_file_that_is_not_hdf5_or_is_truncated(tmp_path):
    cfg = tiny_config()
    _write_weight_file(tmp_path / "weights.hdf5", cfg)
    (tmp_path / "options.json").write_text(json.dumps(_options(cfg)))
    whole = (tmp_path / "weights.hdf5").read_bytes()
    (tmp_path / "half.hdf5").write_bytes(whole[: len(whole) // 2])
    for name in ("options.json", "half.hdf5"):
        with pytest.raises(ValueError, match="not a readable HDF5 weight file") as e:
            load_bilm(tmp_path / "options.json", tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_load_bilm_names_a_damaged_weight_file(tmp_path):
    # bytes flipped inside the file (not cut short): whatever h5py raises becomes one line naming the file
    cfg = tiny_config()
    _write_weight_file(tmp_path / "weights.hdf5", cfg)
    (tmp_path / "options.json").write_text(json.dumps(_options(cfg)))
    whole = bytearray((tmp_path / "weights.hdf5").read_bytes())
    rng, outcomes = np.random.default_rng(0), set()
    for _ in range(40):
        damaged = bytearray(whole)
        for i in rng.integers(0, 4096, 24):          # the superblock and object headers lie in the first pages
            damaged[i] ^= 0xFF
        (tmp_path / "damaged.hdf5").write_bytes(bytes(damaged))
        try:
            load_bilm(tmp_path / "options.json", tmp_path / "damaged.hdf5")
            outcomes.add("loaded")
        except ValueError as e:
            assert "\n" not in str(e) and "damaged.hdf5" in str(e), str(e)
            outcomes.add("damaged" if "damaged.hdf5 is damaged (" in str(e) else "other error")
    assert "damaged" in outcomes   # h5py's own errors were met, and named


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_lstmp_stack_equals_torch_lstm_with_projection_when_clips_are_off():
    # An independent implementation of the same cell: nn.LSTM(proj_size=P) given our weights (gate
    # order i, f, g, o, forget bias 1.0 folded into its bias). The benchmark's peer is built this way.
    from minilm.bench.elmo import CompositeBiLM
    cfg = tiny_config(vocab_size=30, cell_clip=None, proj_clip=None)
    torch.manual_seed(0)
    ours = BiLM(cfg)
    base = BiLM(cfg)
    base.load_state_dict(ours.state_dict())
    peer = CompositeBiLM(base)
    chars = torch.stack([batch_to_ids([["some", "words", "to", "read", "here", "now"]] * 2),
                         batch_to_ids([["and", "another", "stream", "for", "the", "backward", "LM"]] * 2)[:, :8]])
    targets = torch.randint(0, 30, (2, 2, 8))
    a, b = ours.stream_losses(chars, targets)[0], peer(chars, targets)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a.sum(), ours.projection.weight)[0]
    gb = torch.autograd.grad(b.sum(), base.projection.weight)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_softmax_targets_out_of_range_are_one_line_errors():
    # an id past the vocabulary would be an IndexError (a device-side assert on a GPU), one below −1 silently ignored
    model = BiLM(tiny_config(vocab_size=30))
    ids = batch_to_ids([["a", "b", "c"]])
    ok = torch.zeros(1, 3, dtype=torch.long)
    for bad, message in ((torch.tensor([[25, 1, 40]]), r"got values in \[1, 40\]"),
                         (torch.tensor([[-2, 1, 1]]), r"got values in \[-2, 1\]"),
                         (torch.ones(1, 3), "must be integer word ids"),
                         (torch.ones(1, 3, dtype=torch.int32), r"must be integer word ids \(int64\), got torch.int32")):
        with pytest.raises(ValueError, match=message):
            model(ids, next_ids=bad, previous_ids=ok)
    chars = torch.stack([ids, ids])                                   # (2, 1, 3, 50)
    with pytest.raises(ValueError, match=r"targets must be word ids in \[0, 30\)"):
        model.stream_losses(chars, torch.full((2, 1, 3), 30))
    with pytest.raises(ValueError, match=r"targets must be integer word ids \(int64\)"):
        model.stream_losses(chars, torch.zeros(2, 1, 3, dtype=torch.int16))


def test_stream_losses_refuses_targets_of_another_shape_empty_streams_and_a_bool_token_index():
    model = BiLM(tiny_config(vocab_size=30))
    chars = torch.stack([batch_to_ids([["a", "b", "c"]])] * 2)         # (2, 1, 5, 50): <S> a b c </S>
    for targets in (torch.zeros(1, 1, 5, dtype=torch.long), torch.zeros(3, 1, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"targets must be \(2, B, T\) = \(2, 1, 5\), like the inputs"):
            model.stream_losses(chars, targets)
    with pytest.raises(ValueError, match="needs at least one row and one step, got B = 0, T = 5"):
        model.stream_losses(chars[:, :0], torch.zeros(2, 0, 5, dtype=torch.long))
    words = batch_to_ids([["a", "b"]])[0]                              # (4, 50): four distinct words
    for dtype in (torch.bool, torch.uint8, torch.int16):
        with pytest.raises(ValueError, match=r"token_index must be \(2, B, T\) int64, got \(2, 1, 3\) " + str(dtype)):
            model.stream_losses(words, torch.zeros(2, 1, 3, dtype=torch.long), token_index=torch.zeros(2, 1, 3, dtype=dtype))
    with pytest.raises(ValueError, match="needs at least one row and one step, got B = 1, T = 0"):
        model.stream_losses(words, torch.zeros(2, 1, 0, dtype=torch.long), token_index=torch.zeros(2, 1, 0).long())


def test_all_ignored_targets_give_a_zero_loss_not_nan():
    # a batch of nothing but padding (every target −1) has nothing to predict: 0, as allennlp's LM returns
    model = BiLM(tiny_config(vocab_size=30))
    ids = batch_to_ids([["a", "b"], ["c"]])
    none = torch.full(ids.shape[:2], -1)
    losses = model(ids, next_ids=none, previous_ids=none)[2]
    assert losses.tolist() == [0.0, 0.0] and losses.dtype == torch.float32
    losses.sum().backward()                                          # still part of the graph, every parameter's
    assert model.softmax.weight.grad is not None and not model.softmax.weight.grad.any()


def test_the_lstm_state_stays_fp32_under_autocast():
    # TF's cell keeps c and m in fp32; rounding them to bf16 at each step would compound over T
    from minilm.elmo import LSTMP
    torch.manual_seed(0)
    cell = LSTMP(8, 24, 8, cell_clip=3.0, proj_clip=3.0)
    x = torch.randn(2, 40, 8)
    out32, (m32, c32) = cell(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (m, c) = cell(x)
    assert m.dtype == c.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(m, m32) and torch.equal(c, c32)               # the same recurrence, in fp32
    assert torch.equal(out, out32.to(torch.bfloat16))                # only the outputs are rounded


@pytest.mark.parametrize("kw, message", [
    (dict(lstm_dim=8), "smaller than lstm_dim"),                     # bilm-tf: an LSTMCell without num_proj
    (dict(projection_dim=20, lstm_dim=40), "filter count"),          # bilm-tf: no CNN_proj
])
def test_config_refuses_shapes_that_bilm_tf_builds_without_a_projection(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kw)


def test_elmo_mix_refuses_a_mask_or_layers_that_are_not_the_bilms():
    bilm = BiLM(tiny_config())
    elmo = ELMo(bilm, dropout=0.0)
    layers, mask, _ = bilm(batch_to_ids([["a", "b"]]))
    elmo.mix(layers, mask)
    for bad_layers, bad_mask in ((layers, mask[..., None]), (layers[:1] + [layers[1][:, :1]], mask), (None, mask),
                                 ([h[..., 0] for h in layers], mask), ([h[..., None] for h in layers], mask)):
        with pytest.raises(ValueError, match=r"ELMo.mix: give the BiLM's \(layers, mask\)"):
            elmo.mix(bad_layers, bad_mask)


def test_config_round_trips_through_its_dict_and_refuses_an_unknown_field():
    config = tiny_config()
    assert ELMoConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="ELMoConfig: unknown field.s. lstm_dims"):
        ELMoConfig.from_dict({**config.to_dict(), "lstm_dims": 4096})    # a typo would build the default width


# -- weight files and inputs found unchecked by a mutation run ------------------------------------------

@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_load_bilm_refuses_nan_or_infinite_weights(tmp_path, bad):
    cfg = tiny_config()
    a = _tf_arrays(cfg, np.random.default_rng(0))
    a["CNN_proj/b_proj"][3] = float(bad)
    _write_arrays(tmp_path / "w.hdf5", a)
    (tmp_path / "options.json").write_text(json.dumps(_options(cfg)))
    with pytest.raises(ValueError, match=r"CNN_proj/b_proj holds NaN or infinite values"):
        load_bilm(tmp_path / "options.json", tmp_path / "w.hdf5")


def test_load_bilm_refuses_integer_datasets(tmp_path):
    cfg = tiny_config()
    a = _tf_arrays(cfg, np.random.default_rng(0))
    a["CNN/b_cnn_0"] = np.round(a["CNN/b_cnn_0"] * 10).astype(np.int32)   # right shape, wrong kind
    _write_arrays(tmp_path / "w.hdf5", a)
    (tmp_path / "options.json").write_text(json.dumps(_options(cfg)))
    with pytest.raises(ValueError, match=r"CNN/b_cnn_0 is int32 .*implies float"):
        load_bilm(tmp_path / "options.json", tmp_path / "w.hdf5")


def test_batch_to_ids_keeps_every_word_of_a_long_sentence():
    words = [f"w{i}" for i in range(120)]
    ids = batch_to_ids([words, ["short"]])
    assert ids.shape == (2, 122, 50)
    assert ids[0, 120].tolist() == word_to_char_ids("w119") and ids[0, 121].tolist() == word_to_char_ids("</S>")
    assert (ids[1, 3:] == 0).all()
