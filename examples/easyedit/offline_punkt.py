"""Write an untrained Punkt sentence tokenizer where the installed NLTK looks for one,
for machines where ``nltk.download`` cannot reach its server.

    python examples/easyedit/offline_punkt.py NLTK_DIR     # then: export NLTK_DATA=NLTK_DIR

EasyEdit's fluency metric calls ``nltk.word_tokenize``, which loads Punkt's English
model. NLTK 3.9 and later read ``tokenizers/punkt_tab/english/`` (four text files;
empty files give an untrained model); earlier versions (EasyEdit pins 3.6.5) read
``tokenizers/punkt/english.pickle`` (and ``PY3/``). An untrained model splits sentences
only at plain sentence ends; the n-gram entropy EasyEdit computes from the tokens is
defined as before, but its values can differ slightly from a run with the trained model.
Run with the interpreter that runs EasyEdit. Prints ``NLTK_DIR``.
"""

from __future__ import annotations

import os
import pickle
import sys

PUNKT_TAB_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def write_untrained_punkt(nltk_dir: str) -> str:
    """Write the untrained model under ``nltk_dir`` in the installed NLTK's layout; return ``nltk_dir``."""
    import nltk

    if tuple(int(x) for x in nltk.__version__.split(".")[:2]) >= (3, 9):
        tab = os.path.join(nltk_dir, "tokenizers", "punkt_tab", "english")
        os.makedirs(tab, exist_ok=True)
        for name in PUNKT_TAB_FILES:
            open(os.path.join(tab, name), "a").close()
    else:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        for sub in ("PY3", ""):
            folder = os.path.join(nltk_dir, "tokenizers", "punkt", sub)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "english.pickle"), "wb") as f:
                pickle.dump(PunktSentenceTokenizer(), f)
    return nltk_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_untrained_punkt(os.path.abspath(sys.argv[1])))
