"""Training: how batches are laid out (`batching`), the Trainer and its callbacks (`trainer`, `callbacks`),
checkpoints (`checkpoints`), the distributed engines (`engines`) and the loss plot (`plotting`)."""
