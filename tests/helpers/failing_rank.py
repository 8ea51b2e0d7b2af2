"""distprune's CLI with a failure injected on rank 1 while it masks: DISTPRUNE_TEST_FAIL=raise
raises, =hang writes the pid to DISTPRUNE_TEST_PIDFILE and sleeps (the test kills it)."""

import os
import time
from pathlib import Path

import distprune.masks as masks
from distprune.cli import main

original = masks._apply


def failing_apply(layer, mask, *args):
    if int(os.environ.get("RANK", "0")) == 1:
        if os.environ["DISTPRUNE_TEST_FAIL"] == "raise":
            raise RuntimeError("injected failure while masking")
        Path(os.environ["DISTPRUNE_TEST_PIDFILE"]).write_text(str(os.getpid()))
        time.sleep(600)
    return original(layer, mask, *args)


masks._apply = failing_apply

if __name__ == "__main__":
    main()
