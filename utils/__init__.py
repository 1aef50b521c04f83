"""Small helpers shared by the BenTsao scripts."""

import os
import warnings

# peft's PeftModel.__init__ (peft 0.21.2) reads `model.is_gradient_checkpointing`, which transformers 5 deprecated in
# favour of `is_activation_checkpointing`: every script that applies an adapter printed a FutureWarning that is not
# ours to act on. Only that message is silenced, here, where every script passes; drop this when peft reads the
# new name.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# DeepSpeed (installed with the test requirements) warns "Setting accelerator to CPU" on every run of a machine without
# a GPU; telling it spares the line. Checked without torch, so that a mistyped flag is still answered at once.
if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
