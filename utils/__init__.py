"""Small helpers shared by the BenTsao scripts."""

import warnings

# peft's PeftModel.__init__ (peft 0.21.2) reads `model.is_gradient_checkpointing`, which transformers 5 deprecated in
# favour of `is_activation_checkpointing`: every script that applies an adapter printed a FutureWarning that is not
# ours to act on. Only that message is silenced, here, where every script passes; drop this when peft reads the
# new name.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
