"""What a model's files say that both services need, read in one place.

The tokenizer service and the model service are often given the same path; each asks this package
for the special-token facts (BOS, EOS, stop tokens, chat format) so they cannot disagree about how
the files are read; the tokenizer service and the gateway decode ids to text by one rule
(``detokenize.py``). Pure Python: no torch, no tiktoken.
"""
