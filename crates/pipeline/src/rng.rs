//! torch-compatible CPU normal RNG. Being written; the type exists so other modules compile.

pub struct TorchRng {
    _seed: u64,
}
