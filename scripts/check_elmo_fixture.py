"""Check `load_bilm` against allennlp's ELMo test fixture (a small bilm-tf model and the embeddings
bilm-tf dumped for it): python scripts/check_elmo_fixture.py DIR

DIR holds options.json, lm_weights.hdf5, sentences.json (batches of sentences) and lm_embeddings_K.hdf5
(for batch K, dataset "i": sentence i's top-layer outputs, (2, n_words, P): forward, then backward, with
<S> and </S> left out). bilm-tf dumped the sentences one after another with the LSTM state carried, so
they are run here with `state=` carried too; from zero states only each batch's first sentence matches.
Needs h5py. Prints the largest absolute difference each way and exits 1 if the carried one exceeds 1e-5.
"""
import json
import os
import sys

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's minilm
from minilm.elmo import batch_to_ids, load_bilm  # noqa: E402


def max_difference(bilm, directory, carry):
    with open(os.path.join(directory, "sentences.json"), encoding="utf-8") as f:
        batches = json.load(f)
    worst = 0.0
    for k, sentences in enumerate(batches):
        state = {} if carry else None
        with h5py.File(os.path.join(directory, f"lm_embeddings_{k}.hdf5"), "r") as dumped:
            for i, sentence in enumerate(sentences):
                with torch.no_grad():
                    layers, _, _ = bilm(batch_to_ids([sentence.split()]), state=state)
                top = layers[-1][0, 1:-1]                                  # (n_words, 2P) without <S>, </S>
                P = top.shape[-1] // 2
                ours = torch.stack([top[:, :P], top[:, P:]]).numpy()      # (2, n_words, P)
                theirs = dumped[str(i)][...]
                if ours.shape != theirs.shape or not np.isfinite(ours).all():
                    return float("inf")                                    # another tokenisation, or NaN
                worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def main(directory):
    bilm = load_bilm(os.path.join(directory, "options.json"), os.path.join(directory, "lm_weights.hdf5")).eval()
    carried, zero = max_difference(bilm, directory, carry=True), max_difference(bilm, directory, carry=False)
    print(f"largest absolute difference from bilm-tf's dump: {carried:.2e} with the LSTM state carried from "
          f"sentence to sentence (as dumped), {zero:.2e} with every sentence from zero states")
    return 0 if carried < 1e-5 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python scripts/check_elmo_fixture.py DIR (allennlp's ELMo test fixture directory)")
    sys.exit(main(sys.argv[1]))
