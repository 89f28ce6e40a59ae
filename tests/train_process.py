"""Runs `prefixtune train` in this process for the subprocess tests, optionally slowed down (so a
kill from outside lands mid-run) or killing itself with SIGKILL while a checkpoint is being written.

usage: python train_process.py [--slow SECONDS] [--die-while-saving STEP] -- <prefixtune train args>
"""

import os
import signal
import sys
import time

from transformers import TrainerCallback

from prefixtune import cli, training

args = sys.argv[1:]
split = args.index("--")
own, train_args = args[:split], args[split + 1 :]
slow = float(own[own.index("--slow") + 1]) if "--slow" in own else 0.0
die_at = int(own[own.index("--die-while-saving") + 1]) if "--die-while-saving" in own else None


class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(slow)


original_init = training.PrefixTrainer.__init__


def patched_init(self, *a, **kw):
    original_init(self, *a, **kw)
    if slow:
        self.add_callback(Slow())


def dying_rng_save(self, output_dir):
    # Prefix and optimizer of this checkpoint are on disk, its completion marker is not.
    if self.state.global_step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_rng_save(self, output_dir)


original_rng_save = training.PrefixTrainer._save_rng_state
training.PrefixTrainer.__init__ = patched_init
training.PrefixTrainer._save_rng_state = dying_rng_save
sys.argv = ["prefixtune", "train", *train_args]
cli.main()
