//! Single-file (original LDM key names) checkpoints converted to the diffusers layout. Being written.
