"""Small helpers shared by the BenTsao scripts."""

import os
import warnings

# peft's PeftModel.__init__ (peft 0.21.2) reads `model.is_gradient_checkpointing`, which transformers 5 deprecated in
# favour of `is_activation_checkpointing`: every script that applies an adapter printed a FutureWarning that is not
# ours to act on. Only that message is silenced, here, where every script passes; drop this when peft reads the
# new name.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# peft (0.21.2) saving an adapter looks for the base's config.json beside its path to see whether the vocabulary was
# resized; a GGUF base is one file, so every checkpoint warned that it "will assume that the vocabulary was not
# modified", which is right: the scripts never resize it.
warnings.filterwarnings("ignore", message=r"Could not find a config file in .*\.gguf - will", category=UserWarning)

# OpenMP threads that spin while they wait for work (libgomp's default) take the timeslices other processes need: on
# 2 cores kept busy by 2 other processes a tiny-model step took 6.46 s with 2 spinning threads, 0.24 s with passive
# waiting (benchmarks/busy_cpu.sh, docs/performance.md); on idle cores passive waiting costs nothing measurable. OpenMP
# reads the variable when torch loads it: utils is imported before torch by every script that trains or answers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# DeepSpeed (installed with the test requirements) warns "Setting accelerator to CPU" on every run of a machine without
# a GPU; telling it spares the line. Checked without torch, so that a mistyped flag is still answered at once.
if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
