"""distprune's CLI with one rank stalled in the middle of saving: after the rank named by
DISTPRUNE_TEST_STALL_RANK has written its checkpoint files into the temporary directory,
it writes its pid to DISTPRUNE_TEST_PIDFILE and sleeps (the test signals or kills it)."""

import os
import time
from pathlib import Path

import distprune.writer as writer
from distprune.cli import entry, main

original = writer.write_checkpoint


def stalling_write(directory, *args, **kwargs):
    original(directory, *args, **kwargs)
    if int(os.environ.get("RANK", "0")) == int(os.environ["DISTPRUNE_TEST_STALL_RANK"]):
        Path(os.environ["DISTPRUNE_TEST_PIDFILE"]).write_text(str(os.getpid()))
        time.sleep(600)


writer.write_checkpoint = stalling_write

if __name__ == "__main__":
    entry(main)
