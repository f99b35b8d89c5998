//! A pickle (`.ckpt`) reader that builds only tensors and plain containers and never runs code. Being written.
