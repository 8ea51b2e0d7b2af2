"""`python -m distprune.eval model=hf model.path=DIR eval=wikitext2-local`: perplexity of any
checkpoint, the dense one included."""

from distprune.cli import entry, eval_main

if __name__ == "__main__":
    entry(eval_main)
